"""Sequence-parallel joint attention over the mesh axis of the logical 'seq' axis ('sequence' in the rules table),
expressed with `shard_map`.

The joint sequence is [image tokens, text tokens]. Image tokens are split over 'sequence'; the (short, padded)
text is replicated on every device of the axis. Two methods:

* **Ulysses** (all-to-all): each device trades its image-token slice of every head for the full image sequence of
  H/S heads, takes its H/S heads of the text, runs ordinary attention (any backend), and trades back. Needs the
  local head count divisible by the axis size S.
* **Ring**: each device keeps its image-token queries (plus the text queries) and passes image K/V blocks around
  the ring with `ppermute`, folding each block in with an online softmax; the text K/V are local everywhere. Works
  for any head count. Blockwise with its own backward (FlashAttention-2 tiles of `RING_BLOCK` queries × keys,
  the tile math of `models.chunked_attention`): only q, k, v, the output and the log-sum-exp are kept, and the
  backward sends the K/V blocks round the ring again with their dK/dV, so memory is linear in tokens.

Outside a mesh, or with a sequence axis of size 1, `joint_attention` is plain attention.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hyvideo_jax.models.attention import attention
from hyvideo_jax.models.chunked_attention import (blocked_state, finish_blocks, fold_key_grads, fold_keys, from_blocks,
                                                  grad_blocks, key_blocks, query_blocks, tag_residuals)
from hyvideo_jax.parallel.sharding import mesh_axes_of, split_or_warn

METHODS = ("auto", "ulysses", "ring", "none")


def _axis_sizes():
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def joint_attention(q, k, v, segment_ids, n_img: int, *, backend: str = "xla", method: str = "auto", splash=None):
    """Attention over one joint sequence [image (n_img tokens, segment 1), text] with segment ids [B, L]: the
    concatenated form of `joint_attention_split`, which see."""
    split = lambda x: (x[:, :n_img], x[:, n_img:])
    out_img, out_txt = joint_attention_split(*split(q), *split(k), *split(v), segment_ids[:, n_img:], backend=backend,
                                             method=method, splash=splash)
    return jnp.concatenate([out_img, out_txt], axis=1)


def joint_attention_split(q_img, q_txt, k_img, k_txt, v_img, v_txt, text_segment_ids, *, backend: str = "xla",
                          method: str = "auto", splash=None):
    """Attention over [image tokens, text tokens] given as two arrays each of q, k, v ([B, N, H, D] and
    [B, Lt, H, D]) → (image output, text output). Image tokens are segment 1; text tokens have
    `text_segment_ids` [B, Lt] (1 valid, anything else padding).

    Sequence-parallel under a mesh whose axis for the logical 'seq' axis (the rules table) has more than one device:
    the image arrays arrive split over it and leave split over it, the text arrays replicated, so nothing is
    resharded around the call. Batch and heads are split over the mesh axes of 'batch' and 'act_heads' when they
    divide, else a warning says the work is repeated."""
    b, n_img, h, _ = q_img.shape
    image_segment_ids = jnp.ones((b, n_img), text_segment_ids.dtype)
    sizes = _axis_sizes()
    seq_axes = mesh_axes_of("seq", sizes)
    if not seq_axes or method == "none":
        seg = jnp.concatenate([image_segment_ids, text_segment_ids], axis=1)
        out = attention(*(jnp.concatenate(pair, axis=1) for pair in ((q_img, q_txt), (k_img, k_txt), (v_img, v_txt))),
                        seg, seg, backend=backend, splash=splash)
        return out[:, :n_img], out[:, n_img:]
    if method not in METHODS:
        raise ValueError(f"sequence_parallel must be one of {METHODS}, got {method!r}")
    if len(seq_axes) != 1:
        raise ValueError(f"sequence parallelism runs over one mesh axis; the rules map 'seq' to {seq_axes}")
    axis = seq_axes[0]
    s = sizes[axis]
    if n_img % s:
        raise ValueError(f"{n_img} image tokens do not split over the sequence axis of size {s}")
    batch = split_or_warn("sequence-parallel attention: a batch", b, mesh_axes_of("batch", sizes), sizes,
                          "Make the batch a multiple of it, or move those devices to the sequence axis.")
    tensor = split_or_warn("sequence-parallel attention: a head count", h, mesh_axes_of("act_heads", sizes), sizes,
                           "Use a tensor axis that divides the heads.")
    local_heads = h // (math.prod(sizes[a] for a in tensor) if tensor else 1)
    if method == "auto":
        method = "ulysses" if local_heads % s == 0 else "ring"
    if method == "ulysses" and local_heads % s:
        raise ValueError(f"Ulysses needs the {local_heads} heads per device divisible by the sequence axis size "
                         f"{s}; use sequence_parallel='ring'")
    img_spec, txt_spec = P(batch, axis, tensor, None), P(batch, None, tensor, None)
    seg_img_spec, seg_txt_spec = P(batch, axis), P(batch, None)
    body = _ulysses if method == "ulysses" else _ring
    fn = jax.shard_map(
        lambda *a: body(*a, axis=axis, n_shards=s, backend=backend, splash=splash),
        in_specs=(img_spec,) * 3 + (txt_spec,) * 3 + (seg_img_spec, seg_txt_spec),
        out_specs=(img_spec, txt_spec), check_vma=False)
    return fn(q_img, k_img, v_img, q_txt, k_txt, v_txt, image_segment_ids, text_segment_ids)


def _ulysses(qi, ki, vi, qt, kt, vt, si, st, *, axis, n_shards, backend, splash):
    """Per device: image [b, n/S, h, d] → [b, n, h/S, d] by all-to-all; text sliced to the same h/S heads."""
    to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
    hs = qi.shape[2] // n_shards
    own = lambda x: jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * hs, hs, axis=2)
    n = qi.shape[1] * n_shards
    q = jnp.concatenate([to_heads(qi), own(qt)], axis=1)
    k = jnp.concatenate([to_heads(ki), own(kt)], axis=1)
    v = jnp.concatenate([to_heads(vi), own(vt)], axis=1)
    # Image tokens are all segment 1 (joint_attention_split), so the gathered image segment ids are ones.
    seg = jnp.concatenate([jnp.ones((si.shape[0], n), si.dtype), st], axis=1)
    out = attention(q, k, v, seg, seg, backend=backend, splash=splash)
    out_img = jax.lax.all_to_all(out[:, :n], axis, split_axis=1, concat_axis=2, tiled=True)
    out_txt = jax.lax.all_gather(out[:, n:], axis, axis=2, tiled=True)
    return out_img, out_txt


RING_BLOCK = 512  # query and key tile length of ring attention, clipped to the local lengths


def _ring(qi, ki, vi, qt, kt, vt, si, st, *, axis, n_shards, backend, splash):
    """Per device: queries [own image slice, text]; image K/V slices travel the ring, text K/V stay local."""
    del backend, splash  # the ring folds blocks itself with the online softmax
    out = _ring_attention(qi, qt, ki, vi, kt, vt, si, st, axis, n_shards, RING_BLOCK, RING_BLOCK)
    n = qi.shape[1]
    # Every device computed the text rows over the same keys (in another order): average them so that the
    # replicated output is identical everywhere.
    return out[:, :n], jax.lax.pmean(out[:, n:], axis)


def _pass_on(tree, axis, n_shards):
    """Send to the next device of the ring (j → j + 1 mod n_shards)."""
    return jax.lax.ppermute(tree, axis, [(j, (j + 1) % n_shards) for j in range(n_shards)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _ring_attention(qi, qt, ki, vi, kt, vt, si, st, axis, n_shards, block_q, block_k):
    """This device's output [b, n + t, h, d] for its queries [qi, qt] against the local text K/V and the image K/V
    of every device of the ring (text rows not yet averaged over the ring). Blockwise both ways: tiles of at most
    block_q queries × block_k keys, and only q, k, v, segment ids, the output and the log-sum-exp are kept for
    the backward, so memory is linear in tokens."""
    return _ring_forward(qi, qt, ki, vi, kt, vt, si, st, axis, n_shards, block_q, block_k)[0]


def _ring_queries(qi, qt, si, st, block_q):
    """This device's queries [image slice, text] and their blocks (`query_blocks`)."""
    q = jnp.concatenate([qi, qt], axis=1)
    return q, query_blocks(q, jnp.concatenate([si, st], axis=1), min(block_q, q.shape[1]))


def _ring_forward(qi, qt, ki, vi, kt, vt, si, st, axis, n_shards, block_q, block_k):
    q, qb = _ring_queries(qi, qt, si, st, block_q)
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    state = blocked_state(qb)
    if kt.shape[1]:
        state = fold_keys(state, qb, key_blocks(kt, vt, st, min(block_k, kt.shape[1])), scale)

    def ring_step(_, carry):  # fold the visiting image block in while it is sent on
        state, kvb = carry
        return fold_keys(state, qb, kvb, scale), _pass_on(kvb, axis, n_shards)
    image = key_blocks(ki, vi, si, min(block_k, ki.shape[1]))
    state, image = jax.lax.fori_loop(0, n_shards - 1, ring_step, (state, image))
    out, lse = finish_blocks(fold_keys(state, qb, image, scale), q.dtype)
    return from_blocks(out, q.shape[1]), lse  # lse stays blocked: [nq, b, h, bq]


def _ring_fwd(qi, qt, ki, vi, kt, vt, si, st, axis, n_shards, block_q, block_k):
    out, lse = tag_residuals(*_ring_forward(qi, qt, ki, vi, kt, vt, si, st, axis, n_shards, block_q, block_k))
    return out, (qi, qt, ki, vi, kt, vt, si, st, out, lse)


def _ring_bwd(axis, n_shards, block_q, block_k, residuals, d_out):
    """The image K/V blocks go round the ring again, each with its dK/dV accumulator, which arrives home after
    n_shards hops; dQ and the text dK/dV accumulate locally. Cotangents are this device's share, as for the
    forward: shard_map's transpose sums the replicated inputs' (text) over the axis."""
    qi, qt, ki, vi, kt, vt, si, st, out, lse = residuals
    q, qb = _ring_queries(qi, qt, si, st, block_q)
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    gb = grad_blocks(d_out, out, lse, qb[0].shape[2])
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    dq, dkt, dvt = zeros(qb[0]), jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32)
    if kt.shape[1]:
        text = key_blocks(kt, vt, st, min(block_k, kt.shape[1]))
        dq, dkt, dvt = fold_key_grads((dq, zeros(text[0]), zeros(text[1])), qb, gb, text, scale)
        dkt, dvt = from_blocks(dkt, kt.shape[1]), from_blocks(dvt, kt.shape[1])

    def ring_step(_, carry):  # add this device's part of the visiting block's dK/dV, then send both on
        dq, kvb, dk, dv = carry
        dq, dk, dv = fold_key_grads((dq, dk, dv), qb, gb, kvb, scale)
        return (dq, *_pass_on((kvb, dk, dv), axis, n_shards))
    image = key_blocks(ki, vi, si, min(block_k, ki.shape[1]))
    dq, image, dk, dv = jax.lax.fori_loop(0, n_shards - 1, ring_step, (dq, image, zeros(image[0]), zeros(image[1])))
    dq, dk, dv = fold_key_grads((dq, dk, dv), qb, gb, image, scale)
    dk, dv = _pass_on((dk, dv), axis, n_shards)  # the last hop home
    dq, n = from_blocks(dq, q.shape[1]), qi.shape[1]
    return (dq[:, :n].astype(qi.dtype), dq[:, n:].astype(qt.dtype), from_blocks(dk, n).astype(ki.dtype),
            from_blocks(dv, n).astype(vi.dtype), dkt.astype(kt.dtype), dvt.astype(vt.dtype), None, None)


_ring_attention.defvjp(_ring_fwd, _ring_bwd)
