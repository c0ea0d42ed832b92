"""Wall time follows the computed steps: the cached sampler (first-block cache) against the uncached one on this CPU.

A small random DiT (2 double + 14 single blocks, 256 image tokens, batch 1, no true CFG), 20 steps. The first-block
threshold is searched (bisection, every try the same compiled program) until 7 of 20 steps are computed; then the
uncached loop (`denoise.denoise`) and the cached one are timed (best of --repeats, after compiling) and the ratio
printed (target ≥ 2×), with the number of compiled variants of the cached loop (1: no recompilation across
thresholds and skip patterns).

    python -m benchmarks.sample_cache [--repeats=3] [--target=7]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hyvideo_jax import sample_cache  # noqa: E402
from hyvideo_jax.denoise import denoise  # noqa: E402
from hyvideo_jax.models.dit import HunyuanVideoDiT  # noqa: E402
from tests.test_dit_model import example_inputs, random_init, tiny_config  # noqa: E402

STEPS, LATENT = 20, (4, 16, 16)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=int, default=7, help="computed steps of the cached run")
    args = parser.parse_args()
    cfg = tiny_config(depth_double=2, depth_single=14, depth_refiner=1)
    params = jax.tree.map(np.asarray, random_init(cfg, example_inputs(cfg)))
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, *LATENT, cfg.in_channels)).astype(np.float32)
    cond = (rng.standard_normal((1, 5, cfg.text_states_dim)).astype(np.float32), np.ones((1, 5), np.int32),
            rng.standard_normal((1, cfg.pooled_text_dim)).astype(np.float32))
    model = HunyuanVideoDiT(cfg)
    kw = dict(steps=STEPS, shift=7.0, guidance=6.0)

    def cached(threshold):
        return sample_cache.denoise_cached(model, params, noise, *cond, **kw,
                                           cache=sample_cache.CacheConfig(kind="first_block", threshold=threshold))

    lo, hi = 0.0, 4.0
    result = cached(hi)
    for _ in range(40):   # fewer computed steps as the threshold grows
        mid = (lo + hi) / 2
        result = cached(mid)
        n = int(result.computed.sum())
        if n == args.target:
            break
        lo, hi = (mid, hi) if n > args.target else (lo, mid)
    threshold, n = mid, int(result.computed.sum())

    def best(fn):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return min(times)

    uncached = lambda: denoise(model, params, noise, *cond, **kw, progress=False)  # noqa: E731
    jax.block_until_ready(uncached())
    t_plain = best(uncached)
    t_cached = best(lambda: cached(threshold).latents)
    t_all = best(lambda: cached(0.0).latents)
    compiled = sample_cache._cached_loop._cache_size()
    print(f"first-block threshold {threshold:.4f}: {n}/{STEPS} steps computed ({result.summary()})")
    print(f"uncached {t_plain * 1e3:.0f} ms, cached (threshold 0: all steps) {t_all * 1e3:.0f} ms, cached "
          f"({n}/{STEPS}) {t_cached * 1e3:.0f} ms: {t_plain / t_cached:.2f}x faster (target >= 2x); "
          f"compiled variants of the cached loop: {compiled}")


if __name__ == "__main__":
    main()
