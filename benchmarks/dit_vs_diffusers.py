"""Our jitted DiT against diffusers' HunyuanVideoTransformer3DModel (eager) on the same CPU, config and inputs.

Prints forward and forward+backward seconds for both and the ratio ours / diffusers (lower is better) beside its
targets: ≤ 0.8 for the forward and ≤ 1.0 for forward+backward, and the design target ≤ 0.67 (≥ 1.5× faster) for
both; for our `xla` and `chunked` attention backends (first-call time includes compile). Both sides run in turn,
best of `--repeats` rounds each.

Then the roofline of this machine, measured in the same run: the model FLOPs (the forward counted by torch's
`FlopCounterMode` on diffusers' model, its CPU flash attention included; forward+backward 3× that, no recompute), the
best fp32 matmul rate of XLA and torch here, each side's achieved rate in model FLOPs, and the rate a target needs:
nearly all the FLOPs are matmuls, so a target that needs more than the best matmul rate cannot be met on this CPU in
fp32, and one that needs close to it leaves no time for the softmax, norms and elementwise work.

Last, attention apart: both models again with their attention replaced by its values v (ours through a backend
registered here, diffusers' by standing in for torch's `scaled_dot_product_attention` during its calls), all four in
turn. What is left is each side's model without attention; the difference is each side's attention time (diffusers':
torch's fused CPU flash kernel, forward and backward). From these, the ratio ours / diffusers we would reach with an
attention exactly as fast as diffusers' (ours without attention + diffusers' attention time), and the attention time a
target leaves us: a target below that ratio needs an attention faster than torch's fused kernel.

Default: an 11.4M-parameter config, 1,344 tokens (1,280 image + 64 text), batch 2.

    python -m benchmarks.dit_vs_diffusers [--repeats=5] [--threads=2]
"""

import argparse
import contextlib
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402

from hyvideo_jax.convert import load_torch_dit  # noqa: E402
from hyvideo_jax.models import attention as attention_lib  # noqa: E402
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


# matmul shapes (m, k, n) of the model (its projections and MLP at 2,688 tokens, one head's QKᵀ and PV) and a square
GEMM_SHAPES = ((2688, 256, 1024), (2688, 1024, 256), (2688, 256, 1792), (1344, 64, 1344), (1344, 1344, 64),
               (2048, 2048, 2048))


def _count_cpu_flash_attention():
    """Teach torch's FLOP counter the CPU flash attention op (it knows the CUDA ones only)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op)(
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v))


def model_flops(fn) -> int:
    """FLOPs of a torch forward call (attention included)."""
    _count_cpu_flash_attention()
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_matmul_rate(repeats: int) -> tuple[float, str]:
    """The best fp32 matmul rate (FLOP/s) of XLA and torch on this machine over `GEMM_SHAPES`, and where it was."""
    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.matmul)
    best = (0.0, "")
    for m, k, n in GEMM_SHAPES:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        jax.block_until_ready(dot(ja, jb))
        t_jax, t_torch = best_of([lambda: jax.block_until_ready(dot(ja, jb)), lambda: torch.mm(ta, tb)],
                                 max(repeats, 10))
        for seconds, who in ((t_jax, "xla"), (t_torch, "torch")):
            best = max(best, (2 * m * k * n / seconds, f"{who} {m}x{k}x{n}"))
    return best


def print_roofline(flops: dict, ours: dict, diffusers: dict, repeats: int):
    """The model's FLOPs, the machine's best matmul rate, the achieved rates and what each target needs."""
    rate, where = best_matmul_rate(repeats)
    print(f"\nbest fp32 matmul rate here: {rate / 1e9:.0f} GFLOP/s ({where}); rates below in model FLOPs, ours "
          f"with its faster backend; floor: the ratio ours / diffusers of a model that ran every FLOP at that rate")
    print(f"{'':18s} {'GFLOP':>7s} {'ours GFLOP/s':>13s} {'diffusers GFLOP/s':>18s} {'floor/diffusers':>16s} "
          f"{'target needs GFLOP/s':>21s}")
    for name in TARGETS:
        need = flops[name] / (TARGETS[name] * diffusers[name])
        floor = flops[name] / rate / diffusers[name]
        print(f"{name:18s} {flops[name] / 1e9:7.1f} {flops[name] / ours[name] / 1e9:13.0f} "
              f"{flops[name] / diffusers[name] / 1e9:18.0f} {floor:16.2f} "
              f"{need / 1e9:10.0f} ({need / rate:.0%} of best)")


def jitted(cfg, backend: str) -> dict:
    """Our model's jitted forward and forward+backward (the loss as diffusers' side: mean square of the output)."""
    ours = HunyuanVideoDiT(dataclasses.replace(cfg, attention_backend=backend))
    return {"forward": jax.jit(lambda p, *a: ours.apply({"params": p}, *a)),
            "forward+backward": jax.jit(jax.value_and_grad(lambda p, *a: jnp.mean(ours.apply({"params": p}, *a) ** 2)))}


def _values(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=False):
    """Attention replaced by its values: timing what is left of a model (self-attention, so Lq = Lk). The barrier
    keeps q and k computed, as diffusers' eager forward computes them, instead of leaving them to dead-code removal."""
    return jax.lax.optimization_barrier((q, k, v))[2]


@contextlib.contextmanager
def torch_attention_replaced():
    """diffusers' attention (torch's `scaled_dot_product_attention`, which its processors look up at each call)
    replaced by its values while inside."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **kw: kw["value"] if "value" in kw else a[2]
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def print_attention_apart(cfg, with_attention: dict, params, inputs, diffusers_fns: dict, repeats: int):
    """Each model with and without its attention (ours with: `with_attention`, from `jitted`), all four in turn;
    the ratio an attention as fast as diffusers' would give, and the attention time each target leaves us."""
    attention_lib.BACKENDS.setdefault("values", _values)
    print("\nattention apart (without: both sides' attention replaced by its values; attention = with - without)")
    print(f"{'':18s} {'ours w/o (s)':>13s} {'diffusers w/o':>14s} {'ratio w/o':>10s} {'ours attn (s)':>14s} "
          f"{'diffusers attn':>15s} {'ratio, attention as diffusers':>30s} {'target leaves ours attn (s)':>28s}")
    programs = {"with": with_attention, "without": jitted(cfg, "values")}
    for name, diffusers_fn in diffusers_fns.items():
        def ours_fn(which, name=name):
            return lambda: jax.block_until_ready(programs[which][name](params, *inputs))

        def diffusers_without(fn=diffusers_fn):
            with torch_attention_replaced():
                fn()
        for warm in (ours_fn("with"), ours_fn("without"), diffusers_without):
            warm()
        ours_with, theirs_with, ours_without, theirs_without = best_of(
            [ours_fn("with"), diffusers_fn, ours_fn("without"), diffusers_without], repeats)
        ours_attention, theirs_attention = ours_with - ours_without, theirs_with - theirs_without
        as_theirs = (ours_without + theirs_attention) / theirs_with
        leaves = TARGETS[name] * theirs_with - ours_without
        print(f"{name:18s} {ours_without:13.3f} {theirs_without:14.3f} {ours_without / theirs_without:10.2f} "
              f"{ours_attention:14.3f} {theirs_attention:15.3f} {as_theirs:30.2f} "
              f"{leaves:10.3f} (≤{TARGETS[name]:.2f}: {leaves / theirs_attention:.2f}x diffusers')")


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
    forward_flops = model_flops(torch_fwd)
    flops = {"forward": forward_flops, "forward+backward": 3 * forward_flops}
    best = {"ours": {}, "diffusers": {}}
    print(f"{'':28s} {'ours (s)':>10s} {'diffusers (s)':>14s} {'ours/diffusers':>15s} {'target':>7s} "
          f"{'design':>7s} {'compile (s)':>12s}")
    programs = {backend: jitted(cfg, backend) for backend in ("xla", "chunked")}
    for backend, fns in programs.items():
        for name, fn in fns.items():
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
            best["ours"][name] = min(best["ours"].get(name, mine), mine)
            best["diffusers"][name] = min(best["diffusers"].get(name, diffusers), diffusers)
    print_roofline(flops, best["ours"], best["diffusers"], args.repeats)
    print_attention_apart(cfg, programs["xla"], params, inputs, diffusers_fns, args.repeats)


if __name__ == "__main__":
    main()
