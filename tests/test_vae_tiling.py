"""Tiled / chunked VAE: parity with diffusers' tiled coding, closeness to untiled coding, bounded compiled memory."""

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
# that a 7-latent-frame, 40×40 px video has 3 windows × 2×2 tiles with ragged edges.
TILES = TileParams(min_size=32, stride=24, min_frames=8, stride_frames=4)


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


def enable_same_tiling(vae):
    vae.enable_tiling(tile_sample_min_height=TILES.min_size, tile_sample_min_width=TILES.min_size,
                      tile_sample_min_num_frames=TILES.min_frames, tile_sample_stride_height=TILES.stride,
                      tile_sample_stride_width=TILES.stride, tile_sample_stride_num_frames=TILES.stride_frames)
    vae.use_framewise_encoding = vae.use_framewise_decoding = True


def test_tiled_decode_and_encode_match_diffusers_tiled(reference):
    vae, model, params = reference
    enable_same_tiling(vae)
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 3, 5, 5)      # 3 latent frames: windows at 0 and 1; 5×5: tiles at 0 and 3
    video = torch.rand(1, 3, 9, 40, 40) * 2 - 1
    with torch.no_grad():
        ref_decoded = vae._decode(latents).sample.numpy()
        ref_moments = vae._encode(video).numpy()
    decoded = jax.jit(lambda p, z: vae_tiling.tiled_decode_unscaled(model, p, z, TILES))(params, channels_last(latents))
    moments = jax.jit(lambda p, x: vae_tiling.tiled_encode_moments(model, p, x, TILES))(params, channels_last(video))
    errors = relative_error(decoded, ref_decoded), relative_error(moments, ref_moments)
    print(f"tiled vs diffusers tiled: relative max error decode {errors[0]:.2e}, encode {errors[1]:.2e}")
    assert max(errors) <= 1e-4


def test_frame_with_one_side_within_a_tile_matches_diffusers(reference):
    """32×48 px: the height fits one 32 px tile, the width needs two; both axes still step by the stride."""
    vae, model, params = reference
    enable_same_tiling(vae)
    torch.manual_seed(2)
    video = torch.rand(1, 3, 1, 32, 48) * 2 - 1
    latents = torch.randn(1, 4, 1, 4, 6)
    with torch.no_grad():
        ref_moments, ref_decoded = vae._encode(video).numpy(), vae._decode(latents).sample.numpy()
    moments = vae_tiling.tiled_encode_moments(model, params, channels_last(video), TILES)
    decoded = vae_tiling.tiled_decode_unscaled(model, params, channels_last(latents), TILES)
    assert moments.shape == (1, 1, 4, 6, 8) and decoded.shape == (1, 1, 32, 48, 3)
    assert max(relative_error(moments, ref_moments), relative_error(decoded, ref_decoded)) <= 1e-4


def test_blend_matches_diffusers_blend(reference):
    vae, _, _ = reference
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1, 3, 2, 5, 6)).astype(np.float32)
    for extent, axis_torch, axis_ours, fn in ((4, 3, 2, vae.blend_v), (3, 4, 3, vae.blend_h), (7, 2, 1, vae.blend_t)):
        expected = fn(torch.from_numpy(a), torch.from_numpy(b.copy()), extent).numpy()
        ours = vae_tiling.blend(jnp.asarray(a.transpose(0, 2, 3, 4, 1)), jnp.asarray(b.transpose(0, 2, 3, 4, 1)),
                                extent, axis_ours)
        np.testing.assert_allclose(np.asarray(ours).transpose(0, 4, 1, 2, 3), expected, atol=1e-6)


def test_spatial_tiling_is_exact_when_tiles_share_the_frame_statistics(reference):
    """The only source of tiled ≠ untiled in space is per-tile statistics (GroupNorm) and edge replication: with a
    video constant within each frame, every tile sees exactly the whole frame's statistics and edges, so spatially
    tiled encode and decode equal the untiled ones up to float rounding (statistics summed over different element
    counts; measured ≈1.5e-4 of the output scale, three orders below the smooth-input deviation below)."""
    _, model, params = reference
    spatial_only = TileParams(min_size=32, stride=24, min_frames=8, stride_frames=4, temporal=False)
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


def smooth_video(frames, height, width):
    """A slowly varying colour field in [-0.8, 0.8]: about one cycle across the frame, drifting over time."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    channels = [np.sin(2 * np.pi * (x / 48 + 0.3 * c) + 0.05 * t) * np.cos(2 * np.pi * (y / 56 - 0.2 * c))
                for c in range(3)]
    return jnp.asarray(0.8 * np.stack(channels, -1)[None], jnp.float32)


def test_tiled_stays_near_untiled_on_smooth_inputs(reference):
    """On a smooth video whose tiles have different statistics, tiled ≠ untiled: each tile is normalized with its own
    GroupNorm statistics (and replicates its own edges). With random weights and 4-latent-pixel tiles the network
    amplifies those differences far more than a trained VAE with 32-latent-pixel tiles would, so the bound here is
    loose: mean deviation ≤ 25% of the output scale (measured ≈16%). The exact statement is the test above."""
    _, model, params = reference
    video = smooth_video(9, 48, 48)
    untiled = model.apply({"params": params}, video, method=model.encode_moments)
    tiled = jax.jit(lambda p, x: vae_tiling.tiled_encode_moments(model, p, x, TILES))(params, video)
    mean = float(jnp.abs(tiled - untiled).mean() / jnp.abs(untiled).max())
    print(f"smooth video, tiled vs untiled encode: mean deviation {mean:.3f} of the output scale")
    assert mean <= 0.25


def temp_bytes(fn, params, shape) -> tuple[int, int]:
    compiled = jax.jit(fn).lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


def test_tiled_decode_memory_is_bounded(reference):
    """Compiled temporary memory of tiled decode: linear in frames with a slope of a few output bytes per frame (the
    tile activations are reused, only output-sized buffers grow), and grows with frame area only by output-sized
    buffers; untiled decode's activations grow ~20× the output in both directions."""
    _, model, params = reference
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    tiled = lambda p, z: vae_tiling.tiled_decode_unscaled(model, p, z, TILES)  # noqa: E731
    untiled = lambda p, z: model.apply({"params": p}, z, method=model.decode_unscaled)  # noqa: E731
    frames = [5, 7, 9]  # latent frames, one 32 px tile
    by_frames = [temp_bytes(tiled, abstract, (1, t, 4, 4, 4)) for t in frames]
    untiled_by_frames = [temp_bytes(untiled, abstract, (1, t, 4, 4, 4))[0] for t in frames]
    sizes = [7, 13]     # latent px: 2×2+ tiles → 4×4+ tiles, 2 latent frames (one window)
    by_size = [temp_bytes(tiled, abstract, (1, 2, s, s, 4)) for s in sizes]
    untiled_by_size = [temp_bytes(untiled, abstract, (1, 2, s, s, 4))[0] for s in sizes]
    print("tiled decode temp bytes by latent frames", dict(zip(frames, [b[0] for b in by_frames])),
          "untiled", dict(zip(frames, untiled_by_frames)))
    print("tiled decode temp bytes by latent size", dict(zip(sizes, [b[0] for b in by_size])),
          "untiled", dict(zip(sizes, untiled_by_size)))
    steps = np.diff([b[0] for b in by_frames])
    output_step = np.diff([b[1] for b in by_frames])
    assert abs(steps[1] - steps[0]) <= 0.1 * steps[0], steps            # linear in frames
    assert steps[0] <= 4 * output_step[0], (steps, output_step)        # slope: output-sized buffers only
    assert np.diff(untiled_by_frames)[0] >= 10 * output_step[0]
    growth = by_size[1][0] - by_size[0][0]
    output_growth = by_size[1][1] - by_size[0][1]
    assert growth <= 4 * output_growth, (growth, output_growth)       # activations do not grow with area
    assert untiled_by_size[1] - untiled_by_size[0] >= 10 * output_growth
    assert by_size[1][0] * 4 < untiled_by_size[1]
