"""3D rotary position embedding of HunyuanVideo (reference §1.5).

Positions are integer token indices (t, h, w) on the patch grid, flattened t-major like the tokens. The head
dimension is split t | h | w (16 | 56 | 56 for the 13B model); within each part, consecutive pairs (x[2i], x[2i+1])
are rotated by angle pos · θ^(-2i/d) (interleaved pairs, GPT-J style, not rotate-half). Computed in fp32.
"""

import jax.numpy as jnp
import numpy as np


def rope_tables(grid: tuple[int, int, int], axes_dim: tuple[int, ...], theta: float = 256.0):
    """cos and sin per token and rotation pair for a (T, H, W) token grid: two fp32 arrays [T·H·W, head_dim/2].

    Built with NumPy from static sizes, so they are constants under jit (no work per step).
    """
    for d in axes_dim:
        if d % 2:
            raise ValueError(f"every rope axis dim must be even, got rope_axes_dim={tuple(axes_dim)}")
    # fp32 throughout, as the references compute it, so the tables agree to the last bit or two.
    positions = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid], indexing="ij"), axis=-1)
    positions = positions.reshape(-1, 3)  # t-major, same order as the tokens
    angles = []
    for axis, d in enumerate(axes_dim):
        freqs = (1.0 / np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32)[: d // 2] / np.float32(d)))
        freqs = freqs.astype(np.float32)
        angles.append(positions[:, axis:axis + 1] * freqs[None])
    angles = np.concatenate(angles, axis=-1)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rope(x, cos, sin):
    """Rotate x [B, S, H, D] by tables [S, D/2] (interleaved pairs); computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
