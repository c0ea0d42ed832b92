"""Encode and decode wall time of our jitted VAE vs diffusers' AutoencoderKLHunyuanVideo (eager), same CPU, fp32.

    python benchmarks/vae_vs_diffusers.py [--frames 9 --size 64 --channels 32,64,64,64 --groups 8 --repeats 3]

Both run the untiled model with identical random weights (converted from the diffusers module); prints seconds per
call (median over repeats, after one warm-up/compile call) and the ratio ours / diffusers (< 1: we are faster).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLHunyuanVideo  # noqa: E402

from hyvideo_jax.convert.vae import load_torch_vae  # noqa: E402
from hyvideo_jax.models.vae import HunyuanVideoVAE, VAEConfig  # noqa: E402


def median_seconds(fn, repeats):
    fn()  # warm-up (compiles ours)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", default="32,64,64,64")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    channels = tuple(int(c) for c in args.channels.split(","))
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    kwargs = dict(block_out_channels=channels, norm_num_groups=args.groups, layers_per_block=2, latent_channels=16)
    vae = AutoencoderKLHunyuanVideo(**kwargs).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    config, params = load_torch_vae(vae.state_dict(), config=VAEConfig(**kwargs))
    model = HunyuanVideoVAE(config)
    video = torch.rand(1, 3, args.frames, args.size, args.size) * 2 - 1
    latents = torch.randn(1, 16, (args.frames - 1) // 4 + 1, args.size // 8, args.size // 8)
    video_jax = jnp.asarray(video.numpy().transpose(0, 2, 3, 4, 1))
    latents_jax = jnp.asarray(latents.numpy().transpose(0, 2, 3, 4, 1))
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_moments))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode_unscaled))

    with torch.no_grad():
        t_enc_ref = median_seconds(lambda: vae.quant_conv(vae.encoder(video)), args.repeats)
        t_dec_ref = median_seconds(lambda: vae.decode(latents), args.repeats)
    t_enc = median_seconds(lambda: encode(params, video_jax).block_until_ready(), args.repeats)
    t_dec = median_seconds(lambda: decode(params, latents_jax).block_until_ready(), args.repeats)
    print(f"VAE {channels}, {args.frames} frames {args.size}x{args.size}, fp32, {os.cpu_count()} CPU threads")
    print(f"encode: ours {t_enc:.3f} s, diffusers {t_enc_ref:.3f} s, ratio ours/diffusers {t_enc / t_enc_ref:.2f}")
    print(f"decode: ours {t_dec:.3f} s, diffusers {t_dec_ref:.3f} s, ratio ours/diffusers {t_dec / t_dec_ref:.2f}")


if __name__ == "__main__":
    main()
