"""Flow matching in the convention of the released weights (reference §4): σ is the noise level.

    x_σ = (1 − σ)·x + σ·ε          ε ~ N(0, I), x the (scaled) VAE latents, σ ∈ [0, 1]
    target = ε − x                  the velocity dx_σ/dσ the model predicts
    model timestep = 1000·σ         1000 is pure noise

Training draws σ per sample from a density (uniform, logit-normal, or SD3's "mode" density), then applies the
time shift σ ← s·σ / (1 + (s − 1)·σ), which moves σ towards noise for s > 1. With `shift_base_tokens` > 0 the
shift grows with the number of image tokens as SD3 proposes for higher resolutions, s·√(tokens / base_tokens).
The loss is the per-sample mean squared error to the target, optionally weighted by a function of σ
(`sigma_sqrt` σ⁻², `cosmap` 2 / (π·(1 − 2σ + 2σ²)), as diffusers' `compute_loss_weighting_for_sd3`).

The cfg-distilled model also takes the embedded guidance scale: a constant, or for distillation a scale sampled
uniformly from a range per sample; the model input is scale × 1000 rounded to bf16 as the released pipelines do
(6.0 → 6016.0).

Image-to-video (a model with `image_condition_type`, HunyuanVideo-I2V): x is the clip's latents [B, T, H, W, C],
T ≥ 2, and `image_latent` [B, 1, H, W, C] its first frame encoded alone (what the sampler conditions on; the
causal VAE's latent frame 0 of the whole clip is not it, since its GroupNorm statistics span all frames). The
model reads `models.image_condition.model_input(kind, x_σ, image_latent)`: for "token_replace" x_σ with frame 0
replaced by the clean image latent (modulated with timestep 0 inside the model), for "latent_concat" [x_σ | image
latent on frame 0 | mask]. The loss is the mean over latent frames 1.. only: frame 0 is given, never generated (the
sampler keeps or drops it). (The official I2V trainer, for the concatenating model, averages over every frame.)

Sampling integrates σ from 1 to 0 on `sigma_schedule(N, shift)` = shift(linspace(1, 0, N + 1)) with Euler steps
x ← x + v·(σ_next − σ).
"""

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.models import image_condition

SIGMA_DENSITIES = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
_MIN_WEIGHT_SIGMA = 1e-3  # σ⁻² is clipped here so that σ → 0 cannot blow a loss up to inf


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """The `config.flow` section (see the module docstring).

    `guidance_range` (lo, hi) samples the embedded guidance scale uniformly per sample (cfg distillation); an
    empty range uses the constant `guidance`. (The sampler's steps, shift and guidance are `config.sample`.)
    """
    sigma_density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    shift_base_tokens: int = 0
    loss_weighting: str = "none"
    guidance: float = 1.0
    guidance_range: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "guidance_range", tuple(float(g) for g in self.guidance_range))
        self.validate()

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        def fail(field, msg):
            raise ValueError(f"flow.{field}: {msg}")
        if self.sigma_density not in SIGMA_DENSITIES:
            fail("sigma_density", f"must be one of {SIGMA_DENSITIES}, got {self.sigma_density!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            fail("loss_weighting", f"must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if not self.logit_std > 0:
            fail("logit_std", f"must be positive, got {self.logit_std}")
        if not self.shift > 0:
            fail("shift", f"must be positive, got {self.shift}")
        if self.shift_base_tokens < 0:
            fail("shift_base_tokens", f"must be >= 0 (0: no resolution-dependent shift), got {self.shift_base_tokens}")
        # The mode density maps [0, 1] onto itself monotonically only for scales in this range.
        if not -1.0 <= self.mode_scale <= 2.0 / (math.pi - 2.0):
            fail("mode_scale", f"must be in [-1, {2 / (math.pi - 2):.4f}] for a monotone map, got {self.mode_scale}")
        if self.guidance_range and (len(self.guidance_range) != 2 or self.guidance_range[0] > self.guidance_range[1]):
            fail("guidance_range", f"must be empty or (low, high) with low <= high, got {self.guidance_range}")

    @classmethod
    def from_config(cls, config: "FlowConfig | Mapping[str, Any]") -> "FlowConfig":
        return from_fields(cls, config, "flow")


# ---------------------------------------------------------------------------------------------------- σ and shift
def time_shift(sigma, shift: float):
    """σ ↦ s·σ / (1 + (s − 1)·σ) ("sd3_time_shift"); identity for s = 1, keeps 0 and 1 fixed."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def resolution_shift(config: FlowConfig, num_tokens: int) -> float:
    """The training shift for clips of `num_tokens` image tokens: `shift`, times √(tokens / shift_base_tokens) when
    the base is set (SD3's resolution-dependent shift: more tokens keep more signal at equal σ, so shift more)."""
    if config.shift_base_tokens == 0:
        return float(config.shift)
    return float(config.shift) * math.sqrt(num_tokens / config.shift_base_tokens)


def sigma_from_uniform(u, config: FlowConfig):
    """The "mode" density's map of u ~ U(0, 1) to σ (diffusers' `compute_density_for_timestep_sampling`):
    1 − u − scale·(cos²(πu/2) − 1 + u); scale 0 is uniform, positive scales favour mid-range σ."""
    return 1.0 - u - config.mode_scale * (jnp.cos(jnp.pi * u / 2.0) ** 2 - 1.0 + u)


def sample_sigma(rng, shape, config: FlowConfig, num_tokens: int = 0):
    """σ of `shape` (fp32) from `config.sigma_density`, then shifted (resolution-dependent if configured)."""
    if config.sigma_density == "logit_normal":
        sigma = jax.nn.sigmoid(config.logit_mean + config.logit_std * jax.random.normal(rng, shape, jnp.float32))
    else:
        u = jax.random.uniform(rng, shape, jnp.float32)
        sigma = u if config.sigma_density == "uniform" else sigma_from_uniform(u, config)
    return time_shift(sigma, resolution_shift(config, num_tokens))


def sigma_schedule(num_steps: int, shift: float) -> np.ndarray:
    """The sampler's σ grid [num_steps + 1] (fp32, from 1 down to 0): shift(linspace(1, 0, N + 1)); the model sees
    timesteps 1000·σ[:-1] and the Euler step is x ← x + v·(σ[i+1] − σ[i])."""
    sigmas = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
    return time_shift(sigmas, float(shift)).astype(np.float32)


# --------------------------------------------------------------------------------------------- noising and target
def noised(x, noise, sigma):
    """x_σ = (1 − σ)·x + σ·ε with σ [B] broadcast over the trailing axes of x [B, ...]."""
    s = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (1.0 - s) * x + s * noise


def velocity_target(x, noise):
    """ε − x: dx_σ/dσ, what the model predicts (and what the sampler integrates from σ = 1 to 0)."""
    return noise - x


def loss_weight(sigma, weighting: str):
    """Per-sample weight [B] of the squared error at noise level σ [B]."""
    if weighting == "sigma_sqrt":
        return 1.0 / jnp.square(jnp.maximum(sigma, _MIN_WEIGHT_SIGMA))
    if weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * sigma + 2.0 * jnp.square(sigma)))
    return jnp.ones_like(sigma)


def guidance_input(rng, batch_size: int, config: FlowConfig):
    """The model's guidance input [B] (fp32): scale × 1000 rounded to bf16 (6.0 → 6016.0); the scale is
    `config.guidance`, or uniform in `config.guidance_range` per sample."""
    if config.guidance_range:
        low, high = config.guidance_range
        scale = jax.random.uniform(rng, (batch_size,), jnp.float32, low, high)
    else:
        scale = jnp.full((batch_size,), config.guidance, jnp.float32)
    return (scale * 1000.0).astype(jnp.bfloat16).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------------ objective
def image_tokens(latent_shape, patch_size: int, patch_size_t: int) -> int:
    """Image tokens of one clip with latents [T, H, W, ...]."""
    t, h, w = latent_shape[:3]
    return (t // patch_size_t) * (h // patch_size) * (w // patch_size)


def caption_dropped(rngs, rate: float):
    """[B] bool: which samples train on the empty prompt, from their keys [B] (deterministic per sample and step)."""
    if rate <= 0:
        return jnp.zeros(rngs.shape[:1], bool)
    return jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 3), rate))(rngs)


def loss_frames(image_condition_type: str | None, num_frames: int):
    """[T] fp32 weights of the latent frames in the loss, 1 on frames 1.. for image-to-video (frame 0 is the given
    image); None for text-to-video (every frame). A weight rather than a slice keeps the sharded token axis whole."""
    if image_condition_type is None:
        return None
    if num_frames < 2:
        raise ValueError(f"image-to-video training needs clips of at least 2 latent frames (frame 0 is the image, "
                         f"the loss is on the later ones), got {num_frames}: use buckets of 5 frames or more")
    return (jnp.arange(num_frames) >= 1).astype(jnp.float32)


def framed_mse(prediction, target, frames):
    """Per-sample mean squared error [B] over the frames weighted 1 by `frames` [T] (latents [B, T, ...]; None:
    over all of them)."""
    error = jnp.square(prediction.astype(jnp.float32) - target)
    if frames is None:
        return jnp.mean(error.reshape(error.shape[0], -1), axis=-1)
    per_frame = jnp.sum(error.reshape(*error.shape[:2], -1), axis=-1)   # [B, T]
    return jnp.sum(per_frame * frames, axis=-1) / (jnp.sum(frames) * math.prod(error.shape[2:]))


def flow_matching_objective(model, config: FlowConfig, caption_dropout: float = 0.0,
                            null_text: Mapping[str, Any] | None = None) -> Callable:
    """`objective(params, batch, rngs) -> (loss_sum, sums)` for the DiT on a batch of tokenized clips.

    batch: latents [B, T, H, W, C], text_states [B, L, D], text_mask [B, L], pooled_text [B, Dp], for an
    image-to-video model image_latent [B, 1, H, W, C] (module docstring), and optionally valid [B] (padding slots
    count zero). rngs: one PRNG key per sample [B] (so a sample draws the same σ, ε and guidance whatever
    micro-batch it lands in). Returns Σ_b valid_b·w(σ_b)·mean((v_b − (ε_b − x_b))²) (image-to-video: the mean over
    frames 1..) and a dict of sums over valid samples, including "count" (the number of valid samples): the mean
    loss is loss_sum / count.
    With `caption_dropout` > 0, each sample trains on `null_text` ({"text_states" [L, D], "text_mask" [L],
    "pooled_text" [Dp]}, the empty prompt; for an image-to-video model encoded with a black image, as the
    sampler's negative prompt is) instead of its caption with that chance (`caption_dropped`); the image latent
    stays.
    """
    cfg = model.config
    kind = cfg.image_condition_type
    if caption_dropout > 0 and null_text is None:
        raise ValueError("caption dropout needs the empty prompt's encoding (null_text)")

    def objective(params, batch, rngs):
        if caption_dropout > 0:   # the empty prompt's text for the dropped samples
            drop = caption_dropped(rngs, caption_dropout)
            batch = dict(batch, **{k: jnp.where(drop.reshape((-1,) + (1,) * (batch[k].ndim - 1)),
                                                jnp.asarray(null_text[k], batch[k].dtype)[None], batch[k])
                                   for k in ("text_states", "text_mask", "pooled_text")})
        x = batch["latents"].astype(jnp.float32)
        b = x.shape[0]
        tokens = image_tokens(x.shape[1:], cfg.patch_size, cfg.patch_size_t)
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(rngs)
        sigma = jax.vmap(lambda k: sample_sigma(k, (), config, tokens))(keys[:, 0])
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys[:, 1])
        guidance = None
        if cfg.guidance_embed:
            guidance = jax.vmap(lambda k: guidance_input(k, 1, config)[0])(keys[:, 2])
        frames = loss_frames(kind, x.shape[1])
        if kind is not None and "image_latent" not in batch:
            raise ValueError(f"an image-to-video model ({kind}) trains on batches with image_latent "
                             f"(data.with_image_latent)")
        image = None if kind is None else batch["image_latent"].astype(jnp.float32)
        inputs = image_condition.model_input(kind, noised(x, noise, sigma), image)
        prediction = model.apply({"params": params}, inputs, 1000.0 * sigma,
                                 batch["text_states"], batch["text_mask"], batch["pooled_text"], guidance)
        mse = framed_mse(prediction, velocity_target(x, noise), frames)
        valid = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((b,), jnp.float32)
        loss_sum = jnp.sum(valid * loss_weight(sigma, config.loss_weighting) * mse)
        sums = {"loss": loss_sum, "mse": jnp.sum(valid * mse), "sigma": jnp.sum(valid * sigma),
                "count": jnp.sum(valid)}
        return loss_sum, sums
    return objective
