"""Cached sampling: first-block cache and MagCache decided inside the one jitted sampling loop.

    result = denoise_cached(model, params, noise, text_states, text_mask, pooled, steps=20, shift=7.0,
                            guidance=6.0, cache=CacheConfig(kind="first_block", threshold=0.2))
    result.latents, result.computed   # computed: bool [branches, steps], branch 0 = prompt, 1 = negative prompt

Both caches make, step by step and branch by branch, the decisions diffusers' hooks make (`FirstBlockCache`,
`MagCache`, diffusers 0.42.1) on `HunyuanVideoPipeline`; head = double block 0, tail = the last single block.

- first_block: the head block always runs; r = head output − head input (video tokens). The other blocks run only
  when there is no reference yet or mean|r − r_ref| / mean|r_ref| > threshold (over the whole batch, in the model
  dtype); r_ref is updated on computed steps only. A computed step stores tail output − head output (video); a
  cached step uses head output + that residual. (The hook also stores the text stream's residual, which nothing
  after the tail reads.)
- mag: the first int(retention·N + 0.5) steps compute; then acc_ratio *= ratio[i], acc_steps += 1,
  acc_err += |1 − acc_ratio| (fp32), and the step is skipped, head block included, when a residual exists,
  acc_err ≤ threshold and acc_steps ≤ K; otherwise it computes and the accumulators reset. Skipped: video tokens =
  head input + residual (tail output − head input of the last computed step). The norms for calibration are taken
  on every computed step: ratio_i = mean over tokens of ‖res_i‖ / (‖res_{i−1}‖ + 1e-8), ratio_0 = 1.

Granularity: with true CFG the two branches (prompt, negative prompt) keep separate cache states and decide
separately, as the hooks do under the pipeline's "cond" / "uncond" contexts; they run as two model calls of B
samples each (uncached sampling runs them as one batch of 2B). One decision per call covers all B samples. The
skipped work sits in the untaken branch of a `lax.cond`: thresholds and ratios are arguments of the compiled
program, so one program serves every skip pattern.
"""

import dataclasses
import functools
import json
import time
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.denoise import denoise_inputs
from hyvideo_jax.models.dit import HunyuanVideoDiT, run_layers
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES

KINDS = ("none", "first_block", "mag")
RATIOS_FILE = "mag_ratios.json"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Which cache and its numbers (the `sample.cache*` / `sample.mag_*` fields).

    `threshold`: first_block's relative residual change, or MagCache's accumulated error. `mag_ratios`: one per step
    (nearest-interpolated to the step count when the length differs, as diffusers does), given or read from a
    calibration file (`mag_ratios_file`, see `calibrate_mag_ratios`).
    """
    kind: str = "none"
    threshold: float = 0.1
    mag_max_skip_steps: int = 3
    mag_retention: float = 0.2
    mag_ratios: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "mag_ratios", tuple(float(r) for r in self.mag_ratios))
        self.validate()

    def validate(self):
        if self.kind not in KINDS:
            raise ValueError(f"sample.cache: must be one of {KINDS}, got {self.kind!r}")
        if self.threshold < 0:
            raise ValueError(f"sample.cache_threshold: must be >= 0, got {self.threshold}")
        if self.mag_max_skip_steps < 0:
            raise ValueError(f"sample.mag_max_skip_steps: must be >= 0, got {self.mag_max_skip_steps}")
        if not 0 <= self.mag_retention <= 1:
            raise ValueError(f"sample.mag_retention: must be in [0, 1], got {self.mag_retention}")

    @property
    def active(self) -> bool:
        return self.kind != "none"


def nearest_interp(ratios: Sequence[float], steps: int) -> np.ndarray:
    """`ratios` resampled to `steps` entries by nearest index (diffusers' `nearest_interp`), float32."""
    src = np.asarray(ratios, np.float32)
    if len(src) == steps:
        return src
    if steps == 1:
        return src[-1:]
    scale = np.float32((len(src) - 1) / (steps - 1))
    return src[np.round(np.arange(steps, dtype=np.float32) * scale).astype(np.int64)]


def threshold_below(threshold: float) -> np.float32:
    """The largest float32 ≤ threshold: for a float32 x, x > threshold (compared in float64, as the first-block hook
    does after `.item()`) exactly when x > threshold_below(threshold)."""
    t = np.float32(threshold)
    return t if float(t) <= threshold else np.nextafter(t, np.float32(-np.inf))


# --------------------------------------------------------------------------------------------------- one model call
def _check_depths(cfg):
    if cfg.depth_double < 1 or cfg.depth_single < 1:
        raise ValueError(f"cached sampling needs a double block (the head) and a single block (the tail); the model "
                         f"has depth_double={cfg.depth_double}, depth_single={cfg.depth_single}")


def init_state(kind: str, img_shape, dtype):
    """A branch's cache state before its first step (the residuals are [B, N, D] video tokens)."""
    zeros = jnp.zeros(img_shape, dtype)
    if kind == "first_block":
        return dict(ref=zeros, res=zeros, has_ref=jnp.bool_(False))
    return dict(res=zeros, has_res=jnp.bool_(False), ratio=jnp.float32(1), steps=jnp.int32(0),
                err=jnp.float32(0))


def _first_block(cfg, params, threshold, state):
    """The `blocks` of one first-block-cached call: (img, (computed, new state))."""
    def blocks(img, txt, vec, cos, sin, segments):
        run = functools.partial(run_layers, cfg, params, vec=vec, cos=cos, sin=sin, text_segments=segments)
        head_img, head_txt = run("double_blocks", 0, 1, img, txt)
        r = head_img - img
        diff = jnp.mean(jnp.abs(r - state["ref"])) / jnp.mean(jnp.abs(state["ref"]))
        compute = jnp.logical_not(state["has_ref"]) | (diff > threshold)

        def rest(_):
            out = run("single_blocks", 0, cfg.depth_single,
                      *run("double_blocks", 1, cfg.depth_double, head_img, head_txt))[0]
            return out, out - head_img

        def cached(_):
            return head_img + state["res"], state["res"]
        out, res = jax.lax.cond(compute, rest, cached, None)
        new = dict(ref=jnp.where(compute, r, state["ref"]), res=res, has_ref=state["has_ref"] | compute)
        return out, (compute, new, jnp.float32(1))
    return blocks


def _mag(cfg, params, threshold, max_skip, retained, ratio, state):
    """The `blocks` of one MagCache call at a step with magnitude ratio `ratio`: (img, (computed, state, norm
    ratio for calibration))."""
    def blocks(img, txt, vec, cos, sin, segments):
        acc_ratio = state["ratio"] * ratio
        acc_steps = state["steps"] + 1
        acc_err = state["err"] + jnp.abs(1.0 - acc_ratio)
        skip = (~retained & state["has_res"] & (acc_err <= threshold) & (acc_steps <= max_skip))
        keep = lambda new, old: jnp.where(retained, old, new)  # noqa: E731
        acc = dict(ratio=keep(jnp.where(skip, acc_ratio, 1.0), state["ratio"]),
                   steps=keep(jnp.where(skip, acc_steps, 0), state["steps"]),
                   err=keep(jnp.where(skip, acc_err, 0.0), state["err"]))

        def compute(_):
            run = functools.partial(run_layers, cfg, params, vec=vec, cos=cos, sin=sin, text_segments=segments)
            out = run("single_blocks", 0, cfg.depth_single, *run("double_blocks", 0, cfg.depth_double, img, txt))[0]
            res = out - img
            norm = lambda x: jnp.linalg.norm(x.astype(jnp.float32), axis=-1)  # noqa: E731
            calib = jnp.where(state["has_res"], jnp.mean(norm(res) / (norm(state["res"]) + 1e-8)), 1.0)
            return out, res, calib.astype(jnp.float32)

        def skipped(_):
            return img + state["res"], state["res"], jnp.float32(1)
        out, res, calib = jax.lax.cond(skip, skipped, compute, None)
        new = dict(res=res, has_res=state["has_res"] | ~skip, **acc)
        return out, (~skip, new, calib)
    return blocks


# --------------------------------------------------------------------------------------------------- the loop
@functools.partial(jax.jit, static_argnames=("model", "kind"))
def _cached_loop(model, params, latents, sigmas, branches, guidance, true_cfg_scale, threshold, max_skip,
                 retention_steps, ratios, *, kind: str):
    """`branches`: a tuple of 1 or 2 text triples (prompt, negative prompt). Returns (latents, computed [branches,
    steps] bool, calibration ratios [branches, steps] fp32)."""
    cfg = model.config
    n = sigmas.shape[0] - 1
    b = latents.shape[0]
    tokens = latents.shape[1] // cfg.patch_size_t * (latents.shape[2] // cfg.patch_size) * (
        latents.shape[3] // cfg.patch_size)
    dtype = jnp.dtype(cfg.dtype)
    states = tuple(init_state(kind, (b, tokens, cfg.hidden_size), dtype) for _ in branches)
    log = jnp.zeros((len(branches), n), bool), jnp.ones((len(branches), n), jnp.float32)

    def body(i, carry):
        x, states, (computed, calib) = carry
        x = nn.with_logical_constraint(x, ("batch", None, None, None, None))
        t = jnp.full((b,), sigmas[i] * 1000.0, jnp.float32)
        velocities, new_states = [], []
        for k, (cond, state) in enumerate(zip(branches, states)):
            if kind == "first_block":
                blocks = _first_block(cfg, params, threshold, state)
            else:
                blocks = _mag(cfg, params, threshold, max_skip, i < retention_steps, ratios[i], state)
            v, (did, state, ratio) = model.apply({"params": params}, x, t, *cond, guidance, blocks=blocks)
            velocities.append(v.astype(jnp.float32))
            new_states.append(state)
            computed, calib = computed.at[k, i].set(did), calib.at[k, i].set(ratio)
        v = velocities[0] if len(velocities) == 1 else (
            velocities[1] + true_cfg_scale * (velocities[0] - velocities[1]))
        return x + (sigmas[i + 1] - sigmas[i]) * v, tuple(new_states), (computed, calib)
    x, _, (computed, calib) = jax.lax.fori_loop(0, n, body, (latents, states, log))
    return x, computed, calib


class CachedResult(NamedTuple):
    latents: jax.Array       # [B, T, H, W, C] fp32
    computed: np.ndarray     # bool [branches, steps]: branch 0 the prompt, 1 the negative prompt (true CFG)
    ratios: np.ndarray       # fp32 [branches, steps]: MagCache's calibration ratios (ones for first_block)
    seconds: float           # wall time of the denoising program (compile included on a first call)

    def summary(self) -> str:
        names = ("prompt", "negative")
        return ", ".join(f"{names[k]} {int(c.sum())}/{c.size} steps computed" for k, c in enumerate(self.computed))


def denoise_cached(model: HunyuanVideoDiT, params, latents, text_states, text_mask, pooled_text, *, steps: int,
                   shift: float, guidance: float | None, cache: CacheConfig, negative=None,
                   true_cfg_scale: float = 1.0, mesh=None, rules=None, calibrate: bool = False) -> CachedResult:
    """`denoise.denoise` with a cache (`cache.kind` first_block or mag); arguments as there. `calibrate` (mag only):
    compute every step and return the magnitude ratios (diffusers' `MagCacheConfig(calibrate=True)`)."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    if not cache.active:
        raise ValueError("denoise_cached needs a cache kind (first_block or mag); use denoise.denoise without one")
    if model.config.image_condition_type is not None:   # diffusers' I2V pipeline runs no cache hooks either
        raise ValueError(f"cached sampling is for text-to-video transformers; this one is image-to-video "
                         f"({model.config.image_condition_type}): sample with cache 'none'")
    _check_depths(model.config)
    ratios = np.ones(steps, np.float32)
    if cache.kind == "mag":
        if calibrate:
            threshold = np.float32(-np.inf)   # nothing is ever skipped
        elif not cache.mag_ratios:
            raise ValueError("MagCache needs magnitude ratios (sample.mag_ratios or a calibration file): run "
                             "`python -m hyvideo_jax.sample --calibrate_mag ...` once for this model and step count")
        else:
            ratios, threshold = nearest_interp(cache.mag_ratios, steps), np.float32(cache.threshold)
    elif calibrate:
        raise ValueError("calibrate is for MagCache (cache kind mag)")
    else:
        threshold = threshold_below(cache.threshold)
    (latents, cond, negative, guidance, _), sigmas = denoise_inputs(
        model, latents, text_states, text_mask, pooled_text, steps=steps, shift=shift, guidance=guidance,
        negative=negative, true_cfg_scale=true_cfg_scale, mesh=mesh, rules=rules)
    branches = (cond,) if negative is None else (cond, negative)
    retention = int(cache.mag_retention * steps + 0.5)
    args = (params, latents, sigmas, branches, guidance, jnp.float32(true_cfg_scale), jnp.float32(threshold),
            jnp.int32(cache.mag_max_skip_steps), jnp.int32(retention), jnp.asarray(ratios))
    start = time.perf_counter()
    if mesh is None:
        out = jax.block_until_ready(_cached_loop(model, *args, kind=cache.kind))
    else:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            out = jax.block_until_ready(_cached_loop(model, *args, kind=cache.kind))
    seconds = time.perf_counter() - start
    return CachedResult(out[0], np.asarray(out[1]), np.asarray(out[2]), seconds)


# --------------------------------------------------------------------------------------------------- calibration
def calibrate_mag_ratios(model, params, latents, text_states, text_mask, pooled_text, **kw) -> CachedResult:
    """Run the uncached loop once (every step computed) and return its MagCache ratios in `.ratios` [branches,
    steps] (branch 0 is what the sampler uses); keyword arguments as `denoise_cached`, `cache` defaulting to mag."""
    kw.setdefault("cache", CacheConfig(kind="mag"))
    return denoise_cached(model, params, latents, text_states, text_mask, pooled_text, calibrate=True, **kw)


def ratios_key(height: int, width: int, frames: int, steps: int) -> str:
    return f"{height}x{width}x{frames}/{steps}"


def write_mag_ratios(path, result: CachedResult, *, height: int, width: int, frames: int, steps: int,
                     model: str = "") -> dict[str, Any]:
    """Add the calibration of one resolution and step count to the JSON at `path` (one file per checkpoint)."""
    from etils import epath
    path = epath.Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"model": model, "ratios": {}}
    entry = {"mag_ratios": [float(r) for r in result.ratios[0]]}
    if result.ratios.shape[0] > 1:
        entry["negative_mag_ratios"] = [float(r) for r in result.ratios[1]]
    data["ratios"][ratios_key(height, width, frames, steps)] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def read_mag_ratios(path, *, height: int, width: int, frames: int, steps: int) -> tuple[float, ...]:
    """The prompt branch's ratios calibrated for this resolution and step count, else for the nearest step count at
    this resolution (nearest-interpolated later), else an error naming what the file has."""
    from etils import epath
    data = json.loads(epath.Path(path).read_text())["ratios"]
    key = ratios_key(height, width, frames, steps)
    if key in data:
        return tuple(data[key]["mag_ratios"])
    same = [k for k in data if k.split("/")[0] == key.split("/")[0]]
    if not same:
        raise ValueError(f"{path} has MagCache ratios for {sorted(data)}, none for {key.split('/')[0]}: calibrate "
                         f"this resolution (--calibrate_mag)")
    nearest = min(same, key=lambda k: abs(int(k.split("/")[1]) - steps))
    return tuple(data[nearest]["mag_ratios"])


def from_sample_config(sc: Mapping[str, Any] | Any) -> CacheConfig:
    """The CacheConfig of a `SampleConfig` (fields cache, cache_threshold, mag_max_skip_steps, mag_retention,
    mag_ratios)."""
    get = (lambda k: sc[k]) if isinstance(sc, Mapping) else (lambda k: getattr(sc, k))
    return CacheConfig(kind=get("cache"), threshold=get("cache_threshold"),
                       mag_max_skip_steps=get("mag_max_skip_steps"), mag_retention=get("mag_retention"),
                       mag_ratios=tuple(get("mag_ratios")))
