"""VAE parity with diffusers' AutoencoderKLHunyuanVideo (tiny random weights), attention blocking, objective, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from hyvideo_jax.convert.vae import load_torch_vae
from hyvideo_jax.models.vae import (TILE_PRESETS, CausalConv3d, HunyuanVideoVAE, VAEConfig, block_causal_attention,
                                    inflate_to_current_frame)
from hyvideo_jax.vae_objective import VAELossConfig, kl_divergence, vae_loss

TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4)


def to_channels_last(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 4, 1))


def to_channels_first(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 4, 1, 2, 3)


def relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**TINY).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False  # the untiled model
    # A small attention block (5 tokens) so the blocked attention pads, loops and skips key blocks.
    config, params = load_torch_vae(vae.state_dict(), config=VAEConfig(**TINY, attention_block_size=5))
    return vae, HunyuanVideoVAE(config), params


@pytest.mark.parametrize("frames,height,width", [(1, 16, 24), (5, 16, 24), (9, 24, 16)])
def test_parity_with_diffusers(reference, frames, height, width):
    """Encoder moments, decoder output and the round trip match diffusers to 1e-4 of the output scale (fp32)."""
    vae, model, params = reference
    torch.manual_seed(frames)
    video = torch.rand(1, 3, frames, height, width) * 2 - 1
    latents = torch.randn(1, 4, (frames - 1) // 4 + 1, height // 8, width // 8)
    with torch.no_grad():
        ref_moments = vae.quant_conv(vae.encoder(video)).numpy()
        ref_decoded = vae.decode(latents).sample.numpy()
        ref_round_trip = vae(video).sample.numpy()
    variables = {"params": params}
    moments = to_channels_first(model.apply(variables, to_channels_last(video), method=model.encode_moments))
    decoded = to_channels_first(model.apply(variables, to_channels_last(latents) * 0.476986, method=model.decode))
    round_trip = to_channels_first(model.apply(variables, to_channels_last(video))[0])
    assert moments.shape == ref_moments.shape and decoded.shape == ref_decoded.shape
    errors = (relative_error(moments, ref_moments), relative_error(decoded, ref_decoded),
              relative_error(round_trip, ref_round_trip))
    print(f"frames={frames} {height}x{width}: relative max error moments/decode/round trip = {errors}")
    assert max(errors) <= 1e-4, errors


def test_scaled_latents_are_posterior_mode_times_scaling_factor(reference):
    vae, model, params = reference
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = (vae.encode(video).latent_dist.mode() * vae.config.scaling_factor).numpy()
    ours = to_channels_first(model.apply({"params": params}, to_channels_last(video), method=model.encode))
    assert relative_error(ours, ref) <= 1e-4
    sample = model.apply({"params": params}, to_channels_last(video), jax.random.PRNGKey(1), method=model.encode)
    # A sample differs from the mode by std·ε with std = exp(logvar/2) > 0.
    assert float(jnp.abs(to_channels_first(sample) - ours).max()) > 1e-3


@pytest.mark.parametrize("block_size", [1, 3, 7, 24])
def test_block_causal_attention_matches_masked_softmax(block_size):
    """Blocked online-softmax attention equals the full masked softmax (diffusers' block-causal mask)."""
    frames, tokens_per_frame, dim = 4, 6, 8
    length = frames * tokens_per_frame
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, length, dim)), jnp.float32) for _ in range(3))
    frame_index = jnp.repeat(jnp.arange(frames), tokens_per_frame)
    scores = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(dim)
    mask = frame_index[None, :] <= frame_index[:, None]
    expected = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1), v)
    ours = block_causal_attention(q, k, v, frame_index, block_size)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_kl_matches_diffusers_posterior(reference):
    rng = np.random.default_rng(1)
    moments = rng.normal(size=(2, 8, 2, 3, 3)).astype(np.float32)
    # diffusers' kl() sums axes 1-3 (written for images [B, C, H, W]); summing the last axis too gives the video KL.
    ref = DiagonalGaussianDistribution(torch.from_numpy(moments)).kl().numpy().sum(-1)
    mean, logvar = np.split(moments.transpose(0, 2, 3, 4, 1), 2, axis=-1)
    np.testing.assert_allclose(np.asarray(kl_divergence(jnp.asarray(mean), jnp.asarray(logvar))), ref, rtol=1e-5)


def test_vae_loss_terms(reference):
    """The loss equals its terms recomputed by hand."""
    _, model, params = reference
    video = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, size=(1, 5, 16, 16, 3)), jnp.float32)
    loss_config = VAELossConfig(l1_weight=1.0, l2_weight=2.0, kl_weight=1e-3, temporal_weight=0.5,
                                sample_posterior=False)
    loss, metrics = vae_loss(model, loss_config, params, {"video": video}, jax.random.PRNGKey(0))
    reconstruction, mean, logvar = model.apply({"params": params}, video)
    l1 = jnp.mean(jnp.abs(reconstruction - video))
    l2 = jnp.mean(jnp.square(reconstruction - video))
    kl = jnp.mean(0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3, 4)))
    temporal = jnp.mean(jnp.abs(jnp.diff(reconstruction, axis=1) - jnp.diff(video, axis=1)))
    np.testing.assert_allclose(float(loss), float(l1 + 2.0 * l2 + 1e-3 * kl + 0.5 * temporal), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reconstruction_l2"]), float(l2), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["temporal"]), float(temporal), rtol=1e-5)

    # Training goes through the trainer's one train step: tests/test_train.py::test_vae_objective_trains_through_...


def test_shape_errors_name_the_problem(reference):
    _, model, params = reference
    variables = {"params": params}
    with pytest.raises(ValueError, match="frames must be 4k\\+1 \\(1, 5, 9, ...\\), got 30"):
        model.apply(variables, jnp.zeros((1, 30, 16, 16, 3)), method=model.encode_moments)
    with pytest.raises(ValueError, match="multiples of 8, got 20x16"):
        model.apply(variables, jnp.zeros((1, 5, 20, 16, 3)), method=model.encode_moments)
    with pytest.raises(ValueError, match="must have 3 channels"):
        model.apply(variables, jnp.zeros((1, 1, 16, 16, 4)), method=model.encode_moments)
    with pytest.raises(ValueError, match="latents must have 4 channels"):
        model.apply(variables, jnp.zeros((1, 2, 2, 2, 16)), method=model.decode)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="vae.norm_num_groups: 32 groups do not divide 8 channels"):
        VAEConfig(block_out_channels=(8, 16, 16, 16))
    with pytest.raises(ValueError, match="vae.temporal_compression_ratio: must be 4"):
        VAEConfig(temporal_compression_ratio=8)
    with pytest.raises(ValueError, match="vae.tiling: must be one of"):
        VAEConfig(tiling="fast")
    with pytest.raises(ValueError, match="vae.tile_sample_stride: must be a positive multiple of 8, got 100"):
        VAEConfig(tile_sample_stride=100)
    with pytest.raises(ValueError, match="vae.tile_sample_stride_frames: 80 exceeds the window length 64"):
        VAEConfig(tile_sample_stride_frames=80)
    with pytest.raises(ValueError, match="unknown vae config field"):
        VAEConfig.from_config({"latent_dim": 16})
    with pytest.raises(ValueError, match="vae.loss.kl_weight: must be >= 0"):
        VAELossConfig(kl_weight=-1.0)


def test_configs_build_the_released_and_tiny_vae():
    """config.vae of both presets builds; the released one has the reference's 246,478,803 parameters."""
    from configs import hunyuan_video_13b, tiny
    from hyvideo_jax.convert.vae import param_shapes
    released = VAEConfig.from_config(hunyuan_video_13b.get_config().vae.model)
    assert sum(int(np.prod(s)) for s in param_shapes(released).values()) == 246_478_803
    assert released.tile_params() == TILE_PRESETS["official"]
    assert (released.scaling_factor, released.latent_channels) == (0.476986, 16)
    small = VAEConfig.from_config(tiny.get_config().vae.model)
    tiny_reference = AutoencoderKLHunyuanVideo(**{k: getattr(small, k) for k in TINY})
    assert sum(int(np.prod(s)) for s in param_shapes(small).values()) == sum(
        p.numel() for p in tiny_reference.parameters())


def test_inflated_vae_keeps_stills_and_sees_only_the_current_frame(reference):
    """inflate_to_current_frame: a still encodes and decodes as before; each inflated causal convolution's output
    frame t is its output on frame t alone (not on frames t-2..t), for stride 1 and the strided downsampling."""
    _, model, params = reference
    inflated = inflate_to_current_frame(params)
    rng = np.random.default_rng(0)
    still = jnp.asarray(rng.uniform(-1, 1, (1, 1, 16, 16, 3)).astype(np.float32))
    latents = model.apply({"params": params}, still, method=HunyuanVideoVAE.encode)
    decoded = np.asarray(model.apply({"params": params}, latents, method=HunyuanVideoVAE.decode))
    errors = (relative_error(model.apply({"params": inflated}, still, method=HunyuanVideoVAE.encode), latents),
              relative_error(model.apply({"params": inflated}, latents, method=HunyuanVideoVAE.decode), decoded))
    print(f"a still through the inflated VAE: encode {errors[0]:.1e}, decode {errors[1]:.1e} of the original's")
    assert max(errors) < 1e-4   # fp32: the taps' sum is added in another order, amplified by the norms
    assert relative_error(model.apply({"params": inflated}, still[:, :, ::-1], method=HunyuanVideoVAE.encode),
                          latents) > 0.1   # the check can see a change

    video = jnp.asarray(rng.standard_normal((1, 5, 8, 8, 6)).astype(np.float32))
    for strides in ((1, 1, 1), (2, 2, 2)):
        conv = CausalConv3d(4, 3, strides=strides)
        conv_params = conv.init(jax.random.PRNGKey(1), video)["params"]
        flat = inflate_to_current_frame(conv_params)
        out = conv.apply({"params": flat}, video)
        kept = range(0, 5, strides[0])
        alone = jnp.concatenate([conv.apply({"params": flat}, video[:, t:t + 1])[:, :1] for t in kept], axis=1)
        assert relative_error(out, np.asarray(alone)) < 1e-5
        print(f"strides {strides}: inflated output vs frames alone {relative_error(out, np.asarray(alone)):.1e}, "
              f"original {relative_error(conv.apply({'params': conv_params}, video), np.asarray(alone)):.2f}")
        assert relative_error(conv.apply({"params": conv_params}, video), np.asarray(alone)) > 0.1
