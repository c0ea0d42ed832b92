"""Pallas splash attention (TPU) with segment ids, behind the project's attention signature.

The kernel runs per batch element on [H, L, D]; text padding is masked by segment ids exactly as the official
varlen attention does. Sequences are padded to the block size with a segment of their own (padding attends only
to padding, so no softmax row is empty). `interpret=True` runs the same kernel in the Pallas interpreter on any
backend (used by the CPU tests); on TPU it compiles to Mosaic.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hyvideo_jax.models.layers import ATTENTION_RESIDUALS
from hyvideo_jax.parallel.sharding import mesh_axes_of, split_or_warn

_PAD_SEGMENT = -1
_TILE = 128   # the kernel's lane width: sequence lengths are padded to a multiple of it and of the blocks


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Block sizes of the splash kernels, in tokens (multiples of 128, capped at the padded sequence length): query
    blocks `q`, key/value blocks `kv`, and the key slice `kv_compute` each inner step takes (dividing `kv`); the
    backward uses the same. `fused_backward`: one kernel computes dq, dk and dv together (no separate dq pass), at
    the cost of a partial dq per key block ([L / kv, heads, L, head dim], quadratic in the sequence length)."""
    q: int = 512
    kv: int = 512
    kv_compute: int = 512
    fused_backward: bool = False

    def __post_init__(self):
        for name in ("q", "kv", "kv_compute"):
            value = getattr(self, name)
            if value < _TILE or value % _TILE:
                raise ValueError(f"splash block {name}: must be a positive multiple of {_TILE}, got {value}")
        if self.kv % self.kv_compute:
            raise ValueError(f"splash block kv_compute {self.kv_compute} must divide kv {self.kv}")


def _fit(block: int, length: int) -> int:
    """`block` capped at `length` rounded up to the kernel's lane width."""
    return min(block, -(-length // _TILE) * _TILE)


def _kernel(lq: int, lk: int, heads: int, causal: bool, blocks: "SplashBlocks", interpret: bool):
    # Built per call, not cached: the kernel holds arrays made under the caller's trace (its mask info).
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    mask = sm.CausalMask((lq, lk)) if causal else sm.FullMask((lq, lk))
    bq, bkv = _fit(blocks.q, lq), _fit(blocks.kv, lk)
    bkc = bkv if bkv % _fit(blocks.kv_compute, lk) else _fit(blocks.kv_compute, lk)
    fused = blocks.fused_backward
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkc, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkc, block_q_dq=None if fused else bq,
                          block_kv_dq=None if fused else bkv, use_fused_bwd_kernel=fused)
    # The output and log-sum-exp the backward needs are tagged for the remat policies that save them.
    return sk.make_splash_mha(sm.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name=ATTENTION_RESIDUALS, interpret=interpret)


def splash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal=False, *,
                     blocks: SplashBlocks | None = None, interpret: bool = False):
    """q [B, Lq, H, D], k/v [B, Lk, H, D], int segment ids [B, L] → [B, Lq, H, D].

    Under a mesh (outside any shard_map) the kernel runs per device: Mosaic kernels cannot be partitioned by
    GSPMD, so the call is wrapped in a `shard_map` over the mesh axes of the logical 'batch' and 'act_heads' axes
    (the rules table), each used only when it divides the array; otherwise a warning says so (the attention would
    be repeated on those devices).
    """
    if q_segment_ids is None:
        q_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        kv_segment_ids = jnp.ones(k.shape[:2], jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and not mesh.are_all_axes_manual and mesh.size > 1:
        sizes = dict(mesh.shape)
        batch = split_or_warn("splash attention: a batch", q.shape[0], mesh_axes_of("batch", sizes), sizes,
                              "Make the batch a multiple of it, or move those devices to the 'sequence' axis.")
        heads = split_or_warn("splash attention: a head count", q.shape[2], mesh_axes_of("act_heads", sizes), sizes,
                              "Use a tensor axis that divides the heads.")
        x_spec, s_spec = P(batch, None, heads, None), P(batch, None)
        local = functools.partial(_splash_local, causal=causal, blocks=blocks or SplashBlocks(), interpret=interpret)
        return jax.shard_map(local, in_specs=(x_spec,) * 3 + (s_spec,) * 2, out_specs=x_spec,
                             check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)
    return _splash_local(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, blocks=blocks or SplashBlocks(),
                         interpret=interpret)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, *, causal, blocks, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
    b, lq, h, d = q.shape
    lk = k.shape[1]
    pad_q, pad_k = -lq % _fit(blocks.q, lq), -lk % _fit(blocks.kv, lk)   # whole blocks
    if causal and lq + pad_q != lk + pad_k:
        raise ValueError(f"causal splash attention needs equal padded lengths, got {lq} and {lk}")

    def pad(x, n, value=0):
        return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    scale = 1.0 / jnp.sqrt(jnp.float32(d)).astype(q.dtype)
    heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))
    qt, kt, vt = heads_first(pad(q * scale, pad_q)), heads_first(pad(k, pad_k)), heads_first(pad(v, pad_k))
    segments = SegmentIds(q=pad(q_segment_ids.astype(jnp.int32), pad_q, _PAD_SEGMENT),
                          kv=pad(kv_segment_ids.astype(jnp.int32), pad_k, _PAD_SEGMENT))
    kernel = _kernel(lq + pad_q, lk + pad_k, h, causal, blocks, interpret)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=s1))(qt, kt, vt, segments)
    return jnp.transpose(out, (0, 2, 1, 3))[:, :lq].astype(q.dtype)
