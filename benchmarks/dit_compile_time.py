"""Compile time of the DiT forward against depth (scan over stacked blocks): the 13B width and depth (20 double +
40 single blocks) against the same width with 1 + 1 blocks, compiled ahead of time from shapes only (nothing is
allocated), at a small latent so the figure is the compiler's, not the run's.

    python -m benchmarks.dit_compile_time [--width=13b|tiny]
"""

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import hunyuan_video_13b, tiny  # noqa: E402
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT  # noqa: E402


def compile_seconds(cfg: DiTConfig) -> float:
    model = HunyuanVideoDiT(cfg)
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    inputs = (spec((1, 2, 8, 8, cfg.in_channels)), spec((1,)), spec((1, 16, cfg.text_states_dim)),
              spec((1, 16), jnp.int32), spec((1, cfg.pooled_text_dim)), spec((1,)))
    params = jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *inputs)
    t0 = time.perf_counter()
    jax.jit(model.apply).lower(params, *inputs).compile()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", choices=("13b", "tiny"), default="13b")
    args = parser.parse_args()
    base = DiTConfig.from_config((hunyuan_video_13b if args.width == "13b" else tiny).get_config().model)
    rows = []
    for double, single in ((1, 1), (2, 2), (20, 40)):
        cfg = dataclasses.replace(base, depth_double=double, depth_single=single)
        rows.append((double + single, compile_seconds(cfg)))
    print(f"width {args.width} (hidden {base.hidden_size}), forward compile time by depth:")
    for blocks, seconds in rows:
        print(f"  {blocks:3d} blocks: {seconds:6.2f} s  ({seconds / rows[0][1]:.2f}× the 2-block compile)")


if __name__ == "__main__":
    main()
