"""Tiled / chunked VAE: parity with diffusers' tiled coding, closeness to untiled coding, bounded compiled memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from hyvideo_jax.convert.vae import load_torch_vae
from hyvideo_jax.models import vae_tiling
from hyvideo_jax.models.vae import HunyuanVideoVAE, TileParams, VAEConfig

TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4)
# 32 px tiles every 24 px (latent 4 every 3) and 8-frame windows every 4 frames (latent 2 every 1): small enough
# that a 3-latent-frame, 40×40 px video has 2 windows × 2×2 tiles with ragged edges.
TILES = TileParams(min_size=32, stride=24, min_frames=8, stride_frames=4)
# Half-tile overlaps (the most allowed): a last tile or window can be shorter than the blend extent, where the
# references blend over fewer elements.
HALF = TileParams(min_size=32, stride=16, min_frames=16, stride_frames=8)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**TINY).eval()
    config, params = load_torch_vae(vae.state_dict(), config=VAEConfig(**TINY))
    return vae, HunyuanVideoVAE(config), params


def channels_last(t: torch.Tensor):
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 4, 1))


def relative_error(ours, reference_channels_first) -> float:
    ours = np.asarray(ours).transpose(0, 4, 1, 2, 3)
    return float(np.abs(ours - reference_channels_first).max() / np.abs(reference_channels_first).max())


def enable_same_tiling(vae, tiles: TileParams):
    vae.enable_tiling(tile_sample_min_height=tiles.min_size, tile_sample_min_width=tiles.min_size,
                      tile_sample_min_num_frames=tiles.min_frames, tile_sample_stride_height=tiles.stride,
                      tile_sample_stride_width=tiles.stride, tile_sample_stride_num_frames=tiles.stride_frames)
    vae.use_tiling = tiles.spatial
    vae.use_framewise_encoding = vae.use_framewise_decoding = tiles.temporal


@pytest.mark.parametrize("tiles,latent_shape", [
    (TILES, (3, 5, 5)),     # windows at 0 and 1, tiles at 0 and 3 (ragged)
    (HALF, (4, 5, 6)),      # decode: a ragged first window and a short second one; rows of 4, 3 and 1 latents
], ids=["quarter-overlap", "half-overlap-short-ends"])
def test_tiled_decode_and_encode_match_diffusers_tiled(reference, tiles, latent_shape):
    vae, model, params = reference
    enable_same_tiling(vae, tiles)
    t, h, w = latent_shape
    torch.manual_seed(1)
    latents = torch.randn(1, 4, t, h, w)
    # Encoding needs more than min_frames frames for windows: 21 frames give windows of 17, 13 and 5 frames.
    frames = 4 * (t - 1) + 1 if tiles is TILES else 21
    video = torch.rand(1, 3, frames, 8 * h, 8 * w) * 2 - 1
    with torch.no_grad():
        ref_decoded = vae._decode(latents).sample.numpy()
        ref_moments = vae._encode(video).numpy()
    decoded = jax.jit(lambda p, z: vae_tiling.tiled_decode_unscaled(model, p, z, tiles))(params, channels_last(latents))
    moments = jax.jit(lambda p, x: vae_tiling.tiled_encode_moments(model, p, x, tiles))(params, channels_last(video))
    errors = relative_error(decoded, ref_decoded), relative_error(moments, ref_moments)
    print(f"tiled vs diffusers tiled: relative max error decode {errors[0]:.2e}, encode {errors[1]:.2e}")
    assert max(errors) <= 1e-4


def test_frame_with_one_side_within_a_tile_matches_diffusers(reference):
    """32×48 px: the height fits one 32 px tile, the width needs two; both axes still step by the stride."""
    vae, model, params = reference
    enable_same_tiling(vae, TILES)
    torch.manual_seed(2)
    video = torch.rand(1, 3, 1, 32, 48) * 2 - 1
    latents = torch.randn(1, 4, 1, 4, 6)
    with torch.no_grad():
        ref_moments, ref_decoded = vae._encode(video).numpy(), vae._decode(latents).sample.numpy()
    moments = vae_tiling.tiled_encode_moments(model, params, channels_last(video), TILES)
    decoded = vae_tiling.tiled_decode_unscaled(model, params, channels_last(latents), TILES)
    assert moments.shape == (1, 1, 4, 6, 8) and decoded.shape == (1, 1, 32, 48, 3)
    assert max(relative_error(moments, ref_moments), relative_error(decoded, ref_decoded)) <= 1e-4


# ---------------------------------------------------------------- the blending alone, against diffusers' own loops
def _tile_dependent(y, axes, ramp_axes):
    """Make a fake coder's output depend on the tile it was computed in (its own mean removed, plus a ramp over
    the tile's positions), so overlapping tiles disagree and any blending mistake shows."""
    is_torch = isinstance(y, torch.Tensor)
    y = y - y.mean(dim=axes, keepdim=True) if is_torch else y - y.mean(axis=axes, keepdims=True)
    for scale, axis in zip((0.3, 0.5, 0.7), ramp_axes):
        shape = [1] * y.ndim
        shape[axis] = y.shape[axis]
        ramp = np.linspace(0, scale, y.shape[axis], dtype=np.float32).reshape(shape)
        y = y + (torch.from_numpy(ramp) if is_torch else jnp.asarray(ramp))
    return y


def fake_decode_torch(z):          # [B, C, T, h, w] → [B, 3, 4(T-1)+1, 8h, 8w]
    up = z[:, :3].repeat_interleave(8, 3).repeat_interleave(8, 4)
    up = torch.cat([up[:, :, :1], up[:, :, 1:].repeat_interleave(4, 2)], 2)
    return _tile_dependent(up, (2, 3, 4), (2, 3, 4))


def fake_decode_jax(z):            # channel-last twin of fake_decode_torch
    up = jnp.repeat(jnp.repeat(z[..., :3], 8, 2), 8, 3)
    up = jnp.concatenate([up[:, :1], jnp.repeat(up[:, 1:], 4, 1)], 1)
    return _tile_dependent(up, (1, 2, 3), (1, 2, 3))


def fake_encode_torch(x):          # [B, 3, T, H, W] → [B, 8, (T-1)/4+1, H/8, W/8]
    b, c, t, h, w = x.shape
    pooled = x.reshape(b, c, t, h // 8, 8, w // 8, 8).mean((4, 6))
    rest = pooled[:, :, 1:].reshape(b, c, (t - 1) // 4, 4, h // 8, w // 8).mean(3)
    pooled = torch.cat([pooled[:, :, :1], rest], 2)
    return _tile_dependent(torch.cat([pooled, -pooled, pooled[:, :2] ** 2], 1), (2, 3, 4), (2, 3, 4))


def fake_encode_jax(x):            # channel-last twin of fake_encode_torch
    b, t, h, w, c = x.shape
    pooled = x.reshape(b, t, h // 8, 8, w // 8, 8, c).mean((3, 5))
    rest = pooled[:, 1:].reshape(b, (t - 1) // 4, 4, h // 8, w // 8, c).mean(2)
    pooled = jnp.concatenate([pooled[:, :1], rest], 1)
    return _tile_dependent(jnp.concatenate([pooled, -pooled, pooled[..., :2] ** 2], -1), (1, 2, 3), (1, 2, 3))


class Fake(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.fixture(scope="module")
def fake_reference():
    """diffusers' tiling loops around fake coders (cheap, and every tile differs from its neighbours)."""
    vae = AutoencoderKLHunyuanVideo(**TINY).eval()
    vae.encoder, vae.quant_conv = Fake(fake_encode_torch), torch.nn.Identity()
    vae.decoder, vae.post_quant_conv = Fake(fake_decode_torch), torch.nn.Identity()
    return vae


BLEND_CASES = [  # tiles, latent (T, h, w)
    (TILES, (3, 5, 5)), (TILES, (7, 9, 13)), (TILES, (4, 1, 10)),
    (HALF, (6, 5, 9)), (HALF, (4, 5, 6)), (HALF, (9, 17, 5)),
    (TileParams(min_size=48, stride=24, min_frames=16, stride_frames=8), (7, 10, 10)),
    (TileParams(min_size=64, stride=48, min_frames=64, stride_frames=48), (20, 17, 9)),   # official proportions
    (dataclasses.replace(TILES, temporal=False), (6, 7, 7)), (dataclasses.replace(TILES, spatial=False), (6, 7, 7)),
]


@pytest.mark.parametrize("tiles,latent_shape", BLEND_CASES, ids=[f"{t.min_size}-{t.stride}-{t.min_frames}-"
                                                                  f"{t.stride_frames}-{t.spatial:d}{t.temporal:d}-"
                                                                  f"{'x'.join(map(str, s))}" for t, s in BLEND_CASES])
def test_streamed_blending_matches_diffusers_loops(fake_reference, tiles, latent_shape):
    """Weighted accumulation (`AxisPlan` weights) = the references' in-place blend-and-crop loops, for ragged and
    short last tiles and windows, both directions; and the weights sum to one at every output element."""
    vae = fake_reference
    enable_same_tiling(vae, tiles)
    t, h, w = latent_shape
    rng = np.random.default_rng(sum(latent_shape))
    latents = rng.normal(size=(1, 4, t, h, w)).astype(np.float32)
    video = rng.uniform(-1, 1, size=(1, 3, 4 * (t - 1) + 1, 8 * h, 8 * w)).astype(np.float32)
    with torch.no_grad():
        ref_decoded = vae._decode(torch.from_numpy(latents)).sample.numpy()
        ref_encoded = vae._encode(torch.from_numpy(video)).numpy()
    decode = jax.jit(lambda z: vae_tiling.tiled_apply(fake_decode_jax, z, tiles, "decode", 8, 4))
    encode = jax.jit(lambda x: vae_tiling.tiled_apply(fake_encode_jax, x, tiles, "encode", 8, 4))
    decoded = decode(jnp.asarray(latents.transpose(0, 2, 3, 4, 1)))
    encoded = encode(jnp.asarray(video.transpose(0, 2, 3, 4, 1)))
    assert max(relative_error(decoded, ref_decoded), relative_error(encoded, ref_encoded)) <= 1e-5

    plans = vae_tiling.plan_tiles((1, t, h, w, 4), tiles, "decode", 8, 4)
    ones = vae_tiling.stream_tiles(lambda z: jnp.ones((1, 4 * (z.shape[1] - 1) + 1, 8 * z.shape[2], 8 * z.shape[3], 1)),
                                   jnp.zeros((1, t, h, w, 4)), plans)
    np.testing.assert_allclose(np.asarray(ones), 1.0, atol=1e-6)


def test_tile_params_are_checked():
    config = VAEConfig(**TINY)
    model = HunyuanVideoVAE(config)
    with pytest.raises(ValueError, match="vae.tile_sample_stride: 8 is less than half the tile size 32"):
        vae_tiling.tiled_decode_unscaled(model, {}, jnp.zeros((1, 2, 8, 8, 4)), TileParams(32, 8, 16, 8))
    with pytest.raises(ValueError, match="vae.tile_sample_stride_frames: 4 is less than half the window length 16"):
        VAEConfig(**TINY, tile_sample_min_frames=16, tile_sample_stride_frames=4)
    with pytest.raises(ValueError, match="vae.tile_sample_min_size: must be a positive multiple of 8, got 30"):
        vae_tiling.tiled_encode_moments(model, {}, jnp.zeros((1, 1, 64, 64, 3)), TileParams(30, 24, 16, 8))
    with pytest.raises(ValueError, match="direction must be 'encode' or 'decode'"):
        vae_tiling.plan_tiles((1, 9, 64, 64, 3), TILES, "up", 8, 4)


# ------------------------------------------------------------------------------------------ tiled vs untiled
def test_spatial_tiling_is_exact_when_tiles_share_the_frame_statistics(reference):
    """The only sources of tiled ≠ untiled in space are per-tile statistics (GroupNorm) and edge replication: with
    a video constant within each frame, every tile sees exactly the whole frame's statistics and edges, so spatially
    tiled encode and decode equal the untiled ones up to float rounding (statistics summed over different element
    counts; measured ≈1.5e-4 of the output scale)."""
    _, model, params = reference
    spatial_only = dataclasses.replace(TILES, temporal=False)
    per_frame = np.random.default_rng(0).uniform(-0.8, 0.8, size=(1, 9, 1, 1, 3)).astype(np.float32)
    video = jnp.broadcast_to(jnp.asarray(per_frame), (1, 9, 40, 40, 3))
    untiled = model.apply({"params": params}, video, method=model.encode_moments)
    tiled = jax.jit(lambda p, x: vae_tiling.tiled_encode_moments(model, p, x, spatial_only))(params, video)
    latents = untiled[..., :4]
    untiled_video = model.apply({"params": params}, latents, method=model.decode_unscaled)
    tiled_video = jax.jit(lambda p, z: vae_tiling.tiled_decode_unscaled(model, p, z, spatial_only))(params, latents)
    encode_error = float(jnp.abs(tiled - untiled).max() / jnp.abs(untiled).max())
    decode_error = float(jnp.abs(tiled_video - untiled_video).max() / jnp.abs(untiled_video).max())
    print(f"frame-constant video, spatial tiles vs untiled: encode {encode_error:.1e}, decode {decode_error:.1e}")
    assert encode_error <= 1e-3 and decode_error <= 1e-3


def smooth_video(frames: int, size: int, correlation_px: float = 4.0, seed: int = 0):
    """A smooth random video in [-0.8, 0.8]: white noise blurred (periodically) by a Gaussian of `correlation_px`
    pixels and one frame."""
    noise = np.random.default_rng(seed).normal(size=(frames, size, size, 3))
    gains = [np.exp(-2 * (np.pi * sigma * np.fft.fftfreq(n)) ** 2) for n, sigma in
             ((frames, 1.0), (size, correlation_px), (size, correlation_px))]
    spectrum = np.fft.fftn(noise, axes=(0, 1, 2)) * np.einsum("t,h,w->thw", *gains)[..., None]
    field = np.fft.ifftn(spectrum, axes=(0, 1, 2)).real
    return jnp.asarray(0.8 * field / np.abs(field).max(), jnp.float32)[None]


def test_tiled_approaches_untiled_as_tiles_grow(reference):
    """Tiled ≠ untiled on a smooth video, by an amount set by the tile size, not by the blending: every tile is
    normalized with its own GroupNorm statistics and replicates its own edges (the reference does the same; our
    tiled result equals diffusers' tiled one above). Those border effects reach a fixed number of latent pixels
    into each tile, so the deviation falls about as 1/tile: tolerance here is a mean deviation ≤ 4% of the output
    scale at 128 px tiles, and each doubling of the tile must at least halve it (up to 25%). With random weights
    (GroupNorm makes the network insensitive to input contrast, so edge errors are not damped) this is a worst
    case; the released VAE uses 256 px tiles."""
    _, model, params = reference
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_moments))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode_unscaled))
    deviations = {}
    for tile in (32, 64, 128):
        tiles = TileParams(min_size=tile, stride=tile * 3 // 4, min_frames=8, stride_frames=4)
        video = smooth_video(5, 2 * tiles.stride + tile // 4)                  # 2×2 tiles
        untiled = encode(params, video)
        tiled = vae_tiling.tiled_encode_moments(model, params, video, tiles)
        latents = untiled[..., :4]
        untiled_video = decode(params, latents)
        tiled_video = vae_tiling.tiled_decode_unscaled(model, params, latents, tiles)
        deviations[tile] = tuple(float(jnp.abs(a - b).mean() / jnp.abs(b).max())
                                 for a, b in ((tiled, untiled), (tiled_video, untiled_video)))
    print("smooth video, mean |tiled - untiled| / output scale (encode, decode) by tile size:",
          {tile: f"{e:.3f}, {d:.3f}" for tile, (e, d) in deviations.items()})
    for direction in (0, 1):
        errors = [deviations[tile][direction] for tile in (32, 64, 128)]
        assert errors[1] <= 0.625 * errors[0] and errors[2] <= 0.625 * errors[1], errors
        assert errors[2] <= 0.04, errors


def moving_video(frames: int, size: int, pixels_per_frame: float, correlation_px: float = 4.0, seed: int = 0):
    """One smooth random frame (as in `smooth_video`) translated sideways by `pixels_per_frame` each frame."""
    noise = np.random.default_rng(seed).normal(size=(size, size, 3))
    freq = np.fft.fftfreq(size)
    gain = np.exp(-2 * (np.pi * correlation_px * freq) ** 2)
    spectrum = np.fft.fft2(noise, axes=(0, 1)) * np.outer(gain, gain)[..., None]
    shift = np.exp(-2j * np.pi * freq[None, None, :, None] * pixels_per_frame * np.arange(frames)[:, None, None, None])
    video = np.fft.ifft2(spectrum[None] * shift, axes=(1, 2)).real
    return jnp.asarray(0.8 * video / np.abs(video).max(), jnp.float32)[None]


def test_temporal_windows_are_exact_on_static_video_and_near_untiled_on_slow_motion(reference):
    """Temporal windows (17 frames in windows of 8+1 every 4) differ from untiled coding only through content that
    changes over time: each window normalizes with its own frames' GroupNorm statistics and replicates its first
    frame as its causal past. So a static video codes exactly as untiled. On slow motion (0.1 px/frame) the
    tolerance is relative to the model itself: the mean deviation must stay below the change that 2% Gaussian
    noise on the input causes (measured in the same run; random weights amplify any change ~5×)."""
    _, model, params = reference
    windows = dataclasses.replace(TILES, spatial=False)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_moments))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode_unscaled))
    tiled_encode = jax.jit(lambda p, x: vae_tiling.tiled_encode_moments(model, p, x, windows))
    tiled_decode = jax.jit(lambda p, z: vae_tiling.tiled_decode_unscaled(model, p, z, windows))

    def mean_change(a, b):
        return float(jnp.abs(a - b).mean() / jnp.abs(b).max())

    results = {}
    for speed in (0.0, 0.1):
        video = moving_video(17, 32, speed)
        moments = encode(params, video)
        latents = moments[..., :4]
        decoded = decode(params, latents)
        latent_noise = 0.02 * jnp.abs(latents).max() * jax.random.normal(jax.random.PRNGKey(2), latents.shape)
        noisy = (encode(params, video + 0.02 * jax.random.normal(jax.random.PRNGKey(1), video.shape)),
                 decode(params, latents + latent_noise))
        results[speed] = dict(windows=(mean_change(tiled_encode(params, video), moments),
                                       mean_change(tiled_decode(params, latents), decoded)),
                              noise=(mean_change(noisy[0], moments), mean_change(noisy[1], decoded)))
    print("temporal windows vs untiled, mean change / output scale (encode, decode):",
          {speed: {k: f"{v[0]:.1e}, {v[1]:.1e}" for k, v in r.items()} for speed, r in results.items()})
    assert max(results[0.0]["windows"]) <= 1e-5
    for direction in (0, 1):
        assert results[0.1]["windows"][direction] <= results[0.1]["noise"][direction], results[0.1]


# ------------------------------------------------------------------------------------------------- memory
def temp_bytes(fn, params, shape) -> tuple[int, int]:
    compiled = jax.jit(fn).lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


def test_tiled_decode_memory_is_bounded(reference):
    """Compiled temporary memory of tiled decode is flat (one tile's activations; tiles are accumulated straight
    into the output) in frames and in frame size, while untiled decode's activations grow ~20× the output."""
    _, model, params = reference
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    tiled = lambda p, z: vae_tiling.tiled_decode_unscaled(model, p, z, TILES)  # noqa: E731
    untiled = lambda p, z: model.apply({"params": p}, z, method=model.decode_unscaled)  # noqa: E731
    shapes = [(5, 4), (9, 4), (2, 7), (2, 19)]    # (latent frames, latent size): 1 → 4 windows, 2×2 → 6×6 tiles
    measured = {s: temp_bytes(tiled, abstract, (1, s[0], s[1], s[1], 4)) for s in shapes}
    untiled_temp = {s: temp_bytes(untiled, abstract, (1, s[0], s[1], s[1], 4))[0] for s in shapes[2:]}  # by size
    for s in shapes:
        untiled_text = f", untiled temp {untiled_temp[s]:,} B" if s in untiled_temp else ""
        print(f"latent {s[0]}×{s[1]}²: output {measured[s][1]:,} B, tiled temp {measured[s][0]:,} B{untiled_text}")
    by_frames = [measured[s][0] for s in shapes[:2]]
    by_size = [measured[s][0] for s in shapes[2:]]
    assert max(by_frames) <= 1.02 * min(by_frames), by_frames     # flat in frames (one window at a time)
    assert max(by_size) <= 1.02 * min(by_size), by_size           # flat in frame size (one tile at a time)
    output_growth = measured[shapes[-1]][1] - measured[shapes[2]][1]
    assert untiled_temp[shapes[-1]] - untiled_temp[shapes[2]] >= 10 * output_growth
    assert by_size[-1] * 10 < untiled_temp[shapes[-1]]
