"""Training: a sharded `TrainState`, a pure `train_step(state, batch, rng)`, and the loop `train_and_evaluate`.

    python -m hyvideo_jax.train --config=configs/tiny.py --workdir=/tmp/run --config.train.num_steps=100

Several processes run the same command: on a TPU pod (or under SLURM) `config.train.initialize_distributed=True`
lets JAX find its place in the cluster; elsewhere each process is told with `--coordinator_address=host:port
--num_processes=N --process_id=i`, and all share one workdir.

The objective is chosen by `config.train.objective` (the registry `OBJECTIVES`): "flow" trains the DiT by flow
matching on batches of tokenized clips (hyvideo_jax.flow), "vae" trains the VAE on batches of videos with its
L1 + KL objective (hyvideo_jax.vae_objective), read by `data.source="videos"` from a folder of video files. An
objective returns a sum over the samples of a micro-batch and the number of samples it counts, so gradient
accumulation over k micro-batches gives exactly the gradient of the mean over the whole batch, with padding slots
(`valid` False) left out.

The loop: the state is created directly sharded on the mesh (jit with out_shardings; no device holds the whole
model) or restored from the latest Orbax checkpoint in WORKDIR/checkpoints, on whatever mesh the config now
describes. A checkpoint holds the train state and the data iterator's state (JSON) as one composite item, written
asynchronously and committed by an atomic rename, so a run killed while writing restores the previous one.
On SIGTERM (one process) or at a preemption sync point (multi-process), the loop saves and returns. Metrics go to
TensorBoard, the log and WORKDIR/metrics.jsonl (process 0 only): loss, grad norm, learning rate, skipped steps,
step time, image tokens/s and model-FLOPs utilization from the compiled step's cost analysis.
"""

import json
import signal
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from hyvideo_jax import flow
from hyvideo_jax import lora as lora_lib
from hyvideo_jax.data import pipeline
from hyvideo_jax.metrics import METRICS_FILE, JsonlWriter, read_metrics
from hyvideo_jax.models.dit import DiTConfig
from hyvideo_jax.objectives import OBJECTIVES, check_clips
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from hyvideo_jax.paths import resolve
# The state and the step, re-exported: `train` is the one module a training script or test needs.
from hyvideo_jax.train_step import (DECAYED_PARAMETERS, LR_SCHEDULES, PEAK_FLOPS, CompiledStep,
                                    TrainConfig, TrainState, create_train_state, decay_mask, learning_rate_schedule,
                                    make_optimizer, make_train_step, peak_flops_per_device, pretrained_params,
                                    start_adapters, state_from_params, state_shardings)

CONFIG_FILE = "config.json"
__all__ = ["CONFIG_FILE", "DECAYED_PARAMETERS", "LR_SCHEDULES", "METRICS_FILE", "OBJECTIVES", "PEAK_FLOPS",
           "CompiledStep", "JsonlWriter", "TrainConfig", "TrainState", "checkpoint_manager", "create_train_state",
           "decay_mask", "learning_rate_schedule", "main", "make_optimizer", "make_train_step", "peak_flops_per_device",
           "pretrained_params", "read_metrics", "restore_checkpoint", "start_adapters", "state_from_params",
           "state_shardings", "train_and_evaluate", "validate_config"]


# ----------------------------------------------------------------------------------------------------------- loop
def checkpoint_manager(workdir: str, config: TrainConfig) -> ocp.CheckpointManager:
    """Orbax manager of WORKDIR/checkpoints with items "state" (the TrainState) and "data" (iterator state, JSON)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=config.async_checkpointing,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(resolve(workdir) / "checkpoints", options=options,
                                 item_names=("state", "data"))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, iterator):
    """The state (without a LoRA run's frozen base, which `train.init_from` gives back) and the data iterator's
    position, as one checkpoint of `step` (asynchronous when the manager is). The position is one JSON for all
    processes (every process's iterator stands at the same step of the same plan), not Grain's checkpoint handler,
    whose files are per process count: a run may resume on another number of hosts."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(frozen=None)),
                                               data=ocp.args.JsonSave(iterator.get_state())), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """(TrainState placed by `abstract_state`'s shardings, data iterator state) of `step` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def validate_config(config) -> dict[str, Any]:
    """Every section the run reads, as validated frozen dataclasses; the first bad field raises ValueError."""
    train = TrainConfig.from_config(config.train)
    sections = dict(train=train, mesh=MeshConfig.from_config(config.mesh),
                    data=pipeline.DataConfig.from_config(config.data))
    videos = sections["data"].source == "videos"
    if train.objective == "vae":
        if not videos:
            raise ValueError(f"data.source: the 'vae' objective trains on pixels: set it to 'videos' (a folder of "
                             f"video files in data.path), got {sections['data'].source!r}")
        from hyvideo_jax.data.config import PrepareConfig
        from hyvideo_jax.models.vae import VAEConfig
        from hyvideo_jax.vae_objective import VAELossConfig
        sections.update(vae=VAEConfig.from_config(config.vae.model),
                        vae_loss=VAELossConfig.from_config(config.vae.loss),
                        prepare=PrepareConfig.from_config(config.data.prepare))
    else:
        if videos:
            raise ValueError(f"data.source: 'videos' gives pixels, which only the 'vae' objective trains on; "
                             f"train.objective is {train.objective!r}")
        sections.update(model=DiTConfig.from_config(config.model), flow=flow.FlowConfig.from_config(config.flow))
        check_clips(sections["model"], sections["data"])
        if sections["flow"].guidance_range:
            raise ValueError(f"flow.guidance_range {sections['flow'].guidance_range}: the flow-matching target does "
                             f"not depend on the embedded guidance, so sampling it per sample teaches the model to "
                             f"ignore its guidance input; a range needs a distillation objective whose target comes "
                             f"from a CFG teacher. Fine-tune with a constant flow.guidance (the community trainers "
                             f"use 1.0) and guidance_range=()")
    name, model = ("vae.model", sections["vae"]) if "vae" in sections else ("model", sections["model"])
    if model.param_dtype != "float32":
        raise ValueError(f"{name}.param_dtype: training keeps fp32 master parameters (compute in {name}.dtype, e.g. "
                         f"bfloat16), so that small updates and the EMA are not rounded away; bf16-stored parameters "
                         f"are for inference. Got {model.param_dtype!r}")
    sections["lora"] = lora_lib.LoRAConfig.from_config(config.get("lora"))
    from hyvideo_jax.evaluate import EvalConfig
    sections["eval"] = EvalConfig.from_config(config.get("eval"))
    data = sections["data"]
    sections["evaluate"] = bool(data.eval_path or data.eval_fraction)
    if train.eval_every_steps and not sections["evaluate"]:
        raise ValueError(f"train.eval_every_steps {train.eval_every_steps}: there is nothing to evaluate on; set "
                         f"data.eval_path (prepared clips) or data.eval_fraction (held-out training records)")
    if sections["evaluate"] and train.objective != "flow":
        raise ValueError(f"data.eval_path / data.eval_fraction: evaluation is the transformer's validation loss; "
                         f"objective {train.objective!r} has none")
    if sections["lora"].enabled and train.objective != "flow":
        raise ValueError(f"lora.rank: adapters train the transformer (objective 'flow'), not {train.objective!r}")
    batch = sections["data"].global_batch_size
    if batch % train.grad_accum_steps:
        raise ValueError(f"train.grad_accum_steps: {train.grad_accum_steps} does not divide "
                         f"data.global_batch_size {batch}")
    ici, dcn = sections["mesh"].resolve(jax.device_count())
    batch_devices = ici[0] * ici[1] * dcn[0] * dcn[1]
    if batch % batch_devices:
        raise ValueError(f"data.global_batch_size: {batch} does not divide over the {batch_devices} devices of the "
                         f"mesh's batch axes (data × fsdp, mesh.ici {ici}, mesh.dcn {dcn})")
    return sections


class _StopSignal:
    """Set by SIGTERM (one process; the previous handler is restored on exit). With several processes, JAX's
    preemption service catches the signal and `reached_preemption_sync_point` makes all agree on one step."""

    def __init__(self):
        self.event, self.previous = threading.Event(), None

    def __enter__(self):
        # With several processes the preemption notifier owns SIGTERM; a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:   # no preemption service (jax.distributed without a coordinator-side manager)
                return False
        return self.event.is_set()


class NonFiniteSteps(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class SkipWatch:
    """Counts consecutive skipped (non-finite) steps from the steps' running `skipped_steps` counts, read one step
    late so the host never waits for the step it has just dispatched, or at once (`flush`) before a checkpoint; at
    `limit` in a row (0: never) it raises NonFiniteSteps, so nothing after them is saved."""

    def __init__(self, limit: int, skipped_before: int):
        self.limit, self.last, self.run = limit, skipped_before, 0
        self.pending: tuple[int, Any] | None = None

    def observe(self, step: int, skipped_count):
        self.flush()
        self.pending = (step, skipped_count)

    def flush(self):
        if self.pending is None:
            return
        step, count = self.pending
        self.pending = None
        count = int(count)
        self.run = self.run + 1 if count > self.last else 0
        self.last = count
        if self.limit and self.run >= self.limit:
            raise NonFiniteSteps(f"{self.run} consecutive steps ({step - self.run + 1} to {step}) had a non-finite "
                                 f"loss or gradient norm (train.max_consecutive_skips={self.limit}); stopping without "
                                 f"saving them. Lower the learning rate, check those steps' data, or resume from the "
                                 f"last checkpoint.")


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    host = jax.device_get(history)
    means = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
    means["skipped_steps"] = float(host[-1]["skipped_steps"])   # a running count, not a rate
    return means


def train_and_evaluate(config, workdir: str, writers: Sequence[metric_writers.MetricWriter] = ()) -> TrainState:
    """Train per `config` in `workdir`, resuming from its latest checkpoint; returns the final TrainState.

    `writers`: more CLU metric writers for process 0 (e.g. a progress display), given what TensorBoard gets."""
    sections = validate_config(config)
    from hyvideo_jax.compilation import CacheCounter, use_compilation_cache
    use_compilation_cache(sections["train"].compilation_cache_dir or str(resolve(workdir) / "compilation_cache"))
    cache_use = CacheCounter().__enter__()   # what this run reads from / writes to the cache (left in `finally`)
    train_config: TrainConfig = sections["train"]
    mesh = create_mesh(sections["mesh"])
    task = OBJECTIVES[train_config.objective](config)
    tx = make_optimizer(train_config)
    abstract_state, shardings = state_shardings(task, tx, train_config, mesh)
    step_fn = CompiledStep(make_train_step(task, tx, train_config), mesh, shardings,
                           global_batch_size=sections["data"].global_batch_size)
    data = sections["data"]
    source = pipeline.make_source(data, config.seed, sections.get("prepare"), jax.process_index())
    iterator = pipeline.make_train_pipeline(config.data, seed=config.seed, source=source, slots=step_fn.rows)
    init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))   # rng: folded with the step in train_step

    def initial_state():
        if train_config.init_from:
            logging.info("Starting from %s", train_config.init_from)
            return state_from_params(task, tx, train_config, mesh,
                                     pretrained_params(config, mesh, shardings=shardings.params), init_rng)
        return create_train_state(task, tx, train_config, mesh, init_rng)

    manager = checkpoint_manager(workdir, train_config)
    if manager.latest_step() is not None:
        state, data_state = restore_checkpoint(manager, abstract_state.replace(frozen=None))
        if task.lora.enabled:   # the frozen base is not in checkpoints: the same weights again
            state = state.replace(frozen=initial_state().frozen)
        iterator.set_state(data_state)
        logging.info("Resumed from step %d (mesh %s)", int(state.step), dict(mesh.shape))
    else:
        state = initial_state()
        if task.lora.init_from:
            state = start_adapters(state, config, mesh, shardings)
    start = int(state.step)
    # Every bucket's program before step 1 (a restart reads them from the compilation cache).
    layouts = [{k: v for k, v in pipeline.batch_layout(data, shape, data.global_batch_size, data.source == "videos")
                .items() if k in task.batch_keys}
               for shape in pipeline.bucket_shapes(pipeline.training_source(data, config.seed, source=source))]
    compiled = step_fn.precompile(abstract_state, layouts)
    precompiled = len(step_fn.programs)
    logging.info("Train step compiled for %d bucket shape(s) in %.1f s, %d read from the compilation cache",
                 len(compiled), sum(c[1] for c in compiled), sum(c[2] for c in compiled))
    evaluator = None
    if sections["evaluate"]:
        from hyvideo_jax.evaluate import TrainingEvaluator
        evaluator = TrainingEvaluator(config, workdir, mesh)
    logging.info("Process %d of %d: %d of %d devices, mesh %s, from step %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), dict(mesh.shape), start)

    is_main = jax.process_index() == 0
    if is_main:   # what the run is, for the sampler and the exporters (the latest start's config)
        from etils import epath
        epath.Path(workdir, CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, default=list))
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if is_main:
        writer = metric_writers.MultiWriter([writer, JsonlWriter(str(resolve(workdir) / METRICS_FILE)), *writers])
    if start == 0:
        writer.write_hparams({k: v for k, v in flatten(config.to_dict()).items()})
    hooks = [periodic_actions.ReportProgress(num_train_steps=train_config.num_steps, writer=writer)]
    if train_config.profile_steps and is_main:
        hooks.append(periodic_actions.Profile(num_profile_steps=train_config.profile_steps, logdir=workdir))
    peak = peak_flops_per_device(train_config)

    history, tokens, flops = [], 0, 0.0
    interval_start, compile_before = time.perf_counter(), 0.0
    skips = SkipWatch(train_config.max_consecutive_skips, int(state.skipped))
    try:
        with _StopSignal() as stop:
            for step in range(start, train_config.num_steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    local = next(iterator)
                    batch = step_fn.global_batch({k: local[k] for k in task.batch_keys})
                    (state, metrics), step_flops = step_fn(state, batch, rng)
                skips.observe(step + 1, metrics["skipped_steps"])
                history.append(metrics)
                tokens += task.tokens({k: v.shape for k, v in batch.items()})
                flops += (task.model_flops({k: v.shape for k, v in batch.items()}) if task.model_flops
                          else step_flops * jax.device_count())
                done = step + 1
                for hook in hooks:
                    hook(done)
                if done % train_config.log_every_steps == 0 or done == train_config.num_steps:
                    summary = _mean_metrics(history)   # device_get: waits for the steps, so the clock below is true
                    seconds = time.perf_counter() - interval_start - (step_fn.compile_seconds - compile_before)
                    summary.update(step_time=seconds / len(history), tokens_per_second=tokens / seconds,
                                   compile_seconds=step_fn.compile_seconds)
                    if peak:
                        summary["mfu"] = flops / seconds / (peak * jax.device_count())
                    writer.write_scalars(done, summary)
                    history, tokens, flops = [], 0, 0.0
                    interval_start, compile_before = time.perf_counter(), step_fn.compile_seconds
                if evaluator is not None and (done == train_config.num_steps or (
                        train_config.eval_every_steps and done % train_config.eval_every_steps == 0)):
                    scalars, sheet = evaluator(state, done)
                    writer.write_scalars(done, scalars)
                    if sheet is not None:
                        writer.write_images(done, {"eval/samples": sheet[None]})
                stopping = stop.reached(done)
                if done % train_config.checkpoint_every_steps == 0 or done == train_config.num_steps or stopping:
                    skips.flush()
                    save_checkpoint(manager, done, state, iterator)
                if stopping:
                    logging.warning("Stop requested (SIGTERM or preemption): saved step %d, exiting", done)
                    break
            skips.flush()
    finally:   # an earlier checkpoint still being written is finished, also when the run stops on an error
        manager.wait_until_finished()
        manager.close()
        writer.flush()
        cache_use.__exit__(None, None, None)
        logging.info("Compilation: %d program(s) read from the compilation cache, %d compiled and written to it; "
                     "%d train-step program(s) compiled after step 1", cache_use.hits, cache_use.writes,
                     len(step_fn.programs) - precompiled)
    return state


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} of a nested dict; tuples become strings (hyper-parameters must be scalars)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value) if isinstance(value, (tuple, list)) else value
    return out


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config, f = flags.FLAGS.config, flags.FLAGS
    explicit = dict(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                    process_id=f.process_id)
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise app.UsageError(f"--coordinator_address, --num_processes and --process_id go together; missing "
                                 f"{', '.join('--' + k for k in missing)}")
        jax.distributed.initialize(**explicit)   # before anything touches the devices
    elif config.get("train", {}).get("initialize_distributed", False):
        jax.distributed.initialize()   # the cluster (TPU pod, SLURM, ...) tells each process its place
    try:
        validate_config(config)
    except ValueError as e:
        raise SystemExit(f"invalid config: {e}") from None
    try:
        train_and_evaluate(config, flags.FLAGS.workdir)
    except NonFiniteSteps as e:
        raise SystemExit(f"stopped: {e}") from None


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and profiles (resumed if it has any).")
    config_flags.DEFINE_config_file("config", None, "Training configuration (configs/*.py).", lock_config=True)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes outside a "
                        "cluster JAX detects (with --num_processes and --process_id).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
