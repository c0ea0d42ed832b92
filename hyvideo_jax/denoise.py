"""The flow-matching denoising loop as one jitted program: initial noise and text conditioning → latents.

    latents = denoise(model, params, noise, text_states, text_mask, pooled, steps=50, shift=7.0, guidance=6.0)

The loop follows the released pipelines (reference §4.2): σ = `flow.sigma_schedule(steps, shift)` from 1 to 0,
the model sees t = 1000·σ (fp32), the Euler step x ← x + (σ_next − σ)·v is taken in fp32. The embedded guidance
scale g goes in as g × 1000 rounded to bf16 (6.0 → 6016.0), as `flow.guidance_input` does. True classifier-free
guidance (`true_cfg_scale` > 1 with a negative prompt) is diffusers': v = v_neg + s·(v_cond − v_neg), both branches
with the embedded guidance; the two branches run as one batch of 2B, so under a mesh they spread over the batch
axes like prompts do.

`denoise` compiles the whole loop (`lax.fori_loop`) into one program: a 50-step video is one dispatch. Progress
comes back per step through `jax.debug.callback` (a host progress bar; off with `progress=False`). Under a mesh
(`mesh=`), parameters keep the shardings the loader gave them (the rules table: FSDP over 'fsdp'), activations
follow the model's logical axes: samples over ('data', 'fsdp'), image tokens over 'sequence' (Ulysses or ring,
`model.sequence_parallel`).

Image-to-video (a transformer with `image_condition_type`, HunyuanVideo-I2V): `image_latent` [B, 1, h, w, C] is the
VAE-encoded reference image (mode × scaling factor). As `HunyuanVideoImageToVideoPipeline`, the loop starts from
0.999·noise + 0.001·image latent; "token_replace" puts the image latent on latent frame 0 of every model input and
after every step (the scheduler steps frames 1 onward), "latent_concat" feeds [latents | image frame | mask] and
steps every frame (`models.image_condition`).

`latent_shape` and `check_sequence_split` turn a request the VAE, the patch size or the mesh cannot serve into a
sentence before anything is loaded or compiled. `hyvideo_jax.sample` (prompts → videos, the CLI) runs `denoise`;
`hyvideo_jax.sample_cache` (cached sampling) shares its checks and text handling.
"""

import functools
import sys
import threading
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax import flow
from hyvideo_jax.models import image_condition
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
from hyvideo_jax.parallel.sharding import batch_sharding


# --------------------------------------------------------------------------------------------------- checks
def latent_channels(dit: DiTConfig) -> int:
    """Channels of the latents the loop denoises: the model's input channels, except for "latent_concat", whose
    input also holds the image latent and a mask (in = 2·out + 1)."""
    return dit.out_channels if dit.image_condition_type == "latent_concat" else dit.in_channels


def latent_shape(frames: int, height: int, width: int, dit: DiTConfig, vae) -> tuple[int, int, int, int]:
    """Latents [T, H, W, C] of a video, after checking that the VAE and the patch size can make it."""
    rt, rs = vae.temporal_compression_ratio, vae.spatial_compression_ratio
    if frames < 1 or (frames - 1) % rt:
        below = (frames - 1) // rt * rt + 1
        raise ValueError(f"frames must be {rt}k+1 (1, {rt + 1}, {2 * rt + 1}, ...), got {frames}; the nearest are "
                         f"{below} and {below + rt}")
    t = (frames - 1) // rt + 1
    if t % dit.patch_size_t:
        raise ValueError(f"{frames} frames give {t} latent frames, not divisible by the temporal patch size "
                         f"{dit.patch_size_t}")
    multiple = rs * dit.patch_size
    for name, size in (("height", height), ("width", width)):
        if size < multiple or size % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} (VAE ×{rs}, patch {dit.patch_size}), got "
                             f"{size}; the nearest are {max(size // multiple, 1) * multiple} and "
                             f"{(size // multiple + 1) * multiple}")
    return t, height // rs, width // rs, latent_channels(dit)


def check_sequence_split(dit: DiTConfig, latent: Sequence[int], mesh) -> None:
    """A clear error when the mesh's 'sequence' axis does not divide the image tokens (sequence parallelism)."""
    s = dict(mesh.shape).get("sequence", 1) if mesh is not None else 1
    tokens = flow.image_tokens(latent, dit.patch_size, dit.patch_size_t)
    if tokens % s:
        sizes = [d for d in range(1, max(s, 16) + 1) if tokens % d == 0]
        raise ValueError(f"the video has {tokens} image tokens ({latent[0] // dit.patch_size_t} × "
                         f"{latent[1] // dit.patch_size} × {latent[2] // dit.patch_size}), which do not split over "
                         f"the mesh's sequence axis of size {s}; sequence sizes that divide them: {sizes} (or change "
                         f"height / width / frames)")


def embedded_guidance(scale: float | None, batch: int):
    """The model's guidance input [B] for an embedded scale (None → None): scale × 1000 rounded to bf16."""
    if scale is None:
        return None
    return flow.guidance_input(None, batch, flow.FlowConfig(guidance=float(scale)))


# --------------------------------------------------------------------------------------------------- sampling
def denoise_step(model, params, latents, sigma, sigma_next, cond, negative=None, guidance=None, true_cfg_scale=1.0,
                 image_latent=None):
    """One Euler step from σ to σ_next (fp32 scalars) of latents [B, T, H, W, C] (fp32).

    cond = (text_states [B, L, D], text_mask [B, L], pooled_text [B, Dp]); `negative` the same triple for true
    CFG (run with cond as one batch of 2B), or None; guidance [B] the model input (× 1000, rounded) or None;
    `image_latent` [B, 1, H, W, C] the reference image of an image-to-video model (None for text-to-video).
    """
    b = latents.shape[0]
    kind = model.config.image_condition_type
    latents = nn.with_logical_constraint(latents, ("batch", None, None, None, None))
    inputs = image_condition.model_input(kind, latents, image_latent)
    timesteps = jnp.full((b,), sigma * 1000.0, jnp.float32)
    if negative is None:
        velocity = model.apply({"params": params}, inputs, timesteps, *cond, guidance)
    else:
        pair = lambda a, n: None if a is None else jnp.concatenate([a, n], axis=0)  # noqa: E731
        both = model.apply({"params": params}, pair(inputs, inputs), pair(timesteps, timesteps),
                           *(pair(c, n) for c, n in zip(cond, negative)), pair(guidance, guidance))
        v_cond, v_neg = both[:b].astype(jnp.float32), both[b:].astype(jnp.float32)
        velocity = v_neg + true_cfg_scale * (v_cond - v_neg)
    stepped = latents + (sigma_next - sigma) * velocity.astype(jnp.float32)
    if kind == "token_replace":   # frame 0 stays the image
        stepped = image_condition.token_replace_input(stepped, image_latent)
    return stepped


class _StepReporter:
    """The host side of the per-step progress callback: the jitted loop calls `report(step)`; a `tqdm` bar is shown
    while a `denoise` call runs (on process 0 only)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bar = None

    def report(self, step):
        with self.lock:
            if self.bar is not None:
                self.bar.update(int(step) + 1 - self.bar.n)

    def run(self, steps: int, fn, *args):
        from tqdm import tqdm
        show = jax.process_index() == 0
        with self.lock:
            self.bar = tqdm(total=steps, desc="denoising", unit="step", disable=not show, file=sys.stderr)
        try:
            out = jax.block_until_ready(fn(*args))
            jax.effects_barrier()   # every step's callback has reached the host
        finally:
            with self.lock:
                self.bar.close()
                self.bar = None
        return out


_REPORTER = _StepReporter()


@functools.partial(jax.jit, static_argnames=("model", "progress"))
def _denoise_loop(model, params, latents, sigmas, cond, negative, guidance, image_latent, true_cfg_scale, *,
                  progress: bool):
    def body(i, x):
        x = denoise_step(model, params, x, sigmas[i], sigmas[i + 1], cond, negative, guidance, true_cfg_scale,
                         image_latent)
        if progress:
            jax.debug.callback(_REPORTER.report, i)
        return x
    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, latents)


def _text_triple(name, triple, batch: int, cfg: DiTConfig):
    states, mask, pooled = (np.asarray(a) if not isinstance(a, jax.Array) else a for a in triple)
    if states.ndim != 3 or states.shape[-1] != cfg.text_states_dim:
        raise ValueError(f"{name} text_states must be [B, L, {cfg.text_states_dim}], got {tuple(states.shape)}")
    if mask.shape != states.shape[:2]:
        raise ValueError(f"{name} text_mask must be [B, L]={tuple(states.shape[:2])}, got {tuple(mask.shape)}")
    if pooled.shape != (states.shape[0], cfg.pooled_text_dim):
        raise ValueError(f"{name} pooled_text must be [B, {cfg.pooled_text_dim}], got {tuple(pooled.shape)}")
    if states.shape[0] not in (1, batch):
        raise ValueError(f"{name} text has batch {states.shape[0]}, the latents {batch} (give 1 or {batch})")
    if states.shape[0] == 1 and batch > 1:
        states, mask, pooled = (jnp.repeat(a, batch, axis=0) for a in (states, mask, pooled))
    return jnp.asarray(states), jnp.asarray(mask, jnp.int32), jnp.asarray(pooled)


def _pad_text(triple, length: int):
    """Text triple right-padded with masked tokens to `length` (padding never reaches image or valid tokens)."""
    states, mask, pooled = triple
    pad = length - states.shape[1]
    if pad == 0:
        return triple
    return (jnp.pad(states, ((0, 0), (0, pad), (0, 0))), jnp.pad(mask, ((0, 0), (0, pad))), pooled)


def denoise_inputs(model: HunyuanVideoDiT, latents, text_states, text_mask, pooled_text, *, steps: int,
                   shift: float, guidance: float | None, negative=None, true_cfg_scale: float = 1.0,
                   image_latent=None, mesh=None, rules=LOGICAL_AXIS_RULES):
    """The checked inputs of a denoising loop (`denoise`, `sample_cache.denoise_cached`; arguments as in
    `denoise`): (latents fp32, cond, negative or None, the guidance input or None, the image latent or None) on the
    mesh's batch axes when `mesh` is given, and the σ schedule. Text triples are broadcast to the batch and padded
    to one length; with an image latent the latents are the references' starting point (noise mixed with it)."""
    cfg = model.config
    latents = jnp.asarray(latents, jnp.float32)
    channels = latent_channels(cfg)
    if latents.ndim != 5 or latents.shape[-1] != channels:
        raise ValueError(f"latents must be [B, T, H, W, {channels}] (channel-last), got {latents.shape}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if guidance is not None and not cfg.guidance_embed:
        raise ValueError(f"guidance {guidance} given, but this model has no guidance embedding "
                         f"(model.guidance_embed=False): use guidance=None (on the command line --guidance=0)")
    if guidance is None and cfg.guidance_embed:
        raise ValueError("this model embeds a guidance scale (model.guidance_embed=True): give guidance, "
                         "e.g. 6.0 as the released pipelines do")
    if true_cfg_scale < 1:
        raise ValueError(f"true_cfg_scale must be >= 1 (1: off), got {true_cfg_scale}")
    if true_cfg_scale > 1 and negative is None:
        raise ValueError(f"true_cfg_scale {true_cfg_scale} needs a negative prompt (negative=(text_states, "
                         "text_mask, pooled_text))")
    if negative is not None and true_cfg_scale == 1:
        warnings.warn("a negative prompt was given with true_cfg_scale 1: it is ignored (as diffusers does)")
        negative = None
    b = latents.shape[0]
    check_sequence_split(cfg, latents.shape[1:], mesh)
    if cfg.image_condition_type is None and image_latent is not None:
        raise ValueError("an image latent was given, but this transformer is text-to-video "
                         "(model.image_condition_type None)")
    if cfg.image_condition_type is not None:
        if image_latent is None:
            raise ValueError(f"this transformer is image-to-video ({cfg.image_condition_type}): give the image "
                             "latent (the VAE-encoded reference image) [B, 1, h, w, C]")
        image_latent = jnp.asarray(image_latent, jnp.float32)
        want = (1, *latents.shape[2:])
        if image_latent.ndim != 5 or image_latent.shape[1:] != want or image_latent.shape[0] not in (1, b):
            raise ValueError(f"image latent must be [B, {', '.join(map(str, want))}] (one latent frame of the "
                             f"video's size), got {image_latent.shape}")
        image_latent = jnp.broadcast_to(image_latent, (b, *want))
        latents = image_condition.initial_latents(latents, image_latent)
    cond = _text_triple("prompt", (text_states, text_mask, pooled_text), b, cfg)
    if negative is not None:
        negative = _text_triple("negative", negative, b, cfg)
        length = max(cond[0].shape[1], negative[0].shape[1])
        cond, negative = _pad_text(cond, length), _pad_text(negative, length)
    inputs = (latents, cond, negative, embedded_guidance(guidance, b), image_latent)
    if mesh is not None:   # samples straight onto their devices (the model's 'batch' axes) rather than replicated
        inputs = jax.device_put(inputs, batch_sharding(mesh, rules, b))
    return inputs, jnp.asarray(flow.sigma_schedule(steps, shift))


def denoise(model: HunyuanVideoDiT, params, latents, text_states, text_mask, pooled_text, *, steps: int,
            shift: float, guidance: float | None, negative=None, true_cfg_scale: float = 1.0, image_latent=None,
            progress: bool = True, mesh=None, rules=LOGICAL_AXIS_RULES):
    """The final latents [B, T, H, W, C] (fp32) from initial noise `latents` [B, T, H, W, C].

    text_states [B, L, D], text_mask [B, L] (1 = token), pooled_text [B, Dp]: the prompts' conditioning (batch 1
    is broadcast). `guidance`: the embedded guidance scale (e.g. 6.0; None for a model without guidance
    embedding). `negative`: (text_states, text_mask, pooled_text) of the negative prompt, used when
    `true_cfg_scale` > 1. `image_latent` [B or 1, 1, h, w, C]: the reference image of an image-to-video model
    (`latents` is then the noise; the loop starts from 0.999·noise + 0.001·image latent). `mesh`: run sharded on it
    (params already placed there). One jitted program; `progress` shows a per-step bar.
    """
    inputs, sigmas = denoise_inputs(model, latents, text_states, text_mask, pooled_text, steps=steps, shift=shift,
                                    guidance=guidance, negative=negative, true_cfg_scale=true_cfg_scale,
                                    image_latent=image_latent, mesh=mesh, rules=rules)
    args = (params, inputs[0], sigmas, *inputs[1:], jnp.float32(true_cfg_scale))
    run = functools.partial(_denoise_loop, model, progress=progress)
    if mesh is None:
        return _REPORTER.run(steps, run, *args) if progress else run(*args)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return _REPORTER.run(steps, run, *args) if progress else run(*args)
