"""What the trainer trains: a model and its objective (`Task`), one per `train.objective` (the registry
`OBJECTIVES`). "flow" is the DiT by flow matching on tokenized clips (with optional caption dropout and LoRA
adapters, `config.lora`; image-to-video when `config.model.image_condition_type` is set, on clips that hold their
first frame's latent, `data.with_image_latent`), "vae" the VAE's reconstruction + KL objective on videos. An
objective returns a sum over a micro-batch's samples and how many it counts, so the train step's accumulation gives
the batch mean exactly.
"""

from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from absl import logging

from hyvideo_jax import flow
from hyvideo_jax import lora as lora_lib
from hyvideo_jax.data import pipeline
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT, forward_flops


class Task(NamedTuple):
    """A model and its objective. `objective(params, batch, rngs [B]) -> (loss_sum, sums incl. "count")`;
    `example_inputs(mesh)` initialize the model (under that mesh); `batch_keys` are read from the pipeline's
    batches; `tokens(shapes)` counts the tokens of a batch for throughput; `model_flops(shapes)` the model FLOPs
    of one forward+backward over the batch (None: use XLA's count of the compiled program)."""
    model: nn.Module
    objective: Callable
    example_inputs: Callable[[Any], tuple]
    batch_keys: tuple[str, ...]
    tokens: Callable[[Mapping[str, tuple]], int]
    model_flops: Callable[[Mapping[str, tuple]], float] | None = None
    lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig()


def check_clips(cfg: DiTConfig, data: pipeline.DataConfig):
    """ValueError naming the field if the clips of `data` do not fit the transformer `cfg`: their latent channels
    (the latent_concat model reads [latents | image latent | mask], 2C + 1 channels, and predicts C) and, for an
    image-to-video model, their first-frame latents (`data.with_image_latent`)."""
    kind = cfg.image_condition_type
    channels, field = (cfg.out_channels, "out_channels") if kind == "latent_concat" else (cfg.in_channels,
                                                                                         "in_channels")
    if data.latent_channels != channels:
        raise ValueError(f"data.latent_channels {data.latent_channels} differs from model.{field} {channels}")
    if data.with_image_latent != (kind is not None):
        raise ValueError(
            f"data.with_image_latent is {data.with_image_latent}, model.image_condition_type {kind!r}: "
            + ("image-to-video training reads each clip's first-frame latent: prepare the clips with this config "
               "(it writes them) and set data.with_image_latent=True" if kind is not None else
               "the first-frame latents are for image-to-video models; set data.with_image_latent=False"))


def flow_task(config) -> Task:
    cfg = DiTConfig.from_config(config.model)
    model = HunyuanVideoDiT(cfg)
    data = pipeline.DataConfig.from_config(config.data)
    check_clips(cfg, data)
    kind = cfg.image_condition_type

    def example(mesh):
        # As many image tokens as the 'sequence' axis has devices: sequence-parallel attention splits them.
        width = cfg.patch_size * dict(mesh.shape).get("sequence", 1)
        return (jnp.zeros((1, cfg.patch_size_t, cfg.patch_size, width, cfg.in_channels)), jnp.ones((1,)),
                jnp.zeros((1, data.text_len, cfg.text_states_dim)), jnp.ones((1, data.text_len), jnp.int32),
                jnp.zeros((1, cfg.pooled_text_dim)), jnp.ones((1,)) if cfg.guidance_embed else None)

    def tokens(shapes):
        b, *latent = shapes["latents"]
        return b * flow.image_tokens(latent, cfg.patch_size, cfg.patch_size_t)

    def model_flops(shapes):
        # Counted from the config: XLA's cost analysis sees a scanned block once and nothing inside Pallas kernels.
        b, *latent = shapes["latents"]
        n_img = flow.image_tokens(latent, cfg.patch_size, cfg.patch_size_t)
        return 3.0 * sum(forward_flops(cfg, n_img, shapes["text_states"][1], b))   # forward + backward
    objective = flow.flow_matching_objective(model, flow.FlowConfig.from_config(config.flow), data.caption_dropout,
                                             null_text(config, data) if data.caption_dropout > 0 else None)
    keys = ("latents", "text_states", "text_mask", "pooled_text", "valid") + (("image_latent",) if kind else ())
    return Task(model, objective, example, keys, tokens, model_flops,
                lora_lib.LoRAConfig.from_config(config.get("lora")))


def null_text(config, data: pipeline.DataConfig) -> dict[str, np.ndarray]:
    """The empty prompt's encoding for caption dropout: the one prepare stored beside the clips, else encoded now
    by the config's text encoders (for an image-to-video model, `ImagePromptEncoders` with a black image, as the
    sampler encodes its negative prompt)."""
    stored = pipeline.read_null_text(data.path) if data.source == "arrayrecord" else None
    if stored is None:
        logging.info("Encoding the empty prompt for caption dropout (%s has none stored)", data.path or data.source)
        kind = DiTConfig.from_config(config.model).image_condition_type
        if kind is None:
            from hyvideo_jax.text import TextEncoders
            encoded = TextEncoders.from_config(config.text).encode_prompts([""])
        else:
            from hyvideo_jax.image_prompts import ImagePromptEncoders
            encoders = ImagePromptEncoders.from_config(config.text, image_condition_type=kind)
            size = encoders.llava_config.vision.image_size
            encoded = encoders.encode_negative([""], size, size)
        stored = dict(zip(("text_states", "text_mask", "pooled_text"), (np.asarray(a)[0] for a in encoded)))
    want = {"text_states": (data.text_len, data.text_dim), "text_mask": (data.text_len,),
            "pooled_text": (data.pooled_dim,)}
    for key, shape in want.items():
        if tuple(stored[key].shape) != shape:
            raise ValueError(f"data.caption_dropout: the empty prompt's {key} has shape {tuple(stored[key].shape)}, "
                             f"the clips {shape} (data.text_len / text_dim / pooled_dim)")
    return stored


def vae_task(config) -> Task:
    from hyvideo_jax.models.vae import HunyuanVideoVAE, VAEConfig
    from hyvideo_jax.vae_objective import VAELossConfig, vae_loss

    cfg = VAEConfig.from_config(config.vae.model)
    model, loss_config = HunyuanVideoVAE(cfg), VAELossConfig.from_config(config.vae.loss)
    size = cfg.spatial_compression_ratio

    def objective(params, batch, rngs):
        # vae_loss averages over the valid samples; scaled back to a sum so micro-batches add up to the batch mean.
        count = jnp.sum(jnp.asarray(batch["valid"], jnp.float32)) if "valid" in batch else batch["video"].shape[0]
        loss, metrics = vae_loss(model, loss_config, params, batch, rngs[0])
        return loss * count, {k: v * count for k, v in dict(metrics, count=1.0).items()}

    def tokens(shapes):
        b, t, h, w, _ = shapes["video"]
        return b * t * h * w   # pixels
    return Task(model, objective, lambda mesh: (jnp.zeros((1, 1, size, size, cfg.in_channels)),), ("video", "valid"),
                tokens)


OBJECTIVES: dict[str, Callable[[Any], Task]] = {"flow": flow_task, "vae": vae_task}
