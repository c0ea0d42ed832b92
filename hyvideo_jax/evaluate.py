"""Evaluation of the transformer: the validation loss at fixed noise levels, and sample grids.

    evaluator = LossEvaluator(config, mesh)       # the evaluation clips config.data names (eval_path / eval_fraction)
    scalars = evaluator(params)                   # {"eval/loss": ..., "eval/loss_sigma_0.062": ..., "eval/clips": n}
    sheet = write_sample_grid(sampler, prompts, "run/eval/step_100")   # mp4s + contact_sheet.png

    python -m hyvideo_jax.evaluate --config=configs/demo.py --workdir=run [--step=N | --follow]

The validation loss is the flow-matching MSE (unweighted) of the velocity prediction on every evaluation clip at each
σ of a fixed grid (`eval.num_sigmas` midpoints of [0, 1], or `eval.sigmas`), the noise of clip i at grid point k drawn
from (eval.seed, i, k): the same number for the same weights whatever the batch size, the mesh or the number of
processes, comparable across checkpoints and runs. It is reported overall (the mean over σ) and per σ; each σ's is a
mean over clips, summed on the host in float64 in clip order, so two runs give the same bits. For an image-to-video
transformer the loss is the training objective's: the clip's first-frame latent conditions the model, and the
mean runs over latent frames 1.. (`flow.loss_frames`).

The training loop evaluates at `train.eval_every_steps` and at its final step (`TrainingEvaluator`), writing through
its CLU writers (TensorBoard and metrics.jsonl; the contact sheet as a TensorBoard image). The command evaluates a
run's checkpoints from outside, e.g. on another VM or in Colab: one step, the latest, or with `--follow` each new
checkpoint of a running job once, in order, until the job's final step. It writes only under WORKDIR/eval/ (its
metrics.jsonl, TensorBoard logs and step_N/ grids), never into the job's checkpoints or metrics.
"""

import dataclasses
import sys
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from hyvideo_jax import flow
from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.convert.dit_sources import inference_config
from hyvideo_jax.data import pipeline
from hyvideo_jax.models import image_condition
from hyvideo_jax.models.dit import HunyuanVideoDiT
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
from hyvideo_jax.parallel.sharding import batch_sharding, replicated

EVAL_DIR = "eval"
SHEET = "contact_sheet.png"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `config.eval` section. The validation loss: `num_sigmas` grid points (σ_k = (k + ½) / num_sigmas) unless
    `sigmas` lists them, noise from `seed`, batches of `batch_size` clips (0: data.global_batch_size), the first
    `max_clips` clips (0: all); `use_ema` evaluates the EMA weights when the run keeps them. The sample grid: one
    video per prompt of `prompts` (seed `seed` + i, sizes and steps from `config.sample`), and a contact sheet of
    `sheet_columns` frames at fixed times per video; `sample_grid` also makes it in the training loop."""
    num_sigmas: int = 8
    sigmas: tuple[float, ...] = ()
    seed: int = 0
    batch_size: int = 0
    max_clips: int = 0
    use_ema: bool = True
    prompts: tuple[str, ...] = ()
    sample_grid: bool = False
    sheet_columns: int = 4

    def __post_init__(self):
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
        self.validate()

    def validate(self):
        def fail(field, msg):
            raise ValueError(f"eval.{field}: {msg}")
        if self.num_sigmas < 1:
            fail("num_sigmas", f"must be positive, got {self.num_sigmas}")
        if any(not 0.0 < s <= 1.0 for s in self.sigmas):
            fail("sigmas", f"must lie in (0, 1], got {self.sigmas}")
        for f in ("batch_size", "max_clips"):
            if getattr(self, f) < 0:
                fail(f, f"must be >= 0, got {getattr(self, f)}")
        if self.sheet_columns < 1:
            fail("sheet_columns", f"must be positive, got {self.sheet_columns}")
        if self.sample_grid and not self.prompts:
            fail("sample_grid", "is set but eval.prompts is empty: list the prompts to sample")
        if any(not p.strip() for p in self.prompts):
            fail("prompts", "holds an empty prompt")

    @property
    def grid(self) -> np.ndarray:
        """The σ values, float32."""
        if self.sigmas:
            return np.asarray(self.sigmas, np.float32)
        return ((np.arange(self.num_sigmas) + 0.5) / self.num_sigmas).astype(np.float32)

    @classmethod
    def from_config(cls, config: "EvalConfig | Mapping[str, Any] | None") -> "EvalConfig":
        return from_fields(cls, config or {}, "eval")


def sigma_name(sigma: float) -> str:
    return f"eval/loss_sigma_{sigma:.3f}"


def eval_batches(latent_shapes: np.ndarray, batch_size: int, max_clips: int = 0) -> list[tuple[np.ndarray,
                                                                                             np.ndarray]]:
    """[(latent shape, record indices [batch_size], -1 for padding)] covering the first `max_clips` records (0: all)
    once, bucket by bucket (shapes in ascending order, records in index order): the same on every process."""
    shapes = np.asarray(latent_shapes, np.int64).reshape(-1, 3)
    if max_clips:
        shapes = shapes[:max_clips]
    batches = []
    for shape in np.unique(shapes, axis=0):
        records = np.flatnonzero((shapes == shape).all(axis=1))
        for first in range(0, len(records), batch_size):
            chunk = records[first:first + batch_size]
            batches.append((shape, np.pad(chunk, (0, batch_size - len(chunk)), constant_values=-1)))
    return batches


class LossEvaluator:
    """The validation loss of the module docstring for any weights of `config.model`, on `mesh`.

    `source` overrides the evaluation clips of `config.data`. Inputs are read whole by every process and placed by
    the mesh's batch axes (replicated when the batch does not divide over them); per-clip losses come back to every
    process, which sums them in float64."""

    def __init__(self, config, mesh, source=None, rules=LOGICAL_AXIS_RULES, progress: bool = False):
        self.config = EvalConfig.from_config(config.get("eval"))
        data = pipeline.DataConfig.from_config(config.data)
        self.source = pipeline.eval_source(data, config.get("seed", 0)) if source is None else source
        if self.source is None:
            raise ValueError("no evaluation clips: set data.eval_path (a prepared folder, or a TFDS split) or "
                             "data.eval_fraction (a held-out share of the training records)")
        if not len(self.source):
            raise ValueError("the evaluation source holds no clips")
        dit = inference_config(config)
        self.model, self.guidance_embed = HunyuanVideoDiT(dit), dit.guidance_embed
        self.flow = flow.FlowConfig.from_config(config.flow)
        self.mesh, self.rules, self.progress = mesh, rules, progress
        self.load = pipeline.LoadBatch(self.source, data)
        self.batch_size = self.config.batch_size or data.global_batch_size
        self.batches = eval_batches(self.source.latent_shapes(), self.batch_size, self.config.max_clips)
        self.sigmas = self.config.grid
        # Per-clip losses replicated: every process reads them all (a sharded output spans other hosts' devices).
        self._losses = jax.jit(self._per_clip, out_shardings=replicated(mesh))

    def _per_clip(self, params, batch, sigma, sigma_index):
        """Per-clip MSE [B] of the velocity prediction at noise level `sigma` (grid point `sigma_index`)."""
        x = batch["latents"].astype(jnp.float32)
        b = x.shape[0]
        base = jax.random.PRNGKey(self.config.seed)
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), sigma_index))(
            jnp.maximum(batch["record_index"], 0))
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
        sigmas = jnp.full((b,), sigma, jnp.float32)
        guidance = flow.guidance_input(None, b, self.flow) if self.guidance_embed else None
        kind = self.model.config.image_condition_type
        image = None if kind is None else batch["image_latent"].astype(jnp.float32)
        inputs = image_condition.model_input(kind, flow.noised(x, noise, sigmas), image)
        prediction = self.model.apply({"params": params}, inputs, 1000.0 * sigmas,
                                      batch["text_states"], batch["text_mask"], batch["pooled_text"], guidance)
        return flow.framed_mse(prediction, flow.velocity_target(x, noise), flow.loss_frames(kind, x.shape[1]))

    def _place(self, host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        sharding = batch_sharding(self.mesh, self.rules, self.batch_size)
        arrays = {k: host[k] for k in ("latents", "text_states", "text_mask", "pooled_text", "image_latent")
                  if k in host}
        arrays["record_index"] = host["record_index"].astype(np.int32)
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i]) for k, v in arrays.items()}

    def __call__(self, params) -> dict[str, float]:
        """{"eval/loss": mean over σ, sigma_name(σ): mean over clips at σ, "eval/clips": count} for `params` (full
        weights of config.model, placed on the mesh or on the host)."""
        from tqdm import tqdm
        sums, count = np.zeros(len(self.sigmas), np.float64), 0
        bar = tqdm(total=len(self.batches) * len(self.sigmas), desc="validation loss", unit="batch",
                   disable=not self.progress or jax.process_index() != 0, file=sys.stderr)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for shape, indices in self.batches:
                host = self.load.map((shape, indices))
                batch = self._place(host)
                valid = np.asarray(host["valid"], bool)
                for k, sigma in enumerate(self.sigmas):
                    losses = np.asarray(jax.device_get(self._losses(params, batch, sigma, k)), np.float64)
                    sums[k] += losses[valid].sum()
                    bar.update(1)
                count += int(valid.sum())
        bar.close()
        per_sigma = sums / count
        scalars = {"eval/loss": float(per_sigma.mean()), "eval/clips": float(count)}
        scalars.update({sigma_name(s): float(v) for s, v in zip(self.sigmas, per_sigma)})
        return scalars


# ------------------------------------------------------------------------------------------------------ sample grids
def sheet_frames(num_frames: int, columns: int) -> np.ndarray:
    """The frame indices a contact sheet shows: `columns` evenly spaced times from the first frame to the last."""
    return np.unique(np.round(np.linspace(0, num_frames - 1, columns)).astype(np.int64))


def contact_sheet(videos: np.ndarray, columns: int) -> np.ndarray:
    """uint8 [N·H, C·W, 3]: row n holds video n's frames at `sheet_frames` (videos: uint8 [N, F, H, W, 3])."""
    videos = np.asarray(videos)
    frames = sheet_frames(videos.shape[1], columns)
    return np.concatenate([np.concatenate(list(video[frames]), axis=1) for video in videos], axis=0)


def write_png(path, image: np.ndarray) -> str:
    """An RGB uint8 image as PNG at `path` (local or a cloud path)."""
    import mediapy
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mediapy.compress_image(image, fmt="png"))
    return str(path)


def write_sample_grid(sampler, prompts: Sequence[str], out_dir, *, seed: int = 0, columns: int = 4
                      ) -> tuple[np.ndarray, list[str]]:
    """One video per prompt (seed `seed` + i) as mp4s under `out_dir` (`sample.mp4`, or `sample_000.mp4`, ... with
    `sample.jsonl` naming each prompt and seed) and their contact sheet `out_dir/contact_sheet.png`.
    Returns (sheet, mp4 paths)."""

    from hyvideo_jax.sample import write_outputs
    result = sampler.generate(list(prompts), seeds=[seed + i for i in range(len(prompts))], videos_per_prompt=1)
    paths = write_outputs(result, str(epath.Path(out_dir) / "sample.mp4"), sampler.config.fps, save_latents=False)
    sheet = contact_sheet(result.videos, columns)
    write_png(epath.Path(out_dir) / SHEET, sheet)
    return sheet, paths


def grid_sampler(config, mesh, rules=LOGICAL_AXIS_RULES):
    """A Sampler (text encoders, VAE) for sample grids, without transformer weights: set `sampler.params` to the
    weights of each evaluated step."""
    from hyvideo_jax.sample import Sampler
    return Sampler.from_config(config, dit=(inference_config(config), None, "evaluated weights"), mesh=mesh,
                               rules=rules)


# --------------------------------------------------------------------------------------------------- in training
class TrainingEvaluator:
    """What the training loop runs at `train.eval_every_steps` and its final step: the validation loss of the
    state's weights (EMA if `eval.use_ema` and kept; a LoRA run's adapters merged into their base) and, with
    `eval.sample_grid`, the grid under WORKDIR/eval/step_N/ (written by process 0)."""

    def __init__(self, config, workdir: str, mesh, rules=LOGICAL_AXIS_RULES):
        from hyvideo_jax import lora
        self.loss = LossEvaluator(config, mesh, rules=rules)
        self.config, self.workdir = self.loss.config, workdir
        adapters = lora.LoRAConfig.from_config(config.get("lora"))
        self._merge = jax.jit(lambda base, a: lora.merge(base, a, adapters))
        self.sampler = grid_sampler(config, mesh, rules) if self.config.sample_grid else None

    def weights(self, state):
        params = state.ema_params if self.config.use_ema and state.ema_params is not None else state.params
        if state.frozen is not None:
            with jax.set_mesh(self.loss.mesh):
                params = self._merge(state.frozen, params)
        return params

    def __call__(self, state, step: int) -> tuple[dict[str, float], np.ndarray | None]:
        """(scalars, contact sheet or None) for the state at `step`."""
        start = time.perf_counter()
        params = self.weights(state)
        scalars = self.loss(params)
        sheet = None
        if self.sampler is not None:
            self.sampler.params = params
            out = epath.Path(self.workdir) / EVAL_DIR / f"step_{step}"
            if jax.process_index() == 0:
                sheet, _ = write_sample_grid(self.sampler, self.config.prompts, out, seed=self.config.seed,
                                             columns=self.config.sheet_columns)
            else:   # every process takes part in the sharded sampling; one writes
                self.sampler.generate(list(self.config.prompts), videos_per_prompt=1,
                                      seeds=[self.config.seed + i for i in range(len(self.config.prompts))])
        scalars["eval/seconds"] = time.perf_counter() - start
        logging.info("Step %d: validation loss %.6f over %d clips (%.1f s)", step, scalars["eval/loss"],
                     int(scalars["eval/clips"]), scalars["eval/seconds"])
        return scalars, sheet


# ------------------------------------------------------------------------------------------------ a run's checkpoints
def _writer(out_dir: str):
    """CLU writers for the evaluator's own folder: TensorBoard and its metrics.jsonl (process 0 writes)."""
    from clu import metric_writers

    from hyvideo_jax.metrics import METRICS_FILE, JsonlWriter
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(out_dir, just_logging=True)
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    return metric_writers.MultiWriter([metric_writers.create_default_writer(out_dir),
                                       JsonlWriter(str(epath.Path(out_dir) / METRICS_FILE))])


def evaluated_steps(workdir: str) -> list[int]:
    """The steps whose validation loss WORKDIR/eval/metrics.jsonl already holds (the command's own results)."""

    from hyvideo_jax.metrics import read_metrics
    return sorted(s for s, row in read_metrics(str(epath.Path(workdir) / EVAL_DIR)).items() if "eval/loss" in row)


def evaluate_workdir(config, workdir: str, *, step: int | None = None, follow: bool = False, samples: bool = True,
                     poll_seconds: float = 30.0, idle_timeout: float = 3600.0, mesh=None, progress: bool = True,
                     report=print) -> dict[int, dict[str, float]]:
    """Evaluate a training run's checkpoints (config: the run's); returns {step: scalars} of what it evaluated.

    Without `follow`: `step` (default the latest). With `follow`: every checkpoint not evaluated before (by this
    command: WORKDIR/eval/metrics.jsonl), in order, polling every `poll_seconds` until the run's final step
    (`train.num_steps`) is evaluated; `idle_timeout` seconds without a new checkpoint raise TimeoutError. `samples`
    makes the grid of `eval.prompts` for each step too."""
    from hyvideo_jax.convert.dit_sources import load_dit
    from hyvideo_jax.convert.flax_io import checkpoint_steps
    from hyvideo_jax.parallel.mesh import create_mesh
    mesh = create_mesh(config.mesh) if mesh is None else mesh
    loss = LossEvaluator(config, mesh, progress=progress)
    ec = loss.config
    sampler = grid_sampler(config, mesh) if samples and ec.prompts else None
    out = epath.Path(workdir) / EVAL_DIR
    writer = _writer(str(out))
    results = {}

    def evaluate(s: int):
        start = time.perf_counter()
        _, params, description = load_dit(config, workdir=workdir, step=s, use_ema=ec.use_ema, mesh=mesh)
        scalars = loss(params)
        if sampler is not None:
            sampler.params = params
            sheet, _ = write_sample_grid(sampler, ec.prompts, out / f"step_{s}", seed=ec.seed,
                                         columns=ec.sheet_columns)
            writer.write_images(s, {"eval/samples": sheet[None]})
        scalars["eval/seconds"] = time.perf_counter() - start
        writer.write_scalars(s, scalars)
        writer.flush()
        results[s] = scalars
        report(f"step {s}: validation loss {scalars['eval/loss']:.6f} over {int(scalars['eval/clips'])} clips "
               f"({description}, {scalars['eval/seconds']:.1f} s)")

    try:
        if not follow:
            steps = checkpoint_steps(workdir)
            if not steps:
                raise FileNotFoundError(f"{workdir} holds no finished checkpoint")
            evaluate(steps[-1] if step is None else step)
            return results
        final = int(config.train.num_steps)
        done = set(evaluated_steps(workdir))
        idle_since = time.monotonic()
        while final not in done:
            new = [s for s in checkpoint_steps(workdir) if s not in done]
            for s in new:
                evaluate(s)
                done.add(s)
            if new:
                idle_since = time.monotonic()
            elif final not in done:
                if time.monotonic() - idle_since > idle_timeout:
                    raise TimeoutError(f"no new checkpoint in {workdir} for {idle_timeout:.0f} s (last evaluated: "
                                       f"{max(done) if done else 'none'}, the run ends at step {final})")
                time.sleep(poll_seconds)
        return results
    finally:
        writer.close()


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if f.follow and f.step is not None:
        raise app.UsageError("--step and --follow exclude each other")
    config = f.config
    if config is None:   # the run's own config, as it started
        from hyvideo_jax.convert.flax_io import run_config
        config = run_config(f.workdir)
    try:
        evaluate_workdir(config, f.workdir, step=f.step, follow=f.follow, samples=f.samples,
                         poll_seconds=f.poll_seconds, idle_timeout=f.idle_timeout)
    except (ValueError, FileNotFoundError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The run's configuration (default: WORKDIR/config.json).")
    flags.DEFINE_string("workdir", None, "The training run's workdir (read-only but for WORKDIR/eval/).")
    flags.DEFINE_integer("step", None, "Evaluate this checkpoint (default: the latest).")
    flags.DEFINE_boolean("follow", False, "Evaluate each new checkpoint once, in order, until the run's final step.")
    flags.DEFINE_boolean("samples", True, "Also write the sample grid of eval.prompts for each evaluated step.")
    flags.DEFINE_float("poll_seconds", 30.0, "With --follow: how often to look for new checkpoints.")
    flags.DEFINE_float("idle_timeout", 3600.0, "With --follow: give up after this long without a new checkpoint.")
    flags.mark_flags_as_required(["workdir"])
    app.run(lambda argv: sys.exit(main(argv)))
