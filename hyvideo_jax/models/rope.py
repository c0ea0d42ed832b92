"""3D rotary position embedding of HunyuanVideo (reference §1.5).

Positions are integer token indices (t, h, w) on the patch grid, flattened t-major like the tokens. The head
dimension is split t | h | w (16 | 56 | 56 for the 13B model); within each part, consecutive pairs (x[2i], x[2i+1])
are rotated by angle pos · θ^(-2i/d) (interleaved pairs, GPT-J style, not rotate-half). Computed in fp32.
"""

import jax.numpy as jnp
import numpy as np


def rope_tables(grid: tuple[int, int, int], axes_dim: tuple[int, ...], theta: float = 256.0):
    """cos and sin per token and rotation pair for a (T, H, W) token grid: two fp32 arrays [T·H·W, head_dim/2].

    Computed in the graph from iotas (only the head_dim/2 frequencies are constants): baked in as constants, the
    tables of a 720p video would add ~61 MB to the program and to every device's memory.
    """
    for d in axes_dim:
        if d % 2:
            raise ValueError(f"every rope axis dim must be even, got rope_axes_dim={tuple(axes_dim)}")
    # fp32 throughout, as the references compute it (the frequencies in NumPy as they do, then pos · freq).
    freqs = np.concatenate([(1.0 / np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32)[: d // 2]
                                                        / np.float32(d))).astype(np.float32) for d in axes_dim])
    owner = np.repeat(np.arange(3), [d // 2 for d in axes_dim])          # which grid axis each pair rotates by
    index = jnp.arange(int(np.prod(grid)), dtype=jnp.int32)              # tokens, t-major
    strides = (grid[1] * grid[2], grid[2], 1)
    positions = jnp.stack([(index // strides[a]) % grid[a] for a in range(3)], axis=-1).astype(jnp.float32)
    angles = positions[:, owner] * jnp.asarray(freqs)[None]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x [B, S, H, D] by tables [S, D/2] (interleaved pairs); computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
