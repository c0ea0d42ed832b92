"""Compiled temporary memory (`compiled.memory_analysis()`) of tiled vs untiled VAE decode for growing videos.

    python benchmarks/vae_memory.py             # a mid-sized VAE with 64 px tiles (compiles in minutes on a CPU)
    python benchmarks/vae_memory.py --released  # the released VAE with the official tiles (slow to compile)

Nothing is executed: each program is only compiled, for shapes given abstractly, so large sizes cost no memory.
Tiled decode should stay flat in both frames and frame area (one tile's activations; tiles are accumulated straight
into the output, which is not temporary memory); untiled decode grows with the activations (many channels per
output pixel).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hyvideo_jax.models import vae_tiling  # noqa: E402
from hyvideo_jax.models.vae import HunyuanVideoVAE, TileParams, VAEConfig, init_params  # noqa: E402


def memory(fn, params, shape):
    compiled = jax.jit(fn).lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--released", action="store_true")
    args = parser.parse_args()
    if args.released:
        config = VAEConfig()
        tiles = config.tile_params()
        frames, sizes = [9, 17, 33], [(32, 32), (64, 64), (90, 160)]     # latent: 33 frames = 129 video frames
    else:
        config = VAEConfig(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, layers_per_block=2)
        tiles = TileParams(min_size=64, stride=48, min_frames=16, stride_frames=12)
        frames, sizes = [5, 9, 13, 17], [(8, 8), (16, 16), (24, 24), (32, 32)]
    model = HunyuanVideoVAE(config)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    tiled = lambda p, z: vae_tiling.tiled_decode_unscaled(model, p, z, tiles)  # noqa: E731
    untiled = lambda p, z: model.apply({"params": p}, z, method=model.decode_unscaled)  # noqa: E731
    mib = 2 ** 20
    print(f"VAE {config.block_out_channels}, tiles {tiles}")
    print(f"{'latent T x H x W':>18} {'output MiB':>11} {'tiled temp MiB':>15} {'untiled temp MiB':>17}")
    fixed_hw = sizes[0]
    for t in frames:
        shape = (1, t, *fixed_hw, config.latent_channels)
        tiled_temp, out = memory(tiled, params, shape)
        untiled_temp, _ = memory(untiled, params, shape)
        print(f"{t:>6} x {fixed_hw[0]:>3} x {fixed_hw[1]:>3} {out / mib:>11.1f} {tiled_temp / mib:>15.1f} "
              f"{untiled_temp / mib:>17.1f}")
    fixed_t = frames[0]
    for h, w in sizes[1:]:
        shape = (1, fixed_t, h, w, config.latent_channels)
        tiled_temp, out = memory(tiled, params, shape)
        untiled_temp, _ = memory(untiled, params, shape)
        print(f"{fixed_t:>6} x {h:>3} x {w:>3} {out / mib:>11.1f} {tiled_temp / mib:>15.1f} "
              f"{untiled_temp / mib:>17.1f}")


if __name__ == "__main__":
    main()
