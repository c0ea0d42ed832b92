"""Sequence-parallel joint attention over the mesh axis 'sequence', expressed with `shard_map`.

The joint sequence is [image tokens, text tokens]. Image tokens are split over 'sequence'; the (short, padded)
text is replicated on every device of the axis. Two methods:

* **Ulysses** (all-to-all): each device trades its image-token slice of every head for the full image sequence of
  H/S heads, takes its H/S heads of the text, runs ordinary attention (any backend), and trades back. Needs the
  local head count divisible by the axis size S.
* **Ring**: each device keeps its image-token queries (plus the text queries) and passes image K/V blocks around
  the ring with `ppermute`, folding each block in with an online softmax; the text K/V are local everywhere. Works
  for any head count.

Outside a mesh, or with a 'sequence' axis of size 1, `joint_attention` is plain attention.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hyvideo_jax.models.attention import attention
from hyvideo_jax.models.chunked_attention import online_softmax_finish, online_softmax_init, online_softmax_step

METHODS = ("auto", "ulysses", "ring", "none")
AXIS = "sequence"


def _axis_sizes():
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def joint_attention(q, k, v, segment_ids, n_img: int, *, backend: str = "xla", method: str = "auto"):
    """Attention over [image (n_img tokens), text] with segment ids [B, L]; sequence-parallel under a mesh."""
    sizes = _axis_sizes()
    s = sizes.get(AXIS, 1)
    if s == 1 or method == "none":
        return attention(q, k, v, segment_ids, segment_ids, backend=backend)
    if method not in METHODS:
        raise ValueError(f"sequence_parallel must be one of {METHODS}, got {method!r}")
    b, _, h, _ = q.shape
    if n_img % s:
        raise ValueError(f"{n_img} image tokens do not split over the sequence axis of size {s}")
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    n_batch = 1
    for a in batch_axes:
        n_batch *= sizes[a]
    batch = batch_axes if batch_axes and b % n_batch == 0 else None
    tensor = "tensor" if sizes.get("tensor", 1) > 1 and h % sizes["tensor"] == 0 else None
    local_heads = h // (sizes["tensor"] if tensor else 1)
    if method == "auto":
        method = "ulysses" if local_heads % s == 0 else "ring"
    if method == "ulysses" and local_heads % s:
        raise ValueError(f"Ulysses needs the {local_heads} heads per device divisible by the sequence axis size "
                         f"{s}; use sequence_parallel='ring'")
    img_spec, txt_spec = P(batch, AXIS, tensor, None), P(batch, None, tensor, None)
    seg_img_spec, seg_txt_spec = P(batch, AXIS), P(batch, None)
    body = _ulysses if method == "ulysses" else _ring
    fn = jax.shard_map(
        lambda *a: body(*a, n_shards=s, backend=backend),
        in_specs=(img_spec,) * 3 + (txt_spec,) * 3 + (seg_img_spec, seg_txt_spec),
        out_specs=(img_spec, txt_spec), check_vma=False)
    split = lambda x: (x[:, :n_img], x[:, n_img:])
    (qi, qt), (ki, kt), (vi, vt), (si, st) = split(q), split(k), split(v), split(segment_ids)
    out_img, out_txt = fn(qi, ki, vi, qt, kt, vt, si, st)
    return jnp.concatenate([out_img, out_txt], axis=1)


def _ulysses(qi, ki, vi, qt, kt, vt, si, st, *, n_shards, backend):
    """Per device: image [b, n/S, h, d] → [b, n, h/S, d] by all-to-all; text sliced to the same h/S heads."""
    to_heads = lambda x: jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)
    hs = qi.shape[2] // n_shards
    own = lambda x: jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(AXIS) * hs, hs, axis=2)
    n = qi.shape[1] * n_shards
    q = jnp.concatenate([to_heads(qi), own(qt)], axis=1)
    k = jnp.concatenate([to_heads(ki), own(kt)], axis=1)
    v = jnp.concatenate([to_heads(vi), own(vt)], axis=1)
    seg = jnp.concatenate([jax.lax.all_gather(si, AXIS, axis=1, tiled=True), st], axis=1)
    out = attention(q, k, v, seg, seg, backend=backend)
    out_img = jax.lax.all_to_all(out[:, :n], AXIS, split_axis=1, concat_axis=2, tiled=True)
    out_txt = jax.lax.all_gather(out[:, n:], AXIS, axis=2, tiled=True)
    return out_img, out_txt


def _ring(qi, ki, vi, qt, kt, vt, si, st, *, n_shards, backend):
    """Per device: queries [own image slice, text]; image K/V slices travel the ring, text K/V stay local."""
    del backend  # the ring folds blocks itself with the online softmax
    q = jnp.concatenate([qi, qt], axis=1)
    q_seg = jnp.concatenate([si, st], axis=1)
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    visible = lambda ks: (q_seg[:, None, :, None] == ks[:, None, None, :])
    state = online_softmax_init(q.shape[0], q.shape[1], q.shape[2], q.shape[3])
    state = online_softmax_step(state, q, kt, vt, visible(st), scale)
    block = (ki, vi, si)
    perm = [(j, (j + 1) % n_shards) for j in range(n_shards)]
    for step in range(n_shards):
        if step:
            block = jax.lax.ppermute(block, AXIS, perm)
        state = online_softmax_step(state, q, block[0], block[1], visible(block[2]), scale)
    out, _ = online_softmax_finish(state)
    out = out.astype(qi.dtype)
    n = qi.shape[1]
    # Every device computed the text rows over the same keys (in another order): average them so that the
    # replicated output is identical everywhere.
    return out[:, :n], jax.lax.pmean(out[:, n:], AXIS)
