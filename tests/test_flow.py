"""Flow matching: σ densities and shift against diffusers' training utilities, the sampler's σ grid against diffusers'
scheduler and the reference values, noising / target / weights / guidance, and the DiT objective's bookkeeping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from scipy.stats import norm

from configs import tiny
from hyvideo_jax import flow
from hyvideo_jax.flow import FlowConfig
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT


def test_sigma_schedule_matches_diffusers_and_reference():
    sigmas = flow.sigma_schedule(50, 7.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 51)[:-1])
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), atol=1e-6)
    np.testing.assert_allclose(1000.0 * sigmas[:-1], scheduler.timesteps.numpy(), rtol=1e-6)
    # Reference §4.2, N=50, s=7: 1.0, 0.997093, 0.994083, 0.990964, ..., 0.308824, 0.225806, 0.125, 0.
    np.testing.assert_allclose(sigmas[:4], [1.0, 0.997093, 0.994083, 0.990964], atol=1e-6)
    np.testing.assert_allclose(sigmas[-4:], [0.308824, 0.225806, 0.125, 0.0], atol=1e-6)
    assert sigmas.dtype == np.float32 and np.all(np.diff(sigmas) < 0)


def test_shift_and_resolution_shift():
    np.testing.assert_allclose(flow.time_shift(np.array([0.0, 0.5, 1.0]), 3.0), [0.0, 0.75, 1.0])
    np.testing.assert_allclose(flow.time_shift(np.array([0.2, 0.7]), 1.0), [0.2, 0.7])
    config = FlowConfig(shift=1.5, shift_base_tokens=256)
    assert flow.resolution_shift(config, 1024) == pytest.approx(3.0)      # 1.5 · √4
    assert flow.resolution_shift(FlowConfig(shift=5.0), 118_800) == 5.0
    # A shifted density is the shift of the unshifted one, draw for draw.
    rng = jax.random.PRNGKey(3)
    plain = flow.sample_sigma(rng, (64,), FlowConfig(sigma_density="uniform"))
    shifted = flow.sample_sigma(rng, (64,), FlowConfig(sigma_density="uniform", shift=1.5, shift_base_tokens=256),
                                num_tokens=1024)
    np.testing.assert_allclose(shifted, 3.0 * plain / (1.0 + 2.0 * plain), rtol=1e-6)


def test_logit_normal_quantiles():
    config = FlowConfig(sigma_density="logit_normal", logit_mean=0.5, logit_std=0.8)
    sigma = np.asarray(flow.sample_sigma(jax.random.PRNGKey(0), (40_000,), config))
    qs = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    expected = 1.0 / (1.0 + np.exp(-(0.5 + 0.8 * norm.ppf(qs))))
    np.testing.assert_allclose(np.quantile(sigma, qs), expected, atol=0.01)
    # diffusers draws the same distribution: compare quantiles of its sample with ours.
    theirs = compute_density_for_timestep_sampling("logit_normal", 40_000, logit_mean=0.5, logit_std=0.8,
                                                   generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_allclose(np.quantile(sigma, qs), np.quantile(theirs, qs), atol=0.01)


def test_uniform_and_mode_densities_match_diffusers():
    config = FlowConfig(sigma_density="mode", mode_scale=1.29)
    theirs = compute_density_for_timestep_sampling("mode", 1000, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(7)).numpy()
    u = torch.rand(1000, generator=torch.Generator().manual_seed(7)).numpy()   # the uniforms diffusers drew
    np.testing.assert_allclose(flow.sigma_from_uniform(jnp.asarray(u), config), theirs, atol=1e-6)
    uniform = np.asarray(flow.sample_sigma(jax.random.PRNGKey(1), (40_000,), FlowConfig(sigma_density="uniform")))
    np.testing.assert_allclose(np.quantile(uniform, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.01)
    mode = np.asarray(flow.sample_sigma(jax.random.PRNGKey(1), (40_000,), config))
    assert mode.min() >= 0.0 and mode.max() <= 1.0
    # scale 1.29 concentrates σ around 0.5: the middle half of the draws spans less than uniform's 0.5.
    assert np.quantile(mode, 0.75) - np.quantile(mode, 0.25) < 0.4


def test_noising_target_and_weights():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 4, 4, 4))
    eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    np.testing.assert_array_equal(flow.noised(x, eps, jnp.zeros(3)), x)
    np.testing.assert_array_equal(flow.noised(x, eps, jnp.ones(3)), eps)
    sigma = jnp.array([0.2, 0.5, 0.9])
    h = 1e-3  # x_σ is linear in σ, so the finite difference is the derivative up to rounding
    derivative = (flow.noised(x, eps, sigma + h) - flow.noised(x, eps, sigma - h)) / (2 * h)
    np.testing.assert_allclose(derivative, flow.velocity_target(x, eps), atol=2e-3)
    s = torch.tensor([0.1, 0.5, 0.8])
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        theirs = compute_loss_weighting_for_sd3(scheme if scheme != "none" else "logit_normal", s).numpy()
        np.testing.assert_allclose(flow.loss_weight(jnp.asarray(s.numpy()), scheme), theirs, rtol=1e-6)
    assert np.isfinite(flow.loss_weight(jnp.zeros(1), "sigma_sqrt")).all()


def test_guidance_input_bf16_rounding():
    np.testing.assert_array_equal(flow.guidance_input(None, 2, FlowConfig(guidance=6.0)), [6016.0, 6016.0])
    np.testing.assert_array_equal(flow.guidance_input(None, 1, FlowConfig(guidance=1.0)), [1000.0])
    g = np.asarray(flow.guidance_input(jax.random.PRNGKey(0), 4096, FlowConfig(guidance_range=(1.0, 8.0))))
    assert g.min() >= 1000.0 and g.max() <= 8000.0 and g.std() > 1500.0   # uniform on [1000, 8000]: std ≈ 2021
    np.testing.assert_array_equal(g.astype(jnp.bfloat16).astype(np.float32), g)   # every value is a bf16


def _tiny_model():
    return HunyuanVideoDiT(DiTConfig.from_config(tiny.get_config().model))


def _batch(b, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, 32), np.int32)
    mask[:, :12] = 1
    return dict(latents=rng.standard_normal((b, 2, 4, 4, 4)).astype(np.float32),
                text_states=rng.standard_normal((b, 32, 32)).astype(np.float32), text_mask=mask,
                pooled_text=rng.standard_normal((b, 24)).astype(np.float32), valid=np.ones(b, bool))


def test_objective_matches_manual_loss_and_ignores_padding():
    model = _tiny_model()
    config = FlowConfig(sigma_density="logit_normal", guidance=6.0, loss_weighting="cosmap")
    batch = _batch(3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["latents"], jnp.ones(3), batch["text_states"],
                                 batch["text_mask"], batch["pooled_text"], jnp.ones(3))["params"]
    rngs = jax.random.split(jax.random.PRNGKey(5), 3)
    objective = jax.jit(flow.flow_matching_objective(model, config))
    loss_sum, sums = objective(params, batch, rngs)
    # The same draws by hand: σ from key 0 of each sample's split, ε from key 1, guidance 6016.
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(rngs)
    sigma = jax.vmap(lambda k: flow.sample_sigma(k, (), config))(keys[:, 0])
    eps = jax.vmap(lambda k: jax.random.normal(k, (2, 4, 4, 4)))(keys[:, 1])
    x = jnp.asarray(batch["latents"])
    s = sigma[:, None, None, None, None]
    v = jax.jit(model.apply)({"params": params}, (1 - s) * x + s * eps, 1000 * sigma, batch["text_states"],
                             batch["text_mask"], batch["pooled_text"], jnp.full(3, 6016.0))
    mse = np.mean(np.square(np.asarray(v) - np.asarray(eps - x)).reshape(3, -1), axis=1)
    weight = 2 / (np.pi * (1 - 2 * np.asarray(sigma) + 2 * np.asarray(sigma) ** 2))
    np.testing.assert_allclose(loss_sum, np.sum(weight * mse), rtol=1e-5)
    np.testing.assert_allclose(sums["mse"], mse.sum(), rtol=1e-5)
    assert float(sums["count"]) == 3.0
    # A padding slot (valid False) contributes nothing: the sum equals that of the valid samples alone.
    padded = dict(batch, valid=np.array([True, False, True]))
    loss_padded, sums_padded = objective(params, padded, rngs)
    np.testing.assert_allclose(loss_padded, weight[0] * mse[0] + weight[2] * mse[2], rtol=1e-5)
    assert float(sums_padded["count"]) == 2.0


@pytest.mark.parametrize("field,value,message", [
    ("sigma_density", "cosine", "flow.sigma_density"),
    ("logit_std", 0.0, "flow.logit_std"),
    ("shift", -1.0, "flow.shift"),
    ("guidance_range", (8.0, 1.0), "flow.guidance_range"),
    ("loss_weighting", "snr", "flow.loss_weighting"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        FlowConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown flow config field"):
        FlowConfig.from_config({"sigma_sampling": "uniform"})
    assert math.isclose(FlowConfig.from_config({"shift": 7.0}).shift, 7.0)
