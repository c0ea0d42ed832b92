"""Text → video: prompts → frames with the `Sampler`, and the CLI that writes mp4s.

    sampler = Sampler.from_config(config, checkpoint="ckpt/dit", mesh=create_mesh(config.mesh))
    result = sampler.generate(["a red square moves left"], negative_prompt=None)   # result.videos uint8

    python -m hyvideo_jax.sample --workdir=demo_data/run --prompt="a red square ..." \\
        --out=video.mp4 [--steps=30 --guidance=6 --seed=1 ...]
    python -m hyvideo_jax.sample --config=configs/hunyuan_video_i2v.py --torch_weights=... \\
        --image=first_frame.png --prompt="..."          # image-to-video

Image-to-video: with a HunyuanVideo-I2V transformer (`model.image_condition_type` "token_replace" or
"latent_concat"), `generate(prompts, images=[...])` / `--image=first_frame.png` make videos that start from the
image. The image is resized to cover the video's size and centre-cropped (`sample.image_resize` "crop", as the
official code crops to its bucket) or stretched to it ("stretch", as diffusers' pipeline), VAE-encoded as latent
frame 0, and read by the LLaVA text encoder (`hyvideo_jax.image_prompts`) with the prompt.

The denoising loop itself (σ schedule, embedded and true classifier-free guidance, one jitted program, sharding
under a mesh) is `hyvideo_jax.denoise`. The sampler encodes the prompts, draws each video's noise from its own
seed, runs `denoise` (or `sample_cache.denoise_cached` when a cache is set) batch by batch and decodes the latents
with the VAE.

Weights come from a training workdir (EMA parameters when the run kept them), a folder written by
`python -m hyvideo_jax.convert to-flax`, or PyTorch weights (official `.pt`, fp8, diffusers folder).
"""

import dataclasses
import functools
import json
import sys
import time
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from hyvideo_jax import sample_cache
from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.convert.dit_sources import load_dit, with_lora
from hyvideo_jax.denoise import check_sequence_split, denoise, latent_channels, latent_shape
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The `config.sample` section: what to generate and how.

    `guidance` is the embedded guidance scale (0: none, for models without guidance embedding); `true_cfg_scale`
    > 1 runs real classifier-free guidance against `negative_prompt` (doubling the work). Video v of a call uses
    seed `seed + v` (prompt-major order) unless seeds are given, so a video does not depend on its batch.
    `batch_size` bounds the videos per denoising program (0: all of a call at once). `use_ema` picks a training
    run's EMA parameters when it kept them.
    """
    height: int = 720
    width: int = 1280
    frames: int = 129
    steps: int = 50
    shift: float = 7.0
    guidance: float = 6.0
    true_cfg_scale: float = 1.0
    negative_prompt: str = ""
    videos_per_prompt: int = 1
    batch_size: int = 0
    seed: int = 0
    fps: float = 24.0
    use_ema: bool = True
    progress: bool = True
    # Cached sampling (hyvideo_jax.sample_cache): none | first_block | mag, its threshold, MagCache's K, retention
    # and per-step ratios (given, or read from mag_ratios_file, written by --calibrate_mag).
    cache: str = "none"
    cache_threshold: float = 0.1
    mag_max_skip_steps: int = 3
    mag_retention: float = 0.2
    mag_ratios: tuple[float, ...] = ()
    mag_ratios_file: str = ""
    # Image-to-video: how the reference image meets the video's size (crop: cover and centre-crop, as the official
    # code; stretch: resize to it, as diffusers), and the kept-image-token step of the negative prompt (0: the
    # prompt's; diffusers' pipeline encodes it with 2 whatever the model).
    image_resize: str = "crop"
    negative_image_interleave: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        def fail(field, msg):
            raise ValueError(f"sample.{field}: {msg}")
        for f in ("height", "width", "frames", "steps", "videos_per_prompt"):
            if int(getattr(self, f)) < 1:
                fail(f, f"must be >= 1, got {getattr(self, f)}")
        for f in ("shift", "fps"):
            if not getattr(self, f) > 0:
                fail(f, f"must be positive, got {getattr(self, f)}")
        if self.guidance < 0:
            fail("guidance", f"must be >= 0 (0: no embedded guidance), got {self.guidance}")
        if self.true_cfg_scale < 1:
            fail("true_cfg_scale", f"must be >= 1 (1: no true CFG), got {self.true_cfg_scale}")
        if self.batch_size < 0:
            fail("batch_size", f"must be >= 0 (0: all videos of a call in one batch), got {self.batch_size}")
        if self.image_resize not in IMAGE_RESIZE:
            fail("image_resize", f"must be one of {IMAGE_RESIZE}, got {self.image_resize!r}")
        if not 0 <= self.negative_image_interleave <= 5:
            fail("negative_image_interleave",
                 f"must be in 0..5 (0: the prompt's), got {self.negative_image_interleave}")
        from hyvideo_jax.sample_cache import from_sample_config
        from_sample_config(self)

    @classmethod
    def from_config(cls, config: "SampleConfig | Mapping[str, Any]") -> "SampleConfig":
        return from_fields(cls, config, "sample")


IMAGE_RESIZE = ("crop", "stretch")


# --------------------------------------------------------------------------------------------------- reference image
def load_image(path: str):
    """An RGB PIL image from a file (a local or gs:// path)."""
    import io

    import PIL.Image
    from etils import epath
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    return PIL.Image.open(io.BytesIO(p.read_bytes())).convert("RGB")


def reference_frame(image, height: int, width: int, resize: str = "crop") -> np.ndarray:
    """A PIL image or uint8 [H, W, 3] array → float32 [height, width, 3] in [-1, 1] for the VAE.

    "stretch" resizes to the video's size (LANCZOS, diffusers' `VideoProcessor.preprocess`); "crop" scales the
    image to cover it, keeping its aspect ratio, and centre-crops (the official code's resize + centre crop)."""
    import PIL.Image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"images must be PIL images or uint8 [H, W, 3] arrays, got {type(image).__name__}")
    image = image.convert("RGB")
    if resize == "stretch":
        image = image.resize((width, height), resample=PIL.Image.LANCZOS)
    elif resize == "crop":
        scale = max(width / image.width, height / image.height)
        w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
        image = image.resize((w, h), resample=PIL.Image.LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        image = image.crop((left, top, left + width, top + height))
    else:
        raise ValueError(f"resize must be one of {IMAGE_RESIZE}, got {resize!r}")
    return np.asarray(image, np.float32) / 255.0 * 2.0 - 1.0


# --------------------------------------------------------------------------------------------------- prompts → video
class SampleResult(NamedTuple):
    """Videos in prompt-major order (prompt i's videos, then prompt i + 1's) with the prompt and seed of each."""
    videos: np.ndarray    # uint8 [N, F, H, W, 3]
    latents: np.ndarray   # float32 [N, T, h, w, C], the denoised (scaled) latents
    prompts: list[str]
    seeds: list[int]
    seconds: dict[str, float]
    computed: np.ndarray | None = None   # cached sampling: bool [batches, branches, steps], steps computed
    mag_ratios: np.ndarray | None = None  # calibrate_mag: fp32 [branches, steps] of the first batch


def video_frames(decoded):
    """uint8 frames from decoded video in [-1, 1] (as diffusers' video processor: (x / 2 + 0.5) clipped, × 255,
    rounded)."""
    return jnp.round(jnp.clip(decoded.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


class Sampler:
    """The DiT, the VAE and the text encoders of a config, on one mesh; `generate(prompts)` makes videos.

    Built by `from_config` from any weight source (`load_dit`); the VAE is `vae_weights` or, as `data.prepare`
    uses it, `data.prepare.vae_checkpoint` (random weights from `data.prepare.vae_seed` when empty).
    """

    def __init__(self, config: SampleConfig, dit_config: DiTConfig, dit_params, vae_config, vae_params, text, mesh,
                 rules=LOGICAL_AXIS_RULES, description: str = ""):
        from hyvideo_jax.models.vae import HunyuanVideoVAE
        from hyvideo_jax.models.vae_tiling import decode_latents, encode_video
        from hyvideo_jax.parallel.sharding import replicated

        self.config, self.dit_config, self.vae_config = config, dit_config, vae_config
        self.model = HunyuanVideoDiT(dit_config)
        self.params, self.text, self.mesh, self.rules = dit_params, text, mesh, rules
        self.description = description
        self.vae_params = jax.device_put(vae_params, replicated(mesh))
        vae = HunyuanVideoVAE(vae_config)
        self._decode = jax.jit(lambda p, z: video_frames(decode_latents(vae, p, z)))
        self._encode = jax.jit(lambda p, v: encode_video(vae, p, v))

    @classmethod
    def from_config(cls, config, *, workdir=None, step: int | None = None, checkpoint=None, torch_weights=None,
                    vae_weights: str | None = None, lora_file: str | None = None, mesh=None, text=None,
                    dit=None, rules=LOGICAL_AXIS_RULES) -> "Sampler":
        """Everything `generate` needs, from a full config (model, text, vae, data.prepare, mesh, sample);
        `lora_file` merges a LoRA into the transformer. `dit` (DiTConfig, params, description) gives the
        transformer instead of a weight source (params may be None and set later as `sampler.params`)."""
        from hyvideo_jax.convert.vae import load_vae
        from hyvideo_jax.data.config import PrepareConfig
        from hyvideo_jax.parallel.mesh import create_mesh
        from hyvideo_jax.text import TextEncoders

        sample_config = SampleConfig.from_config(config.get("sample") or {})
        mesh = create_mesh(config.mesh) if mesh is None else mesh
        if dit is None:
            dit = load_dit(config, workdir=workdir, step=step, checkpoint=checkpoint, torch_weights=torch_weights,
                           use_ema=sample_config.use_ema, mesh=mesh, rules=rules)
        dit_config, params, description = dit
        if lora_file:
            params = with_lora(params, dit_config, lora_file, mesh)
            description += f", LoRA {lora_file} merged"
        prepare = PrepareConfig.from_config(config.data.prepare)
        vae_config, vae_params = load_vae(vae_weights or prepare.vae_checkpoint, config.vae.model, prepare.vae_seed)
        if vae_config.latent_channels != latent_channels(dit_config):
            raise ValueError(f"the VAE has {vae_config.latent_channels} latent channels, the transformer denoises "
                             f"{latent_channels(dit_config)}")
        if text is None and dit_config.image_condition_type is not None:
            from hyvideo_jax.image_prompts import ImagePromptEncoders
            text = ImagePromptEncoders.from_config(config.text, mesh=mesh,
                                                   image_condition_type=dit_config.image_condition_type)
        text = TextEncoders.from_config(config.text, mesh=mesh) if text is None else text
        return cls(sample_config, dit_config, params, vae_config, vae_params, text, mesh, rules, description)

    def noise(self, seeds: Sequence[int], latent: Sequence[int]) -> jax.Array:
        """Initial latents [N, *latent] (fp32): video n from PRNGKey(seeds[n]) alone."""
        return jnp.stack([jax.random.normal(jax.random.PRNGKey(int(s)), tuple(latent), jnp.float32) for s in seeds])

    def image_latents(self, images, height: int, width: int, resize: str = "crop") -> np.ndarray:
        """Scaled latents [N, 1, h, w, C] of reference images (the VAE's posterior mode, as the references)."""
        frames = [reference_frame(im, height, width, resize) for im in images]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return np.concatenate([np.asarray(self._encode(self.vae_params, f[None, None])) for f in frames])

    def decode(self, latents) -> np.ndarray:
        """uint8 frames [N, F, H, W, 3] from scaled latents [N, T, h, w, C], tiled as the VAE config says."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return np.concatenate([np.asarray(self._decode(self.vae_params, latents[i:i + 1]))
                                   for i in range(latents.shape[0])])

    def generate(self, prompts: str | Sequence[str], *, images=None, negative_prompt: str | None = None,
                 seeds: Sequence[int] | None = None, calibrate_mag: bool = False, **overrides) -> SampleResult:
        """Videos for `prompts` (`config.videos_per_prompt` each); `overrides` replace `SampleConfig` fields for
        this call (e.g. steps=30). `negative_prompt` (default `config.negative_prompt`) is used when
        `true_cfg_scale` > 1. `seeds`: one per video (default `config.seed` + n). `images`: the first frames of an
        image-to-video model (PIL images or uint8 arrays, one per prompt or one for all)."""
        sc = dataclasses.replace(self.config, **overrides) if overrides else self.config
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        kind = self.dit_config.image_condition_type
        if kind is None and images is not None:
            raise ValueError("images were given, but this transformer is text-to-video (model.image_condition_type "
                             "None); use an image-to-video checkpoint")
        if kind is not None:
            if images is None:
                raise ValueError(f"this transformer is image-to-video ({kind}): give images (--image)")
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            images = images * len(prompts) if len(images) == 1 else images
            if len(images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts need one image each (or one for all), got {len(images)}")
        latent = latent_shape(sc.frames, sc.height, sc.width, self.dit_config, self.vae_config)
        check_sequence_split(self.dit_config, latent, self.mesh)
        if sc.guidance and not self.dit_config.guidance_embed:
            raise ValueError(f"guidance {sc.guidance} given, but this model has no guidance embedding: set "
                             f"--guidance=0 (sample.guidance)")
        n = len(prompts) * sc.videos_per_prompt
        seeds = [sc.seed + i for i in range(n)] if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} videos ({len(prompts)} prompts × {sc.videos_per_prompt})")
        seconds = {}
        start = time.perf_counter()
        mode = "video" if sc.frames > 1 else "image"
        per_video = functools.partial(np.repeat, repeats=sc.videos_per_prompt, axis=0)
        if kind is None:
            encoded = self.text.encode_prompts(prompts, mode=mode)
        else:
            encoded = self.text.encode_prompts(prompts, images)
            image_latents = per_video(self.image_latents(images, sc.height, sc.width, sc.image_resize))
        states, mask, pooled = (per_video(np.asarray(a)) for a in encoded)
        negative = None
        if sc.true_cfg_scale > 1:
            text = sc.negative_prompt if negative_prompt is None else negative_prompt
            if kind is None:
                negative = self.text.encode_prompts([text], mode=mode)
            else:   # the references' negative: a black image
                negative = self.text.encode_negative([text], sc.height, sc.width,
                                                     interleave=sc.negative_image_interleave or None)
            negative = tuple(np.asarray(a) for a in negative)
        elif negative_prompt:
            warnings.warn("negative_prompt is ignored with true_cfg_scale 1 (set true_cfg_scale > 1 to use it)")
        seconds["text"] = time.perf_counter() - start
        guidance = sc.guidance if self.dit_config.guidance_embed else None
        batch = sc.batch_size or n
        cache = sample_cache.from_sample_config(sc)
        if kind is not None and (cache.active or calibrate_mag):
            raise ValueError(f"cached sampling is for text-to-video transformers; this one is image-to-video "
                             f"({kind}): sample with --cache=none")
        if calibrate_mag:
            cache = dataclasses.replace(cache, kind="mag")
        elif cache.kind == "mag" and not cache.mag_ratios and sc.mag_ratios_file:
            cache = dataclasses.replace(cache, mag_ratios=sample_cache.read_mag_ratios(
                sc.mag_ratios_file, height=sc.height, width=sc.width, frames=sc.frames, steps=sc.steps))
        latents, computed, ratios, start = [], [], None, time.perf_counter()
        for first in range(0, n, batch):
            rows = list(range(first, min(first + batch, n)))
            rows += [rows[-1]] * (batch - len(rows))   # the last batch padded: one program for every batch
            noise = self.noise([seeds[r] for r in rows], latent)
            if cache.active:
                cached = sample_cache.denoise_cached(
                    self.model, self.params, noise, states[rows], mask[rows], pooled[rows], steps=sc.steps,
                    shift=sc.shift, guidance=guidance, cache=cache, negative=negative,
                    true_cfg_scale=sc.true_cfg_scale, mesh=self.mesh, rules=self.rules, calibrate=calibrate_mag)
                out, ratios = cached.latents, cached.ratios if ratios is None else ratios
                computed.append(cached.computed)
            else:
                out = denoise(self.model, self.params, noise, states[rows], mask[rows], pooled[rows],
                              steps=sc.steps, shift=sc.shift, guidance=guidance, negative=negative,
                              true_cfg_scale=sc.true_cfg_scale, progress=sc.progress, mesh=self.mesh,
                              rules=self.rules, image_latent=None if kind is None else image_latents[rows])
            # Gathered: with several processes, the batch's rows sit on other hosts' devices too.
            latents.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:min(batch, n - first)])
        latents = np.concatenate(latents)
        seconds["denoise"] = time.perf_counter() - start
        start = time.perf_counter()
        videos = self.decode(latents)
        if kind == "latent_concat":   # its latent frame 0 holds the image: the references drop its frames
            videos = videos[:, self.vae_config.temporal_compression_ratio:]
        seconds["decode"] = time.perf_counter() - start
        return SampleResult(videos, latents, [p for p in prompts for _ in range(sc.videos_per_prompt)], seeds,
                            seconds, np.stack(computed) if computed else None, ratios if calibrate_mag else None)


# --------------------------------------------------------------------------------------------------- CLI
SAMPLE_FLAGS = ("height", "width", "frames", "steps", "shift", "guidance", "true_cfg_scale", "seed", "fps",
                "negative_prompt", "videos_per_prompt", "batch_size", "cache", "cache_threshold", "mag_max_skip_steps",
                "mag_retention", "mag_ratios_file", "image_resize")


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts_file (which may be a gs:// path)."""
    out = [p for p in prompts or []]
    if prompts_file:
        from etils import epath
        out += [line.strip() for line in epath.Path(prompts_file).read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompt: give --prompt (repeatable) or --prompts_file")
    return out


def output_paths(out: str, n: int) -> list[str]:
    """`out` for one video; `stem_000.mp4`, `stem_001.mp4`, ... beside it for several."""
    if not out.endswith(".mp4"):
        raise ValueError(f"--out must name an .mp4 file, got {out!r}")
    return [out] if n == 1 else [f"{out[:-4]}_{i:03d}.mp4" for i in range(n)]


def write_outputs(result: SampleResult, out: str, fps: float, save_latents: bool) -> list[str]:
    """mp4s (and latents as .npy) for every video of `result`; with several videos, also `stem.jsonl` listing each
    file with its prompt and seed. Returns the mp4 paths."""
    import io

    from etils import epath

    from hyvideo_jax.data.synthetic import write_mp4
    paths = output_paths(out, len(result.videos))
    epath.Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    index = []
    for path, video, latents, prompt, seed in zip(paths, result.videos, result.latents, result.prompts,
                                                  result.seeds):
        write_mp4(path, video, fps)
        if save_latents:
            buffer = io.BytesIO()
            np.save(buffer, latents)
            epath.Path(path[:-4] + ".npy").write_bytes(buffer.getvalue())
        index.append({"file": epath.Path(path).name, "prompt": prompt, "seed": seed})
    if len(paths) > 1:
        epath.Path(out[:-4] + ".jsonl").write_text("".join(json.dumps(row) + "\n" for row in index))
    return paths


def run(config, *, prompts: Sequence[str] = (), prompts_file: str | None = None, out: str = "video.mp4",
        workdir=None, step: int | None = None, checkpoint=None, torch_weights=None, vae_weights=None,
        lora_file: str | None = None, save_latents: bool = False, mesh=None, calibrate_mag: str | None = None,
        images: Sequence[str] = ()) -> tuple[list[str], SampleResult, "Sampler"]:
    """What the CLI does: check the request (sizes, prompts, images, output, mesh) before loading anything, load,
    generate, write. `images`: image files (one for all prompts or one per prompt) for an image-to-video model.
    Returns (mp4 paths, result, sampler); bad input raises ValueError / FileNotFoundError with a sentence."""
    from hyvideo_jax.models.vae import VAEConfig
    from hyvideo_jax.parallel.mesh import create_mesh

    sc = SampleConfig.from_config(config.get("sample") or {})
    prompts = read_prompts(prompts, prompts_file)
    output_paths(out, len(prompts) * sc.videos_per_prompt)
    pictures = [load_image(path) for path in images or ()]
    if len(pictures) not in (0, 1, len(prompts)):
        raise ValueError(f"{len(pictures)} --image files for {len(prompts)} prompts: give one for all prompts or one "
                         f"per prompt")
    given = [name for name, v in (("--workdir", workdir), ("--checkpoint", checkpoint),
                                  ("--torch_weights", torch_weights)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --workdir, --checkpoint, --torch_weights; got {given or 'none'}")
    dit = DiTConfig.from_config(config.model)
    mesh = create_mesh(config.mesh) if mesh is None else mesh
    if workdir:   # the config is the architecture: check the request against it before loading anything
        if dit.image_condition_type is not None and not pictures:
            raise ValueError(f"this transformer is image-to-video ({dit.image_condition_type}): give --image")
        if dit.image_condition_type is None and pictures:
            raise ValueError("--image given, but this transformer is text-to-video (model.image_condition_type "
                             "None)")
        latent = latent_shape(sc.frames, sc.height, sc.width, dit, VAEConfig.from_config(config.vae.model))
        check_sequence_split(dit, latent, mesh)
        if sc.guidance and not dit.guidance_embed:
            raise ValueError(f"guidance {sc.guidance} given, but this model has no guidance embedding "
                             f"(model.guidance_embed=False): set --guidance=0 (sample.guidance)")
    sampler = Sampler.from_config(config, workdir=workdir, step=step, checkpoint=checkpoint,
                                  torch_weights=torch_weights, vae_weights=vae_weights, lora_file=lora_file,
                                  mesh=mesh)
    print(f"weights: {sampler.description}", file=sys.stderr)
    result = sampler.generate(prompts, images=pictures or None, calibrate_mag=bool(calibrate_mag))
    if calibrate_mag:   # the JSON the sampler reads with sample.mag_ratios_file (one per checkpoint)
        sample_cache.write_mag_ratios(calibrate_mag, sample_cache.CachedResult(None, None, result.mag_ratios, 0.0),
                                      height=sc.height, width=sc.width, frames=sc.frames, steps=sc.steps,
                                      model=sampler.description)
        print(f"MagCache ratios for {sc.height}x{sc.width}x{sc.frames}, {sc.steps} steps written to {calibrate_mag}",
              file=sys.stderr)
    return write_outputs(result, out, sc.fps, save_latents), result, sampler


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    config = f.config
    try:
        if config is None:   # a training workdir's own config, as its run started
            if not f.workdir:
                raise ValueError("give --config (e.g. configs/hunyuan_video_13b.py), or --workdir of a training run, "
                                 "whose config.json is used")
            from hyvideo_jax.convert.flax_io import run_config
            config = run_config(f.workdir)
        with config.unlocked():
            if "sample" not in config:   # a config written before the section existed: the defaults
                import ml_collections
                config.sample = ml_collections.ConfigDict(dataclasses.asdict(SampleConfig()))
            for name in SAMPLE_FLAGS:
                if getattr(f, name) is not None:
                    config.sample[name] = getattr(f, name)
            if f.raw_params:
                config.sample.use_ema = False
        paths, result, sampler = run(config, prompts=f.prompt, prompts_file=f.prompts_file, out=f.out,
                                     workdir=f.workdir, step=f.step, checkpoint=f.checkpoint,
                                     torch_weights=f.torch_weights, vae_weights=f.vae_weights, lora_file=f.lora,
                                     save_latents=f.save_latents, calibrate_mag=f.calibrate_mag, images=f.image)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sc, times = sampler.config, result.seconds
    print(f"{len(paths)} video(s) of {sc.frames} frames at {sc.height}x{sc.width}, {sc.fps:g} fps, {sc.steps} steps: "
          f"text {times['text']:.1f} s, denoise {times['denoise']:.1f} s, decode {times['decode']:.1f} s",
          file=sys.stderr)
    if result.computed is not None:
        done = result.computed.sum(axis=(0, 2)) / result.computed.shape[0]
        print(f"cache {sc.cache}: steps computed per batch " + ", ".join(
            f"{name} {c:g}/{sc.steps}" for name, c in zip(("prompt", "negative prompt"), done)), file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Configuration (configs/*.py): model, text, vae, mesh, sample "
                                    "(default with --workdir: the run's config.json).", lock_config=True)
    flags.DEFINE_string("workdir", None, "A training workdir: its latest (or --step) checkpoint, EMA if kept.")
    flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: the latest).")
    flags.DEFINE_bool("raw_params", False, "With --workdir: the raw parameters even when the run kept an EMA.")
    flags.DEFINE_string("checkpoint", None, "A folder written by `python -m hyvideo_jax.convert to-flax`.")
    flags.DEFINE_string("torch_weights", None, "PyTorch transformer weights: official .pt (fp8 too) or diffusers.")
    flags.DEFINE_string("vae_weights", None, "VAE weights (converted folder or PyTorch); default: "
                        "data.prepare.vae_checkpoint, else random weights from data.prepare.vae_seed.")
    flags.DEFINE_string("lora", None, "A LoRA file to merge (diffusers/PEFT, original names, or kohya/musubi).")
    flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
    flags.DEFINE_multi_string("image", [], "Image-to-video: the first frame (an image file; one for all prompts, or "
                              "repeat the flag once per prompt).")
    flags.DEFINE_enum("image_resize", None, list(IMAGE_RESIZE), "How the image meets the video size: crop (cover and "
                      "centre-crop) or stretch (sample.image_resize).")
    flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
    flags.DEFINE_string("out", "video.mp4", "Output .mp4 (several videos: stem_000.mp4, ... and stem.jsonl).")
    flags.DEFINE_bool("save_latents", False, "Also write each video's denoised latents as .npy beside it.")
    flags.DEFINE_integer("height", None, "Video height in pixels (sample.height).")
    flags.DEFINE_integer("width", None, "Video width in pixels (sample.width).")
    flags.DEFINE_integer("frames", None, "Frames, 4k+1 (sample.frames).")
    flags.DEFINE_integer("steps", None, "Denoising steps (sample.steps).")
    flags.DEFINE_float("shift", None, "σ-schedule shift (sample.shift; 7 for 50 steps, 17 below 20).")
    flags.DEFINE_float("guidance", None, "Embedded guidance scale (sample.guidance; 0 for models without it).")
    flags.DEFINE_float("true_cfg_scale", None, "True CFG scale against --negative_prompt (sample.true_cfg_scale).")
    flags.DEFINE_string("negative_prompt", None, "Negative prompt for true CFG (sample.negative_prompt).")
    flags.DEFINE_integer("videos_per_prompt", None, "Videos per prompt (sample.videos_per_prompt).")
    flags.DEFINE_integer("batch_size", None, "Videos per denoising program (sample.batch_size; 0: all).")
    flags.DEFINE_integer("seed", None, "Seed of the first video; video n uses seed + n (sample.seed).")
    flags.DEFINE_float("fps", None, "Frames per second of the mp4 (sample.fps).")
    flags.DEFINE_enum("cache", None, ["none", "first_block", "mag"], "Cached sampling (sample.cache).")
    flags.DEFINE_float("cache_threshold", None, "first_block: relative change; mag: accumulated error.")
    flags.DEFINE_integer("mag_max_skip_steps", None, "MagCache: most consecutive skipped steps K.")
    flags.DEFINE_float("mag_retention", None, "MagCache: share of first steps always computed.")
    flags.DEFINE_string("mag_ratios_file", None, "MagCache ratios JSON written by --calibrate_mag.")
    flags.DEFINE_string("calibrate_mag", None, "Run uncached once and write MagCache ratios for this model, size "
                        "and step count to this JSON (e.g. beside the checkpoint: ckpt/dit/mag_ratios.json).")


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
