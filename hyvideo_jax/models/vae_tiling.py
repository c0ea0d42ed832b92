"""Memory-bounded encode and decode of long, large videos: spatial tiles and temporal windows, linearly blended.

    latents = encode_video(model, params, video)             # tiles from model.config (official preset by default)
    video = decode_latents(model, params, latents, tiles=TILE_PRESETS["diffusers"])

The algorithm is the reference one (official `AutoencoderKLCausal3D` and diffusers `AutoencoderKLHunyuanVideo`
share it; only their tile numbers differ, see `TILE_PRESETS`): the input is cut into temporal windows of
`min_frames + 1` frames every `stride_frames` frames (one extra frame, so that each later window's first output
frame, which only sees a replicated past, can be dropped), each window into spatial tiles of `min_size` pixels
every `stride` pixels. Each tile goes through the VAE on its own; tiles are blended with their upper and left
neighbours (then windows with their predecessor) by linear ramps over the overlap, and cropped to the stride.

Tiles of equal shape run through one `lax.map`, so the compiled program holds one tile's activations at a time
(plus buffers the size of the output), and compiles a handful of tile shapes rather than every tile.

Exactness: the result equals diffusers' tiled result with the same tile numbers (up to float rounding), but not
the untiled result, because GroupNorm statistics and the causal padding are taken per tile.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from hyvideo_jax.models.vae import (HunyuanVideoVAE, TileParams, check_latent_shape, check_video_shape, posterior,
                                    posterior_latents)

T_AXIS, H_AXIS, W_AXIS = 1, 2, 3


def blend(previous, current, extent: int, axis: int):
    """Ramp the first `extent` slices of `current` (along `axis`) from the last ones of `previous` to its own.

    current[k] ← previous[-e + k]·(1 - k/e) + current[k]·(k/e) for k < e = min(extent, both lengths); the rest
    of `current` is unchanged.
    """
    e = min(previous.shape[axis], current.shape[axis], extent)
    if e <= 0:
        return current
    ramp_shape = [1] * current.ndim
    ramp_shape[axis] = e
    ramp = (jnp.arange(e, dtype=jnp.float32) / e).reshape(ramp_shape)
    n_prev = previous.shape[axis]
    tail = jax.lax.slice_in_dim(previous, n_prev - e, n_prev, axis=axis).astype(jnp.float32)
    head = jax.lax.slice_in_dim(current, 0, e, axis=axis).astype(jnp.float32)
    mixed = (tail * (1 - ramp) + head * ramp).astype(current.dtype)
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(current, e, current.shape[axis], axis=axis)], axis=axis)


def run_tiles(fn: Callable, inputs: Sequence[jax.Array]) -> list[jax.Array]:
    """`[fn(x) for x in inputs]`, with the inputs of each distinct shape stacked and run through one `lax.map`
    (a loop: one tile's activations live at a time)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape), []).append(index)
    outputs: list = [None] * len(inputs)
    for indices in groups.values():
        if len(indices) == 1:
            outputs[indices[0]] = fn(inputs[indices[0]])
            continue
        stacked = jax.lax.map(fn, jnp.stack([inputs[i] for i in indices]))
        for n, i in enumerate(indices):
            outputs[i] = stacked[n]
    return outputs


def _starts(length: int, tile: int, stride: int, enabled: bool) -> list[tuple[int, int]]:
    """(start, stop) of the tiles along one axis: every `stride` once tiling is on (as the references do, also for
    an axis shorter than a tile, since each tile is cropped to the stride), else one tile covering everything."""
    if not enabled:
        return [(0, length)]
    return [(s, min(s + tile, length)) for s in range(0, length, stride)]


def _blend_grid(grid: list[list[jax.Array]], extent: int, keep: int, height: int, width: int):
    """Blend a row-major grid of [B, T, h, w, C] tiles with their upper and left neighbours (already blended, as in
    the reference's in-place loop), keep `keep`×`keep` of each and crop to height×width."""
    if len(grid) == 1 and len(grid[0]) == 1:
        return grid[0][0]
    blended: list[list[jax.Array]] = []
    rows = []
    for i, row in enumerate(grid):
        blended.append([])
        pieces = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend(blended[i - 1][j], tile, extent, H_AXIS)
            if j > 0:
                tile = blend(blended[i][j - 1], tile, extent, W_AXIS)
            blended[i].append(tile)
            pieces.append(tile[:, :, :keep, :keep])
        rows.append(jnp.concatenate(pieces, axis=W_AXIS))
    return jnp.concatenate(rows, axis=H_AXIS)[:, :, :height, :width]


def _blend_windows(windows: list[jax.Array], extent: int, keep: int, frames: int):
    """Blend temporal windows (each after the first already without its first frame) with their predecessor,
    keep `keep + 1` frames of the first and `keep` of the others, and crop to `frames`."""
    if len(windows) == 1:
        return windows[0]
    blended, pieces = [], []
    for k, window in enumerate(windows):
        if k > 0:
            window = blend(blended[k - 1], window, extent, T_AXIS)
        blended.append(window)
        pieces.append(window[:, :keep + 1] if k == 0 else window[:, :keep])
    return jnp.concatenate(pieces, axis=T_AXIS)[:, :frames]


def _tiled(fn: Callable, x, *, window: int, window_stride: int, tile: int, stride: int, tiles: TileParams,
           out_frames: int, out_hw: tuple[int, int],
           t_blend: int, t_keep: int, s_blend: int, s_keep: int):
    """Shared driver of tiled encode and decode; sizes of the input (`window`, `tile`, strides) are in input
    units, blend extents and keeps in output units."""
    t_len, h_len, w_len = x.shape[1:4]
    temporal = tiles.temporal and t_len > window
    windows = ([(s, min(s + window + 1, t_len)) for s in range(0, t_len, window_stride)] if temporal
               else [(0, t_len)])
    # A later window of a single input frame yields a single output frame, which is dropped: skip its work.
    windows = [w for k, w in enumerate(windows) if k == 0 or w[1] - w[0] > 1]
    rows = _starts(h_len, tile, stride, tiles.spatial and (h_len > tile or w_len > tile))
    cols = _starts(w_len, tile, stride, tiles.spatial and (h_len > tile or w_len > tile))
    inputs = [x[:, t0:t1, h0:h1, w0:w1] for t0, t1 in windows for h0, h1 in rows for w0, w1 in cols]
    outputs = run_tiles(fn, inputs)
    per_window = len(rows) * len(cols)
    results = []
    for k in range(len(windows)):
        flat = outputs[k * per_window:(k + 1) * per_window]
        grid = [flat[r * len(cols):(r + 1) * len(cols)] for r in range(len(rows))]
        window_out = _blend_grid(grid, s_blend, s_keep, *out_hw)
        results.append(window_out if k == 0 else window_out[:, 1:])
    return _blend_windows(results, t_blend, t_keep, out_frames)


def tiled_encode_moments(model: HunyuanVideoVAE, params, video, tiles: TileParams | None = None):
    """Moments [B, (T-1)/4+1, H/8, W/8, 2·latent] of video [B, T, H, W, C], encoded tile by tile."""
    cfg = model.config
    check_video_shape(video.shape, cfg)
    tiles = tiles or cfg.tile_params()
    rs, rt = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    t, h, w = video.shape[1:4]
    lat_tile, lat_stride = tiles.min_size // rs, tiles.stride // rs
    lat_window, lat_window_stride = tiles.min_frames // rt, tiles.stride_frames // rt

    def encode_tile(x):
        return model.apply({"params": params}, x, method=HunyuanVideoVAE.encode_moments)

    return _tiled(encode_tile, video, window=tiles.min_frames, window_stride=tiles.stride_frames,
                  tile=tiles.min_size, stride=tiles.stride, tiles=tiles, out_frames=(t - 1) // rt + 1,
                  out_hw=(h // rs, w // rs),
                  t_blend=lat_window - lat_window_stride, t_keep=lat_window_stride,
                  s_blend=lat_tile - lat_stride, s_keep=lat_stride)


def tiled_decode_unscaled(model: HunyuanVideoVAE, params, z, tiles: TileParams | None = None):
    """Video [B, 4(T-1)+1, 8h, 8w, C] from unscaled latents z [B, T, h, w, latent], decoded tile by tile."""
    cfg = model.config
    check_latent_shape(z.shape, cfg)
    tiles = tiles or cfg.tile_params()
    rs, rt = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    t, h, w = z.shape[1:4]

    def decode_tile(latent):
        return model.apply({"params": params}, latent, method=HunyuanVideoVAE.decode_unscaled)

    return _tiled(decode_tile, z, window=tiles.min_frames // rt, window_stride=tiles.stride_frames // rt,
                  tile=tiles.min_size // rs, stride=tiles.stride // rs, tiles=tiles,
                  out_frames=(t - 1) * rt + 1, out_hw=(h * rs, w * rs), t_blend=tiles.min_frames - tiles.stride_frames,
                  t_keep=tiles.stride_frames, s_blend=tiles.min_size - tiles.stride, s_keep=tiles.stride)


def encode_video(model: HunyuanVideoVAE, params, video, rng=None, tiles: TileParams | None = None):
    """Scaled latents (× scaling_factor) of video [B, T, H, W, C] in [-1, 1]: the posterior mode, or a sample if
    `rng` is given. Tiled with `tiles` (default: the config's preset)."""
    mean, logvar = posterior(tiled_encode_moments(model, params, video, tiles))
    return posterior_latents(mean, logvar, rng) * model.config.scaling_factor


def decode_latents(model: HunyuanVideoVAE, params, latents, tiles: TileParams | None = None):
    """Video [B, T, H, W, C] (≈[-1, 1]) from scaled latents, tiled with `tiles` (default: the config's preset)."""
    return tiled_decode_unscaled(model, params, latents / model.config.scaling_factor, tiles)
