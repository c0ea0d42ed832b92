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

from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hyvideo_jax.models.chunked_attention import chunked_attention
from hyvideo_jax.models.layers import ATTENTION_RESIDUALS
from hyvideo_jax.models.splash_attention import splash_attention


def xla_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=False):
    """Reference attention: the full [B, H, Lq, Lk] score matrix, fp32 logits and softmax."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = None
    if q_segment_ids is not None:
        mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    if causal:
        # Queries and keys are aligned at the start (self-attention without a cache).
        lower = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = lower if mask is None else mask & lower
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


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
    return out if backend == "chunked" else checkpoint_name(out, ATTENTION_RESIDUALS)
