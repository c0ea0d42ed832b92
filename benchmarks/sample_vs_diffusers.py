"""Our jitted sampling loop (`denoise.denoise`, all steps in one program) against diffusers' HunyuanVideoPipeline on
the same CPU, transformer weights, prompt embeddings, mask, pooled vector and initial noise.

Both integrate N Euler steps (shift 7, embedded guidance 6.0) from the same noise to latents (no text encoders, no
VAE), with and without true classifier-free guidance (a negative prompt, true_cfg_scale 2.0: diffusers calls the
transformer twice per step, ours runs the two branches as one batch). Configs: the tiny test transformer and the
small config of `benchmarks/dit_vs_diffusers.py`. Prints, per case: our compile time (first call minus a steady
call), seconds per full sampling and per step for both (best of --repeats, the two taking turns so that both see
the same load), diffusers / ours (× faster; the target is ≥ 1.5×) and the relative max error between the two final
latents (≤ 1e-4: both did the same work).

    python -m benchmarks.sample_vs_diffusers [--steps=10] [--repeats=3] [--threads=2] [--attention=xla]
"""

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline  # noqa: E402

from benchmarks import dit_vs_diffusers  # noqa: E402
from benchmarks.dit_vs_diffusers import best_of  # noqa: E402
from hyvideo_jax.convert import load_torch_dit  # noqa: E402
from hyvideo_jax.denoise import denoise  # noqa: E402
from hyvideo_jax.models.attention import BACKENDS  # noqa: E402
from hyvideo_jax.models.dit import HunyuanVideoDiT  # noqa: E402
from tests.dit_reference import TINY, diffusers_dit, relative_error  # noqa: E402

# diffusers config; latent (frames, height, width); text tokens; batch.
CONFIGS = {
    "tiny": (TINY, (2, 4, 6), 7, 2),   # the shapes of tests/test_sample.py
    "small": (dit_vs_diffusers.CONFIG, (dit_vs_diffusers.FRAMES, dit_vs_diffusers.HEIGHT, dit_vs_diffusers.WIDTH),
              dit_vs_diffusers.TEXT, dit_vs_diffusers.BATCH),
}
SHIFT, GUIDANCE, TRUE_CFG_SCALE = 7.0, 6.0, 2.0


def conditioning(config, text_len, batch, generator, short):
    """(text_states [B, L, D], text_mask [B, L], pooled [B, Dp]) in torch; the last prompt has `short` tokens."""
    states = torch.randn(batch, text_len, config["text_embed_dim"], generator=generator)
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    mask[-1, short:] = 0
    return states, mask, torch.randn(batch, config["pooled_projection_dim"], generator=generator)


def released_guidance(scale: float) -> float:
    """The scale to give diffusers so that its fp32 `scale × 1000` is the bf16-rounded value the released pipelines
    and ours feed the model (6.0 → 6.016 → 6016)."""
    return float(torch.tensor([scale], dtype=torch.bfloat16) * 1000.0) / 1000.0


def bench(name, true_cfg, args):
    config, latent, text_len, batch = CONFIGS[name]
    transformer = diffusers_dit(seed=0, **config)
    n_params = sum(p.numel() for p in transformer.parameters())
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, config["in_channels"], *latent, generator=g)
    cond = conditioning(config, text_len, batch, g, short=text_len // 3)
    negative = conditioning(config, text_len, batch, g, short=text_len // 2) if true_cfg else None
    scale = TRUE_CFG_SCALE if true_cfg else 1.0

    # diffusers: the pipeline on prompt embeddings, latents out.
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    negative_kw = {} if negative is None else dict(
        negative_prompt_embeds=negative[0], negative_prompt_attention_mask=negative[1],
        negative_pooled_prompt_embeds=negative[2])

    guidance_scale = released_guidance(GUIDANCE)

    def theirs():
        with torch.no_grad():
            return pipe(prompt_embeds=cond[0], prompt_attention_mask=cond[1], pooled_prompt_embeds=cond[2],
                        latents=noise.clone(), num_inference_steps=args.steps, guidance_scale=guidance_scale,
                        true_cfg_scale=scale, output_type="latent", return_dict=False, **negative_kw)[0]

    # Ours: the same weights converted, channel-last noise, the same embeddings.
    cfg, params = load_torch_dit(transformer.state_dict(), config=dict(rope_axes_dim=config["rope_axes_dim"]),
                                 progress=False)
    model = HunyuanVideoDiT(dataclasses.replace(cfg, attention_backend=args.attention))
    params = jax.device_put(params)
    to_jax = lambda triple: tuple(jnp.asarray(t.numpy()) for t in triple)  # noqa: E731
    x = jnp.asarray(noise.permute(0, 2, 3, 4, 1).numpy())
    cond_j, negative_j = to_jax(cond), None if negative is None else to_jax(negative)

    def ours():
        return jax.block_until_ready(denoise(
            model, params, x, *cond_j, steps=args.steps, shift=SHIFT, guidance=GUIDANCE, negative=negative_j,
            true_cfg_scale=scale, progress=False))

    t0 = time.perf_counter()
    got = ours()
    first = time.perf_counter() - t0
    ref = theirs()   # warm-up, and the latents to compare
    ours_s, theirs_s = best_of([ours, theirs], args.repeats)   # in turn: both see the same load
    err = relative_error(got, ref.permute(0, 2, 3, 4, 1).numpy())
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    label = f"{name} ({n_params / 1e6:.2f}M, {tokens}+{text_len} tok, B{batch})" + (" +CFG" if true_cfg else "")
    print(f"{label:36s} {max(first - ours_s, 0.0):8.2f} {ours_s:9.3f} {ours_s / args.steps:9.4f} {theirs_s:9.3f} "
          f"{theirs_s / args.steps:9.4f} {theirs_s / ours_s:8.2f}× {err:9.1e}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--attention", default="xla", choices=sorted(BACKENDS), help="our attention backend")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.steps} steps, shift {SHIFT}, embedded guidance {GUIDANCE}, CFG: true_cfg_scale {TRUE_CFG_SCALE} "
          f"with a negative prompt; our attention {args.attention}; {args.threads} torch threads; "
          f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__}")
    print(f"{'':36s} {'compile':>8s} {'ours':>9s} {'ours':>9s} {'diffusers':>9s} {'diffusers':>9s} {'diffusers':>9s} "
          f"{'rel. max':>9s}")
    print(f"{'case':36s} {'(s)':>8s} {'(s/run)':>9s} {'(s/step)':>9s} {'(s/run)':>9s} {'(s/step)':>9s} {'/ ours':>9s} "
          f"{'error':>9s}")
    for name in CONFIGS:
        for true_cfg in (False, True):
            bench(name, true_cfg, args)


if __name__ == "__main__":
    main()
