"""The one attention entry point of the project.

`attention(q, k, v, q_segment_ids, kv_segment_ids, backend=...)` takes q [B, Lq, H, D], k and v [B, Lk, H, D]
and optional int segment ids [B, Lq] / [B, Lk]: a query attends exactly to the keys of its own segment. The DiT
gives image and valid text tokens segment 1 and padded text tokens segment 2, which is the official
(flash-attn varlen) semantics: padding never reaches image or valid text. With `causal=True` a query at
position i also sees only keys at positions <= i (the text encoders' decoder mask). Softmax is computed in fp32;
the scale is 1/sqrt(D).

Backends are registered by name in `BACKENDS`; the config picks one (`model.attention_backend`):
  xla      the full score matrix (reference; fastest for short sequences on CPU),
  chunked  blockwise online softmax with its own backward, memory linear in sequence length (long sequences),
  cudnn    `jax.nn.dot_product_attention` with cuDNN on GPU, padding masked by key lengths,
  splash   Pallas splash attention on TPU with segment ids (`hyvideo_jax.models.splash_attention`).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hyvideo_jax.models.chunked_attention import chunked_attention, softmax_scale, tag_residuals
from hyvideo_jax.models.layers import ATTENTION_RESIDUALS
from hyvideo_jax.models.splash_attention import splash_attention


def _full_mask(q_segment_ids, kv_segment_ids, lq, lk, causal):
    """[B | 1, 1, Lq, Lk] bool: the keys each query may see; None when it sees them all."""
    mask = None
    if q_segment_ids is not None:
        mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    if causal:
        # Queries and keys are aligned at the start (self-attention without a cache).
        lower = jnp.tril(jnp.ones((lq, lk), bool))[None, None]
        mask = lower if mask is None else mask & lower
    return mask


def _full_logits(q, k, mask):
    """Scaled fp32 logits [B, H, Lq, Lk]; masked ones are the lowest float, so a masked key weighs 0 next to any
    visible one."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * softmax_scale(q)
    return logits if mask is None else jnp.where(mask, logits, jnp.finfo(jnp.float32).min)


def _full_forward(q, k, v, q_segment_ids, kv_segment_ids, causal):
    """(output [B, Lq, H, D] in q's dtype, log-sum-exp [B, H, Lq] fp32)."""
    logits = _full_logits(q, k, _full_mask(q_segment_ids, kv_segment_ids, q.shape[1], k.shape[1], causal))
    peak = logits.max(-1, keepdims=True)
    unnormalized = jnp.exp(logits - peak)
    total = unnormalized.sum(-1, keepdims=True)
    # Normalizing the score matrix before the product with v (rather than the product after it) is what XLA:CPU fuses
    # best: one kernel for the softmax and the product, 20 % faster over the DiT's forward.
    probs = (unnormalized / total).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), (peak + jnp.log(total))[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _full(q, k, v, q_segment_ids, kv_segment_ids, causal):
    return _full_forward(q, k, v, q_segment_ids, kv_segment_ids, causal)[0]


def _full_fwd(q, k, v, q_segment_ids, kv_segment_ids, causal):
    out, lse = tag_residuals(*_full_forward(q, k, v, q_segment_ids, kv_segment_ids, causal))
    return out, (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _full_bwd(causal, residuals, d_out):
    """Recompute the probabilities P from q, k and the log-sum-exp instead of keeping a score matrix per layer:
    dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dq = dS k · scale, dk = dSᵀ q · scale, dv = Pᵀ dO."""
    q, k, v, q_segment_ids, kv_segment_ids, out, lse = residuals
    scale = softmax_scale(q)
    logits = _full_logits(q, k, _full_mask(q_segment_ids, kv_segment_ids, q.shape[1], k.shape[1], causal))
    p = jnp.exp(logits - lse[..., None])
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_out = d_out.astype(v.dtype)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(v.dtype), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_full.defvjp(_full_fwd, _full_bwd)


def xla_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=False):
    """Reference attention: the full [B, H, Lq, Lk] score matrix, fp32 logits and softmax. Its backward recomputes
    the scores from q, k and the saved log-sum-exp (like the blockwise kernels), so a stack of layers keeps
    [B, L, H, D] arrays per layer for it, not score matrices."""
    return _full(q, k, v, q_segment_ids, kv_segment_ids, causal)


def cudnn_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=False, *, implementation="cudnn"):
    """`jax.nn.dot_product_attention` (cuDNN flash attention on GPU), masking padding by key lengths.

    Needs segment ids laid out as the DiT and the text encoders lay them out: one valid segment (id 1) then
    padding (any other id) per row. Keys past the valid length are masked for every query, so image and valid
    text tokens get exactly the segment-id result; padded queries see the valid keys (diffusers' semantics), a
    difference confined to outputs nobody reads.
    """
    lengths = None
    if kv_segment_ids is not None:
        lengths = jnp.sum(kv_segment_ids == 1, axis=-1).astype(jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, is_causal=causal,
                                       implementation=implementation)
    return out.astype(q.dtype)


BACKENDS: dict[str, Callable] = {
    "xla": xla_attention,
    "chunked": chunked_attention,
    "cudnn": cudnn_attention,
    "splash": splash_attention,
}


def attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal: bool = False, backend: str = "xla",
              splash=None):
    """Multi-head attention with segment-id masking; see the module docstring for shapes and semantics. `splash`:
    the splash kernels' block sizes (`SplashBlocks`; default its defaults), used by the "splash" backend.

    What the backward needs from the forward is tagged "attention" for the remat policies (`REMAT_POLICIES`): the
    output and log-sum-exp of the kernels with their own backward (splash, chunked), the output otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {sorted(BACKENDS)}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if backend == "splash":
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, blocks=splash)
    out = BACKENDS[backend](q, k, v, q_segment_ids, kv_segment_ids, causal=causal)
    return out if backend in ("chunked", "xla") else checkpoint_name(out, ATTENTION_RESIDUALS)
