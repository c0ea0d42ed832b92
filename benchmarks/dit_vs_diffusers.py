"""Our jitted DiT against diffusers' HunyuanVideoTransformer3DModel (eager) on the same CPU, config and inputs.

Prints forward and forward+backward seconds for both and the ratio ours / diffusers (lower is better) beside its
targets: ≤ 0.8 for the forward and ≤ 1.0 for forward+backward, and the design target ≤ 0.67 (≥ 1.5× faster) for
both; for our `xla` and `chunked` attention backends (first-call time includes compile). Both sides run in turn,
best of `--repeats` rounds each.
Default: an 11.4M-parameter config, 1,344 tokens (1,280 image + 64 text), batch 2.

    python -m benchmarks.dit_vs_diffusers [--repeats=5] [--threads=2]
"""

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402

from hyvideo_jax.convert import load_torch_dit  # noqa: E402
from hyvideo_jax.models.dit import HunyuanVideoDiT  # noqa: E402

CONFIG = dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=64, num_layers=2,
              num_single_layers=4, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
              guidance_embeds=True, text_embed_dim=256, pooled_projection_dim=128, rope_axes_dim=(16, 24, 24))
FRAMES, HEIGHT, WIDTH, TEXT, BATCH = 5, 32, 32, 64, 2
TARGETS = {"forward": 0.8, "forward+backward": 1.0}
DESIGN_TARGET = 0.67


def best_of(fns, repeats):
    """The best time of each function over `repeats` rounds that run them in turn (interleaved, so that a slow
    spell of a shared machine falls on both sides of a ratio)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seen in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            seen.append(time.perf_counter() - t0)
    return [min(seen) for seen in times]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 16, FRAMES, HEIGHT, WIDTH, generator=g)
    t = torch.tensor([500.0, 100.0])
    text = torch.randn(BATCH, TEXT, CONFIG["text_embed_dim"], generator=g)
    mask = torch.ones(BATCH, TEXT, dtype=torch.int64)
    mask[1, 20:] = 0
    pooled = torch.randn(BATCH, CONFIG["pooled_projection_dim"], generator=g)
    guidance = torch.tensor([6016.0, 6016.0])
    tokens = FRAMES * (HEIGHT // 2) * (WIDTH // 2) + TEXT
    print(f"config: {n_params / 1e6:.1f}M params, {tokens} tokens, batch {BATCH}, {args.threads} threads, "
          f"jax {jax.__version__}, torch {torch.__version__}")

    def torch_fwd():
        with torch.no_grad():
            model(x, t, text, mask, pooled, guidance, return_dict=False)

    def torch_fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x, t, text, mask, pooled, guidance, return_dict=False)[0].square().mean().backward()

    cfg, params = load_torch_dit(model.state_dict(), config=dict(rope_axes_dim=CONFIG["rope_axes_dim"]),
                                 progress=False)
    params = jax.device_put(params)
    inputs = [jnp.asarray(a) for a in (x.permute(0, 2, 3, 4, 1).numpy(), t.numpy(), text.numpy(), mask.numpy(),
                                       pooled.numpy(), guidance.numpy())]
    torch_fwd(), torch_fwd_bwd()  # warm-up
    diffusers_fns = {"forward": torch_fwd, "forward+backward": torch_fwd_bwd}
    print(f"{'':28s} {'ours (s)':>10s} {'diffusers (s)':>14s} {'ours/diffusers':>15s} {'target':>7s} "
          f"{'design':>7s} {'compile (s)':>12s}")
    for backend in ("xla", "chunked"):
        ours = HunyuanVideoDiT(dataclasses.replace(cfg, attention_backend=backend))
        fwd = jax.jit(lambda p, *a: ours.apply({"params": p}, *a))
        fwd_bwd = jax.jit(jax.value_and_grad(lambda p, *a: jnp.mean(ours.apply({"params": p}, *a) ** 2)))
        for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, *inputs))
            first = time.perf_counter() - t0
            ours_fn = lambda: jax.block_until_ready(fn(params, *inputs))  # noqa: E731
            mine, diffusers = best_of([ours_fn, diffusers_fns[name]], args.repeats)
            label = f"{name} [{backend}]"
            ratio = mine / diffusers
            marks = [f"{'≤' + format(t, '.2f'):>6s}{'✓' if ratio <= t else '✗'}"
                     for t in (TARGETS[name], DESIGN_TARGET)]
            print(f"{label:28s} {mine:10.3f} {diffusers:14.3f} {ratio:15.2f} {' '.join(marks)} {first:12.2f}")


if __name__ == "__main__":
    main()
