"""Memory-bounded encode and decode of long, large videos: spatial tiles and temporal windows, linearly blended.

    latents = encode_video(model, params, video)             # tiles from model.config (official preset by default)
    video = decode_latents(model, params, latents, tiles=TILE_PRESETS["diffusers"])

The cut is the reference one (official `AutoencoderKLCausal3D` and diffusers `AutoencoderKLHunyuanVideo` share it;
only their tile numbers differ, see `TILE_PRESETS`): the input is cut into temporal windows of `min_frames + 1`
frames every `stride_frames` frames (one extra frame, so that each later window's first output frame, which only
sees a replicated past, can be dropped), each window into spatial tiles of `min_size` pixels every `stride`
pixels. Each tile goes through the VAE on its own.

The references then blend every tile with its (already blended) upper and left neighbours by linear ramps over the
overlap, crop it to the stride, and blend windows the same way in time. That recursion is linear in the tiles and,
with overlaps of at most half a tile, every output element is a fixed weighted sum of the tiles covering it:
`AxisPlan` computes those weights per axis (`tile_weights` combines them, including the product terms the in-place
recursion creates at tile corners). So the tiles are streamed: a `fori_loop` per tile shape decodes one tile,
multiplies it by its weights and adds it into the output buffer. The compiled program holds one tile's
activations and the output, whatever the number of tiles, and compiles one loop body per tile shape (interior,
ragged last row or column, short last window).

Exactness: the result equals diffusers' tiled result with the same tile numbers (up to float rounding), but not
the untiled result, because GroupNorm statistics and the causal padding are taken per tile.
"""

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.models.vae import (HunyuanVideoVAE, TileParams, check_latent_shape, check_tile_params,
                                    check_video_shape, posterior, posterior_latents)


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """How one axis is cut and merged. Tile k reads input [in_start[k], in_start[k] + in_len[k]) and covers output
    [out_start[k], out_start[k] + out_len[k]); at its local output position u it contributes with `weight[k, u]`.

    `tail[k, u]` marks positions that lie in the next tile's piece (the overlap the next tile blends over), and
    `squared[k, u]` is the weight with its ramp squared, 1 - r² instead of 1 - r (r instead of r²): the weight
    the second blended axis takes there, see `tile_weights`. Rows are padded with zeros to the longest tile.
    """
    in_start: np.ndarray
    in_len: np.ndarray
    out_start: np.ndarray
    out_len: np.ndarray
    weight: np.ndarray
    squared: np.ndarray
    tail: np.ndarray

    @property
    def size(self) -> int:
        return len(self.in_start)


def axis_plan(spans: list[tuple[int, int, int, int]], extent: int, drop_first: bool) -> AxisPlan:
    """The plan of one axis from its tiles' (in_start, in_len, out_start, out_len), in order.

    As in the references: each tile after the first loses its first output element if `drop_first` (temporal
    windows), and its kept piece starts where the previous piece ends; it ramps in linearly over
    e = min(previous kept length, own kept length, extent) elements, the previous tile ramping out over the same
    elements, and it is cropped where the next tile's piece starts.
    """
    n = len(spans)
    out_start = np.array([s[2] for s in spans])
    out_len = np.array([s[3] for s in spans])
    piece = out_start + np.array([1 if drop_first and k else 0 for k in range(n)])   # first kept output element
    kept = out_start + out_len - piece
    ramp = [0] + [min(kept[k - 1], kept[k], extent) for k in range(1, n)]
    width = int(out_len.max())
    weight, squared, tail = np.zeros((n, width), np.float32), np.zeros((n, width), np.float32), np.zeros((n, width),
                                                                                                        bool)
    for k in range(n):
        p = out_start[k] + np.arange(out_len[k])
        own = np.where(p - piece[k] < ramp[k], (p - piece[k]) / max(ramp[k], 1), 1.0)
        w, sq, in_tail = own, own * own, np.zeros(out_len[k], bool)
        if k + 1 < n:
            if piece[k + 1] - piece[k] < ramp[k]:
                raise ValueError(f"tile {k} ramps in over {ramp[k]} elements but keeps only "
                                 f"{piece[k + 1] - piece[k]}: overlaps must not exceed half a tile")
            in_tail = p >= piece[k + 1]
            r = (p - piece[k + 1]) / max(ramp[k + 1], 1)
            if np.any(r[in_tail] >= 1):
                raise AssertionError(f"tile {k} reaches past the next tile's ramp ({spans})")
            w, sq = np.where(in_tail, 1 - r, own), np.where(in_tail, 1 - r * r, sq)
        before = p < piece[k]                                    # a dropped first element
        weight[k, :out_len[k]] = np.where(before, 0, w)
        squared[k, :out_len[k]] = np.where(before, 0, sq)
        tail[k, :out_len[k]] = in_tail
    return AxisPlan(np.array([s[0] for s in spans]), np.array([s[1] for s in spans]), out_start, out_len,
                    weight, squared, tail)


def tile_weights(t: AxisPlan, h: AxisPlan, w: AxisPlan, k, i, j, shape: tuple[int, int, int]) -> jax.Array:
    """The [T, H, W] weights of tile (window k, row i, column j) of output shape `shape`; k, i, j may be traced.

    Windows are blended after their frames are merged, so time factors out. In space the references blend rows
    first, then columns, each in place: a tile's bottom overlap has already been blended with its left neighbour
    when the tile below blends with it, which gives the column weight r² (own piece) or 1 - r² (right overlap)
    where a row is in the bottom overlap, and r or 1 - r elsewhere.
    """
    lt, lh, lw = shape

    def row(plan, field, index, length):
        return jnp.asarray(getattr(plan, field))[index, :length]

    columns = jnp.where(row(h, "tail", i, lh)[:, None], row(w, "squared", j, lw)[None], row(w, "weight", j, lw)[None])
    return row(t, "weight", k, lt)[:, None, None] * (row(h, "weight", i, lh)[:, None] * columns)[None]


def _spans(length: int, tile: int, stride: int, enabled: bool, out: Callable[[int, int], tuple[int, int]]):
    """(in_start, in_len, out_start, out_len) of the tiles along one axis: every `stride` once tiling is on (as the
    references do, also for an axis shorter than a tile, since each tile is cropped to the stride), else one tile
    covering everything. `out` maps an input (start, length) to its output's."""
    if not enabled:
        return [(0, length, *out(0, length))]
    return [(s, min(tile, length - s), *out(s, min(tile, length - s))) for s in range(0, length, stride)]


def stream_tiles(fn: Callable, x: jax.Array, plans: tuple[AxisPlan, AxisPlan, AxisPlan]) -> jax.Array:
    """Σ over tiles of weights · fn(tile), accumulated into one output buffer [B, T, H, W, C'] (C' and the dtype
    are fn's).

    Tiles of one shape run through one `fori_loop` (dynamic offsets), so one tile's activations live at a time.
    """
    t, h, w = plans
    batch, channels = x.shape[0], x.shape[-1]
    first = (batch, int(t.in_len[0]), int(h.in_len[0]), int(w.in_len[0]), channels)
    probe = jax.eval_shape(fn, jax.ShapeDtypeStruct(first, x.dtype))
    out_shape = (batch, int(t.out_start[-1] + t.out_len[-1]), int(h.out_start[-1] + h.out_len[-1]),
                 int(w.out_start[-1] + w.out_len[-1]), probe.shape[-1])
    out = jnp.zeros(out_shape, probe.dtype)

    def group(plan):
        groups: dict[tuple[int, int], list[int]] = {}
        for index in range(plan.size):
            groups.setdefault((int(plan.in_len[index]), int(plan.out_len[index])), []).append(index)
        return list(groups.items())

    def tile_adder(indices: np.ndarray, in_shape: tuple[int, ...], tile_shape: tuple[int, int, int]):
        table = {field: [jnp.asarray(getattr(p, field)) for p in plans] for field in ("in_start", "out_start")}
        indices = jnp.asarray(indices)

        def add_tile(n, out):
            kij = indices[n]
            tile = jax.lax.dynamic_slice(x, (0, *[a[kij[d]] for d, a in enumerate(table["in_start"])], 0), in_shape)
            y = fn(tile)
            if y.shape[1:4] != tile_shape:
                raise AssertionError(f"a tile of shape {in_shape} gave {y.shape}, expected {tile_shape}")
            start = (0, *[a[kij[d]] for d, a in enumerate(table["out_start"])], 0)
            weights = tile_weights(t, h, w, kij[0], kij[1], kij[2], tile_shape)[None, ..., None]
            region = jax.lax.dynamic_slice(out, start, y.shape)
            return jax.lax.dynamic_update_slice(out, (region + y * weights).astype(out.dtype), start)

        return add_tile

    for (tk, ks), (hk, is_), (wk, js) in itertools.product(group(t), group(h), group(w)):
        indices = np.array(list(itertools.product(ks, is_, js)), np.int32)
        add_tile = tile_adder(indices, (batch, tk[0], hk[0], wk[0], channels), (tk[1], hk[1], wk[1]))
        out = jax.lax.fori_loop(0, len(indices), add_tile, out)
    return out


def plan_tiles(shape: tuple[int, ...], tiles: TileParams, direction: str, spatial_ratio: int, temporal_ratio: int
               ) -> tuple[AxisPlan, AxisPlan, AxisPlan] | None:
    """The (time, height, width) plans for encoding a video of `shape` ("encode") or decoding latents of `shape`
    ("decode") with `tiles`, or None where the input fits in one tile and one window (no tiling, as the
    references decide it)."""
    rs, rt = spatial_ratio, temporal_ratio
    if direction == "encode":     # input in pixels and frames, output in latents
        window, window_stride, tile, stride = tiles.min_frames, tiles.stride_frames, tiles.min_size, tiles.stride
        out_t = lambda s, n: (s // rt, (n - 1) // rt + 1)  # noqa: E731
        out_s = lambda s, n: (s // rs, n // rs)  # noqa: E731
        t_blend, s_blend = (tiles.min_frames - tiles.stride_frames) // rt, (tiles.min_size - tiles.stride) // rs
    elif direction == "decode":   # input in latents, output in pixels and frames
        window, window_stride = tiles.min_frames // rt, tiles.stride_frames // rt
        tile, stride = tiles.min_size // rs, tiles.stride // rs
        out_t = lambda s, n: (s * rt, (n - 1) * rt + 1)  # noqa: E731
        out_s = lambda s, n: (s * rs, n * rs)  # noqa: E731
        t_blend, s_blend = tiles.min_frames - tiles.stride_frames, tiles.min_size - tiles.stride
    else:
        raise ValueError(f"direction must be 'encode' or 'decode', got {direction!r}")
    t_len, h_len, w_len = shape[1:4]
    temporal = tiles.temporal and t_len > window
    spatial = tiles.spatial and (h_len > tile or w_len > tile)
    if not temporal and not spatial:
        return None
    windows = _spans(t_len, window + 1, window_stride, temporal, out_t)
    # A later window of a single input frame yields a single output frame, which is dropped: skip its work.
    windows = [span for k, span in enumerate(windows) if k == 0 or span[1] > 1]
    return (axis_plan(windows, t_blend, drop_first=True),
            axis_plan(_spans(h_len, tile, stride, spatial, out_s), s_blend, drop_first=False),
            axis_plan(_spans(w_len, tile, stride, spatial, out_s), s_blend, drop_first=False))


def tiled_apply(fn: Callable, x: jax.Array, tiles: TileParams, direction: str, spatial_ratio: int,
                temporal_ratio: int) -> jax.Array:
    """fn (an encoder or decoder of `x` [B, T, H, W, C]) applied tile by tile and blended as the references do."""
    plans = plan_tiles(x.shape, tiles, direction, spatial_ratio, temporal_ratio)
    return fn(x) if plans is None else stream_tiles(fn, x, plans)


def tiled_encode_moments(model: HunyuanVideoVAE, params, video, tiles: TileParams | None = None):
    """Moments [B, (T-1)/4+1, H/8, W/8, 2·latent] of video [B, T, H, W, C], encoded tile by tile."""
    cfg = model.config
    check_video_shape(video.shape, cfg)
    tiles = check_tile_params(tiles or cfg.tile_params(), cfg)

    def encode_tile(x):
        return model.apply({"params": params}, x, method=HunyuanVideoVAE.encode_moments)

    return tiled_apply(encode_tile, video, tiles, "encode", cfg.spatial_compression_ratio,
                       cfg.temporal_compression_ratio)


def tiled_decode_unscaled(model: HunyuanVideoVAE, params, z, tiles: TileParams | None = None):
    """Video [B, 4(T-1)+1, 8h, 8w, C] from unscaled latents z [B, T, h, w, latent], decoded tile by tile."""
    cfg = model.config
    check_latent_shape(z.shape, cfg)
    tiles = check_tile_params(tiles or cfg.tile_params(), cfg)

    def decode_tile(latent):
        return model.apply({"params": params}, latent, method=HunyuanVideoVAE.decode_unscaled)

    return tiled_apply(decode_tile, z, tiles, "decode", cfg.spatial_compression_ratio, cfg.temporal_compression_ratio)


def encode_video(model: HunyuanVideoVAE, params, video, rng=None, tiles: TileParams | None = None):
    """Scaled latents (× scaling_factor) of video [B, T, H, W, C] in [-1, 1]: the posterior mode, or a sample if
    `rng` is given. Tiled with `tiles` (default: the config's preset)."""
    mean, logvar = posterior(tiled_encode_moments(model, params, video, tiles))
    return posterior_latents(mean, logvar, rng) * model.config.scaling_factor


def decode_latents(model: HunyuanVideoVAE, params, latents, tiles: TileParams | None = None):
    """Video [B, T, H, W, C] (≈[-1, 1]) from scaled latents, tiled with `tiles` (default: the config's preset)."""
    return tiled_decode_unscaled(model, params, latents / model.config.scaling_factor, tiles)
