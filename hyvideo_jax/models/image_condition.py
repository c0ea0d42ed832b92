"""The transformer inputs of HunyuanVideo-I2V (`DiTConfig.image_condition_type`), channel-last [B, T, H, W, C].

What the references do with the image latent (the VAE-encoded image, distribution mode × scaling factor, one latent
frame), in diffusers 0.42.1 (`HunyuanVideoImageToVideoPipeline`) and the official HunyuanVideo-I2V code
(`hyvideo/diffusion/pipelines/pipeline_hunyuan_video.py`; the 33-channel model is its first release, 2025-03-06):

- Both start from x = 0.999·noise + 0.001·image latent on every frame (`initial_latents`).
- "latent_concat" ("HYVideo-T/2-I2V-33ch"): the model reads, concatenated on channels, [x (C) | the image latent on
  latent frame 0 and zeros on the later frames (C) | a mask channel, 1 on frame 0 and 0 after] = 2C + 1 = 33
  channels (`latent_concat_input`), and predicts C. The sampler steps every frame of x, frame 0 included; the
  pipelines drop latent frame 0 from a latent output (and the first 4 frames of a decoded video). No guidance is
  embedded: diffusers' config has guidance_embeds=False, and the official first release built "HYVideo-T/2" without
  `--embedded-cfg-scale` (so guidance_embed=False); guidance there is true CFG only. Its text states keep every 2nd
  LLaVA image feature (image_embed_interleave 2).
- "token_replace" ("HYVideo-T/2-I2V-16ch"): the model reads x with latent frame 0 replaced by the image latent
  (`token_replace_input`) and is conditioned on timestep 0 for that frame's tokens (inside the model); the sampler
  steps frames 1.. only and puts the image latent back on frame 0. Guidance is embedded (guidance_embeds=True;
  the official scripts pass `--embedded-cfg-scale 6.0`). Its text states keep every 4th LLaVA image feature.
"""

import jax.numpy as jnp
import numpy as np

FIRST_FRAME_NOISE = np.float32(0.999)   # the references' `t` in x = t·noise + (1 − t)·image latent


def _first_frame(image_latent, latents):
    """The image latent as one frame [B, 1, H, W, C] (a longer one contributes its frame 0, as the references use)."""
    if image_latent.ndim != 5 or image_latent.shape[0] != latents.shape[0] or \
            image_latent.shape[2:] != latents.shape[2:]:
        raise ValueError(f"the image latent must be [B, 1, H, W, C] = {(latents.shape[0], 1, *latents.shape[2:])} "
                         f"like the latents {latents.shape}, got {image_latent.shape}")
    return image_latent[:, :1].astype(latents.dtype)


def initial_latents(noise, image_latent):
    """The references' starting point 0.999·noise + 0.001·image latent (every frame; fp32 like theirs)."""
    noise = jnp.asarray(noise, jnp.float32)
    return noise * FIRST_FRAME_NOISE + _first_frame(jnp.asarray(image_latent, jnp.float32), noise) * (
        np.float32(1) - FIRST_FRAME_NOISE)


def latent_concat_input(latents, image_latent):
    """[B, T, H, W, 2C + 1] = [latents | image latent on frame 0, zeros after | mask 1 on frame 0, 0 after]."""
    latents = jnp.asarray(latents)
    image = _first_frame(jnp.asarray(image_latent), latents)
    later = latents.shape[1] - 1
    condition = jnp.concatenate([image, jnp.zeros((*image.shape[:1], later, *image.shape[2:]), latents.dtype)], 1)
    mask = (jnp.arange(latents.shape[1]) == 0).astype(latents.dtype)
    mask = jnp.broadcast_to(mask[None, :, None, None, None], (*latents.shape[:4], 1))
    return jnp.concatenate([latents, condition, mask], axis=-1)


def token_replace_input(latents, image_latent):
    """[B, T, H, W, C]: the latents with latent frame 0 replaced by the image latent."""
    latents = jnp.asarray(latents)
    return jnp.concatenate([_first_frame(jnp.asarray(image_latent), latents), latents[:, 1:]], axis=1)


MODEL_INPUTS = {"latent_concat": latent_concat_input, "token_replace": token_replace_input}


def model_input(image_condition_type: str | None, latents, image_latent=None):
    """What a transformer of this `image_condition_type` reads at a step with latents x (the latents themselves for
    text-to-video)."""
    if image_condition_type is None:
        if image_latent is not None:
            raise ValueError("a text-to-video transformer (image_condition_type None) takes no image latent")
        return jnp.asarray(latents)
    if image_condition_type not in MODEL_INPUTS:
        raise ValueError(f"image_condition_type must be one of {(None, *MODEL_INPUTS)}, got {image_condition_type!r}")
    if image_latent is None:
        raise ValueError(f"an image-to-video transformer ({image_condition_type}) needs the image latent")
    return MODEL_INPUTS[image_condition_type](latents, image_latent)
