"""The VAE training objective: L1 (and/or squared) reconstruction + KL to N(0, I), optionally a temporal term.

    loss, metrics = vae_loss(HunyuanVideoVAE(model_config), VAELossConfig.from_config(config.vae.loss), params,
                             batch, rng)

The trainer's one train step trains it (`train.objective="vae"`).

`batch["video"]` is [B, T, H, W, C] in [-1, 1] (T = 4k+1). Terms, each a mean so weights do not depend on the
clip size except the KL, which follows diffusers' `DiagonalGaussianDistribution.kl()` (summed over latent
elements, averaged over the batch):
  reconstruction = mean |x̂ - x|
  squared        = mean (x̂ - x)²
  kl             = mean_b ½ Σ (μ² + σ² - 1 - log σ²)
  temporal       = mean |(x̂_{t+1} - x̂_t) - (x_{t+1} - x_t)|   (penalises flicker the target does not have)
  loss = l1_weight·reconstruction + l2_weight·squared + kl_weight·kl + temporal_weight·temporal

The squared term matters when training from scratch on videos that are mostly background (the demo's shapes): L1's
gradient has the same size at every pixel however small its error, so the many background pixels drown the few
pixels of a small object and the model stays at the background (the median) for a long time; the squared error's
gradient shrinks with the error, leaving the object's pixels to drive training.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.models.vae import HunyuanVideoVAE


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """Weights of the loss terms and whether the latent is sampled from the posterior (else its mode is used)."""
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6
    temporal_weight: float = 0.0
    sample_posterior: bool = True

    def __post_init__(self):
        for field in ("l1_weight", "l2_weight", "kl_weight", "temporal_weight"):
            if float(getattr(self, field)) < 0:
                raise ValueError(f"vae.loss.{field}: must be >= 0, got {getattr(self, field)}")

    @classmethod
    def from_config(cls, config: "VAELossConfig | Mapping[str, Any]") -> "VAELossConfig":
        return from_fields(cls, config, "vae.loss")


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) ‖ N(0, I)) summed over all but the batch axis: [B, ...] → [B]."""
    per_element = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(per_element.reshape(per_element.shape[0], -1), axis=-1)


def temporal_smoothness(reconstruction, target):
    """Per-sample mean L1 distance between the frame-to-frame differences of reconstruction and target
    ([B, T, H, W, C] → [B]; zeros for single frames)."""
    if reconstruction.shape[1] < 2:
        return jnp.zeros(reconstruction.shape[:1], jnp.float32)
    diff_rec = jnp.diff(reconstruction.astype(jnp.float32), axis=1)
    diff_tgt = jnp.diff(target.astype(jnp.float32), axis=1)
    return _per_sample_mean(jnp.abs(diff_rec - diff_tgt))


def _per_sample_mean(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def vae_loss(model: HunyuanVideoVAE, loss_config: VAELossConfig, params, batch: Mapping[str, jax.Array], rng):
    """(loss, metrics) of one batch; pure, so it can be differentiated and jitted. See the module docstring.

    With `batch["valid"]` ([B] bool, as the data pipeline marks padding slots) the terms average over the valid
    samples only (0 if there are none)."""
    video = batch["video"]
    reconstruction, mean, logvar = model.apply({"params": params}, video,
                                               rng if loss_config.sample_posterior else None)
    error = reconstruction.astype(jnp.float32) - video.astype(jnp.float32)
    terms = {"reconstruction_l1": _per_sample_mean(jnp.abs(error)), "reconstruction_l2": _per_sample_mean(error ** 2),
             "kl": kl_divergence(mean, logvar), "temporal": temporal_smoothness(reconstruction, video)}
    weights = jnp.asarray(batch["valid"], jnp.float32) if "valid" in batch else jnp.ones(video.shape[:1])
    terms = {k: jnp.sum(v * weights) / jnp.maximum(jnp.sum(weights), 1.0) for k, v in terms.items()}
    loss = (loss_config.l1_weight * terms["reconstruction_l1"] + loss_config.l2_weight * terms["reconstruction_l2"]
            + loss_config.kl_weight * terms["kl"] + loss_config.temporal_weight * terms["temporal"])
    return loss, dict(terms, loss=loss)
