"""Compiled peak temporary memory of attention forward+backward against sequence length, per backend.

`chunked` (blockwise online softmax) should grow linearly with the number of tokens, `xla` (the full score
matrix) quadratically. Figures come from `compiled.memory_analysis()`; nothing is run.

    python -m benchmarks.attention_memory [--heads=24 --head-dim=128]
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hyvideo_jax.models.attention import BACKENDS  # noqa: E402


def temp_bytes(backend: str, length: int, heads: int, head_dim: int) -> int:
    x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
    fn = BACKENDS[backend]
    loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s, s).astype(jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    lengths = (2048, 4096, 8192, 16384)
    print(f"attention forward+backward temporaries, {args.heads} heads × {args.head_dim}, bf16, batch 1")
    print(f"{'tokens':>8s} {'chunked (MiB)':>14s} {'xla (MiB)':>12s}")
    base = None
    for n in lengths:
        c = temp_bytes("chunked", n, args.heads, args.head_dim)
        x = temp_bytes("xla", n, args.heads, args.head_dim) if n <= 8192 else None
        base = base or (c, x)
        xs = f"{x / 2**20:12.1f}" if x is not None else f"{'(skipped)':>12s}"
        print(f"{n:8d} {c / 2**20:14.1f} {xs}   chunked ×{c / base[0]:.1f}" +
              (f", xla ×{x / base[1]:.1f}" if x is not None else "") + f" for ×{n // lengths[0]} tokens")


if __name__ == "__main__":
    main()
