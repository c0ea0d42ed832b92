"""Blockwise attention in pure JAX (online softmax, FlashAttention-style) with a hand-written backward pass.

Memory is linear in sequence length: the forward visits [block_q × block_k] score tiles, keeping per query only a
running max, normalizer and fp32 accumulator, and saves the log-sum-exp; the backward recomputes each tile from it
instead of storing probabilities. Semantics are those of `attention.xla_attention`: segment ids (a query sees the
keys of its own segment), optional causal mask, fp32 softmax, scale 1/sqrt(D). A query that sees no key at all
returns zeros (cannot happen with the DiT's segments, where every token is in the segment of itself).

The tile math is shared with ring attention (`hyvideo_jax.parallel.sequence`), which folds the key/value blocks
that visit a device into the same blocked state:

    qb, kvb = query_blocks(q, q_seg, block_q), key_blocks(k, v, kv_seg, block_k)   # [n, B, block, ...]
    state = fold_keys(blocked_state(qb), qb, kvb, scale)   # once per set of key/value blocks (e.g. a ring step)
    out, lse = finish_blocks(state, q.dtype)               # out: from_blocks(out, Lq) is [B, Lq, H, D]
    gb = grad_blocks(d_out, from_blocks(out, Lq), lse, block_q)
    dq, dk, dv = fold_key_grads((dq, dk, dv), qb, gb, kvb, scale)   # fp32 accumulators, once per set as well
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hyvideo_jax.models.layers import ATTENTION_RESIDUALS

_Q_PAD, _K_PAD = -2, -1  # segment ids of padding rows / columns: they match nothing


def softmax_scale(q):
    """1/sqrt(D) for q [..., D]."""
    return 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))


def _blocks(x, size, pad_value=0):
    """[B, L, ...] → [ceil(L / size), B, size, ...], padding L up to a multiple of size."""
    n = -(-x.shape[1] // size)
    x = jnp.pad(x, [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def from_blocks(x, length):
    """[n, B, size, ...] → [B, length, ...]: the inverse of the blocking (padding dropped)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def query_blocks(q, segment_ids, block):
    """q [B, L, H, D], segment ids [B, L] → (q [n, B, block, H, D], segment ids [n, B, block]); padding matches
    no key."""
    return _blocks(q, block), _blocks(segment_ids, block, _Q_PAD)


def key_blocks(k, v, segment_ids, block):
    """k, v [B, L, H, D], segment ids [B, L] → (k, v [n, B, block, H, D], segment ids [n, B, block]); padding is
    seen by no query."""
    return _blocks(k, block), _blocks(v, block), _blocks(segment_ids, block, _K_PAD)


def _tile_mask(qs, ks, qi, kj, block_q, block_k, causal):
    """[B, 1, bq, bk] bool: which keys of tile (qi, kj) each query of it may see."""
    mask = qs[:, None, :, None] == ks[:, None, None, :]
    if causal:
        q_pos = qi * block_q + jnp.arange(block_q)
        k_pos = kj * block_k + jnp.arange(block_k)
        mask = mask & (q_pos[:, None] >= k_pos[None, :])[None, None]
    return mask


def online_softmax_init(b, lq, h, d):
    """(running max, normalizer, accumulator) for queries [b, lq, h, d]: -inf, 0, 0."""
    return (jnp.full((b, h, lq), -jnp.inf, jnp.float32), jnp.zeros((b, h, lq), jnp.float32),
            jnp.zeros((b, lq, h, d), jnp.float32))


def online_softmax_step(state, q, k, v, mask, scale):
    """Fold the keys/values k, v [b, lk, h, d] (visible where mask [b, 1|h, lq, lk]) into the state of q."""
    m, l, acc = state
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
    correction = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    l = l * correction + p.sum(-1)
    pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc = acc * jnp.moveaxis(correction, 1, 2)[..., None] + pv
    return m_new, l, acc


def online_softmax_finish(state):
    """(output [b, lq, h, d] fp32, log-sum-exp [b, h, lq]); rows that saw no key give 0 and lse = +inf."""
    m, l, acc = state
    out = acc / jnp.moveaxis(jnp.maximum(l, 1e-30), 1, 2)[..., None]
    lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.maximum(l, 1e-30)), jnp.inf)
    return out, lse


def blocked_state(qb):
    """The online-softmax state (m, l [n, B, H, bq], acc [n, B, bq, H, D]) of query blocks qb (`query_blocks`),
    each block's as `online_softmax_init`."""
    n, b, bq, h, d = qb[0].shape
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), online_softmax_init(b, bq, h, d))


def fold_keys(state, qb, kvb, scale, causal=False):
    """Fold key/value blocks kvb = (k, v [nk, B, bk, H, D], segment ids [nk, B, bk]) into the blocked state of
    the query blocks qb = (q [nq, B, bq, H, D], segment ids [nq, B, bq]), one [bq × bk] tile at a time, updating
    the state in place. `causal` compares positions within these blocks (queries and keys aligned at the start)."""
    (q, qseg), (k, v, kseg) = qb, kvb
    block_q, block_k = q.shape[2], k.shape[2]

    def one_q_block(qi, state):
        q_blk, qs = q[qi], qseg[qi]

        def step(kj, carry):
            mask = _tile_mask(qs, kseg[kj], qi, kj, block_q, block_k, causal)
            return online_softmax_step(carry, q_blk, k[kj], v[kj], mask, scale)
        blk_state = jax.lax.fori_loop(0, k.shape[0], step, tuple(x[qi] for x in state))
        return tuple(x.at[qi].set(y) for x, y in zip(state, blk_state))
    return jax.lax.fori_loop(0, q.shape[0], one_q_block, tuple(state))


def finish_blocks(state, dtype):
    """Blocked state → (output [n, B, bq, H, D] in dtype, log-sum-exp [n, B, H, bq] fp32)."""
    out, lse = jax.vmap(online_softmax_finish)(state)
    return out.astype(dtype), lse


def grad_blocks(d_out, out, lse, block):
    """What the backward needs per query block besides q: (d_out [n, B, bq, H, D], lse and delta = rowsum(d_out ·
    out) [n, B, H, bq]), from d_out and out [B, L, H, D] and the forward's blocked lse."""
    delta = jnp.einsum("bqhd,bqhd->bqh", d_out.astype(jnp.float32), out.astype(jnp.float32))
    return _blocks(d_out, block), lse, jnp.moveaxis(_blocks(delta, block), 3, 2)


def fold_key_grads(grads, qb, gb, kvb, scale, causal=False):
    """Add the gradients of the tiles of query blocks qb (see `fold_keys`) against key/value blocks kvb to grads =
    (dq [nq, B, bq, H, D], dk, dv [nk, B, bk, H, D]) fp32, in place, recomputing each tile's probabilities from
    the lse of gb = `grad_blocks(...)`."""
    (q, qseg), (d_out, lse, delta), (k, v, kseg) = qb, gb, kvb
    block_q, block_k = q.shape[2], k.shape[2]

    def q_step(qi, grads):
        dq, dk, dv = grads
        q_blk, qs, do_blk, lse_blk, delta_blk = q[qi], qseg[qi], d_out[qi], lse[qi], delta[qi]

        def k_step(kj, carry):
            dq_blk, dk, dv = carry
            k_blk, v_blk = k[kj], v[kj]
            s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            mask = _tile_mask(qs, kseg[kj], qi, kj, block_q, block_k, causal)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
            dv = dv.at[kj].add(jnp.einsum("bhqk,bqhd->bkhd", p, do_blk.astype(jnp.float32)))
            dp = jnp.einsum("bqhd,bkhd->bhqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None]) * scale
            dq_blk = dq_blk + jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk.astype(jnp.float32))
            dk = dk.at[kj].add(jnp.einsum("bhqk,bqhd->bkhd", ds, q_blk.astype(jnp.float32)))
            return dq_blk, dk, dv

        dq_blk, dk, dv = jax.lax.fori_loop(0, k.shape[0], k_step, (dq[qi], dk, dv))
        return dq.at[qi].set(dq_blk), dk, dv
    return jax.lax.fori_loop(0, q.shape[0], q_step, tuple(grads))


def _forward(q, k, v, qseg, kseg, causal, block_q, block_k):
    qb = query_blocks(q, qseg, block_q)
    state = fold_keys(blocked_state(qb), qb, key_blocks(k, v, kseg, block_k), softmax_scale(q), causal)
    out, lse = finish_blocks(state, q.dtype)
    return from_blocks(out, q.shape[1]), lse  # lse stays blocked: [nq, B, H, bq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _chunked(q, k, v, qseg, kseg, causal, block_q, block_k):
    return _forward(q, k, v, qseg, kseg, causal, block_q, block_k)[0]


def tag_residuals(out, lse):
    """Tag what the backward needs from the forward (output, log-sum-exp) for the remat policies that keep it, so
    that attention is not recomputed under them (`layers.REMAT_POLICIES`)."""
    return checkpoint_name(out, ATTENTION_RESIDUALS), checkpoint_name(lse, ATTENTION_RESIDUALS)


def _chunked_fwd(q, k, v, qseg, kseg, causal, block_q, block_k):
    out, lse = tag_residuals(*_forward(q, k, v, qseg, kseg, causal, block_q, block_k))
    return out, (q, k, v, qseg, kseg, out, lse)


def _chunked_bwd(causal, block_q, block_k, residuals, d_out):
    q, k, v, qseg, kseg, out, lse = residuals
    qb, kvb = query_blocks(q, qseg, block_q), key_blocks(k, v, kseg, block_k)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    dq, dk, dv = fold_key_grads((zeros(qb[0]), zeros(kvb[0]), zeros(kvb[1])), qb,
                                grad_blocks(d_out, out, lse, block_q), kvb, softmax_scale(q), causal)
    return (from_blocks(dq, q.shape[1]).astype(q.dtype), from_blocks(dk, k.shape[1]).astype(k.dtype),
            from_blocks(dv, k.shape[1]).astype(v.dtype), None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=False, *, block_q: int = 512,
                      block_k: int = 512):
    """Blockwise attention, q [B, Lq, H, D], k/v [B, Lk, H, D] → [B, Lq, H, D]; see the module docstring."""
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
    block_q, block_k = min(block_q, q.shape[1]), min(block_k, k.shape[1])
    return _chunked(q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32), causal,
                    block_q, block_k)
