"""Blockwise attention in pure JAX (online softmax, FlashAttention-style) with a hand-written backward pass.

Memory is linear in sequence length: the forward visits [block_q × block_k] score tiles, keeping per query only a
running max, normalizer and fp32 accumulator, and saves the log-sum-exp; the backward recomputes each tile from it
instead of storing probabilities. Semantics are those of `attention.xla_attention`: segment ids (a query sees the
keys of its own segment), optional causal mask, fp32 softmax, scale 1/sqrt(D). A query that sees no key at all
returns zeros (cannot happen with the DiT's segments, where every token is in the segment of itself).
"""

import functools

import jax
import jax.numpy as jnp

_Q_PAD, _K_PAD = -2, -1  # segment ids of padding rows / columns: they match nothing


def _blocks(x, n, size, pad_value=0):
    """[B, L, ...] → [n, B, size, ...], padding L up to n·size."""
    pad = n * size - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _unblock(x, length):
    """[n, B, size, ...] → [B, length, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


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


def _forward(q, k, v, qseg, kseg, causal, block_q, block_k):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    qb, qsb = _blocks(q, nq, block_q), _blocks(qseg, nq, block_q, _Q_PAD)
    kb, vb, ksb = _blocks(k, nk, block_k), _blocks(v, nk, block_k), _blocks(kseg, nk, block_k, _K_PAD)

    def one_q_block(args):
        qi, q_blk, qs = args

        def step(carry, xs):
            kj, k_blk, v_blk, ks = xs
            mask = _tile_mask(qs, ks, qi, kj, block_q, block_k, causal)
            return online_softmax_step(carry, q_blk, k_blk, v_blk, mask, scale), None

        init = online_softmax_init(b, block_q, h, d)
        state, _ = jax.lax.scan(step, init, (jnp.arange(nk), kb, vb, ksb))
        out, lse = online_softmax_finish(state)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(one_q_block, (jnp.arange(nq), qb, qsb))
    return _unblock(out, lq), lse  # lse stays blocked: [nq, B, H, bq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _chunked(q, k, v, qseg, kseg, causal, block_q, block_k):
    return _forward(q, k, v, qseg, kseg, causal, block_q, block_k)[0]


def _chunked_fwd(q, k, v, qseg, kseg, causal, block_q, block_k):
    out, lse = _forward(q, k, v, qseg, kseg, causal, block_q, block_k)
    return out, (q, k, v, qseg, kseg, out, lse)


def _chunked_bwd(causal, block_q, block_k, residuals, d_out):
    q, k, v, qseg, kseg, out, lse = residuals
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    qb, qsb, dob = _blocks(q, nq, block_q), _blocks(qseg, nq, block_q, _Q_PAD), _blocks(d_out, nq, block_q)
    deltab = jnp.moveaxis(_blocks(jnp.moveaxis(delta, 2, 1), nq, block_q), 3, 2)  # [nq, B, H, bq]
    kb, vb, ksb = _blocks(k, nk, block_k), _blocks(v, nk, block_k), _blocks(kseg, nk, block_k, _K_PAD)

    def q_step(dkv, xs):
        qi, q_blk, qs, do_blk, lse_blk, delta_blk = xs

        def k_step(dq, ys):
            kj, k_blk, v_blk, ks = ys
            s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            mask = _tile_mask(qs, ks, qi, kj, block_q, block_k, causal)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
            dv = jnp.einsum("bhqk,bqhd->bkhd", p, do_blk.astype(jnp.float32))
            dp = jnp.einsum("bqhd,bkhd->bhqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None]) * scale
            dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk.astype(jnp.float32))
            dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q_blk.astype(jnp.float32))
            return dq, (dk, dv)

        dq, (dk, dv) = jax.lax.scan(k_step, jnp.zeros((b, block_q, h, d), jnp.float32), (jnp.arange(nk), kb, vb, ksb))
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = jnp.zeros((nk, b, block_k, h, d), jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), (jnp.arange(nq), qb, qsb, dob, lse, deltab))
    return (_unblock(dq, lq).astype(q.dtype), _unblock(dk, lk).astype(k.dtype), _unblock(dv, lk).astype(v.dtype),
            None, None)


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
