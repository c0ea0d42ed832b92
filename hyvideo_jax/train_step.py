"""The training state and one step: `TrainConfig` (the `config.train` section), a sharded `TrainState` created on
the mesh (fresh, around pretrained weights, or as LoRA adapters over a frozen base), the optimizer, the pure
`train_step(state, batch, rng)` and `CompiledStep`, its ahead-of-time compiled programs per batch shape.

One step (`make_train_step`): per-sample PRNG keys from fold_in(seed key, step), the batch split into
`grad_accum_steps` micro-batches (strided, so each stays sharded over the batch axes) and scanned, gradients
divided by the valid count, global-norm clipping and AdamW (warmup + constant or cosine learning rate, weight decay
on kernels only), EMA of the parameters. A step whose loss or gradient norm is not finite leaves params, optimizer
state and EMA untouched and increments `skipped`; `step` always advances, since the batch was consumed.
"""

import dataclasses
import time
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from hyvideo_jax import lora as lora_lib
from hyvideo_jax.compilation import run_once_options
from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.models.dit import DiTConfig
from hyvideo_jax.objectives import OBJECTIVES, Task
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
from hyvideo_jax.parallel.sharding import batch_sharding, param_shardings, process_rows

LR_SCHEDULES = ("constant", "cosine")
# Dense bf16 peak FLOP/s per device (public figures), matched against `device.device_kind` by substring, first
# match wins. Devices not listed (CPUs) get no MFU unless train.peak_flops_per_device is set.
PEAK_FLOPS = (("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
              ("TPU v4", 275e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `config.train` section.

    Learning rate: linear warmup from 0 over `warmup_steps`, then constant or cosine decay to `learning_rate ·
    final_lr_fraction` at `num_steps`. `grad_clip_norm` 0 disables clipping, `ema_decay` 0 keeps no EMA parameters,
    `profile_steps` 0 runs no profiler. `checkpoint_every_steps` also bounds the work lost to a crash; the last step
    is always saved. `init_from` starts a new run from pretrained weights of the objective's model: for "flow" the
    transformer (a folder written by `python -m hyvideo_jax.convert to-flax`, an official `.pt` or `*_fp8.pt`, a
    diffusers folder), for "vae" the VAE (a converted folder, PyTorch VAE weights, or a VAE training workdir: its
    latest checkpoint, EMA parameters when it kept them); the workdir's own checkpoints take precedence when there
    are any. With evaluation data (data.eval_path or data.eval_fraction) the run computes the validation loss
    (`hyvideo_jax.evaluate`, `config.eval`) every `eval_every_steps` (0: only) and at its final step. A step with a
    non-finite loss or gradient is skipped (the state unchanged); `max_consecutive_skips` such steps in a row stop
    the run (0: never). Compiled programs are cached in `compilation_cache_dir` (default WORKDIR/compilation_cache;
    "none": no cache) so that a restart compiles nothing again; every bucket shape's step is compiled before step 1.
    """
    objective: str = "flow"
    num_steps: int = 1000
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.0
    log_every_steps: int = 50
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    profile_steps: int = 0
    peak_flops_per_device: float = 0.0
    initialize_distributed: bool = False
    init_from: str = ""
    eval_every_steps: int = 0
    max_consecutive_skips: int = 10
    compilation_cache_dir: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        def fail(field, msg):
            raise ValueError(f"train.{field}: {msg}")
        if self.objective not in OBJECTIVES:
            fail("objective", f"must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            fail("lr_schedule", f"must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        for f in ("num_steps", "grad_accum_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
            if int(getattr(self, f)) < 1:
                fail(f, f"must be >= 1, got {getattr(self, f)}")
        for f in ("warmup_steps", "profile_steps", "eval_every_steps", "max_consecutive_skips", "learning_rate",
                  "weight_decay", "grad_clip_norm", "peak_flops_per_device", "adam_eps"):
            if getattr(self, f) < 0:
                fail(f, f"must be >= 0, got {getattr(self, f)}")
        for f in ("adam_b1", "adam_b2", "ema_decay", "final_lr_fraction"):
            if not 0.0 <= getattr(self, f) < 1.0 + (f == "final_lr_fraction"):
                fail(f, f"must be in [0, 1{']' if f == 'final_lr_fraction' else ')'}, got {getattr(self, f)}")

    @classmethod
    def from_config(cls, config: "TrainConfig | Mapping[str, Any]") -> "TrainConfig":
        return from_fields(cls, config, "train")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `step` counts consumed batches (applied or skipped), `skipped` the steps whose
    update was dropped as non-finite; `ema_params` is None without EMA. With LoRA, `params` are the adapters and
    `frozen` the base weights they adapt (never updated, never in the optimizer, not written to checkpoints: they
    come back from `train.init_from` or the seed)."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    skipped: jax.Array
    frozen: Any = None


# ------------------------------------------------------------------------------------------------ state and step
def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then constant or cosine decay (see TrainConfig)."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(config.num_steps, warmup + 1),
                                                  end_value=lr * config.final_lr_fraction)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


# Weight decay applies to these parameters, chosen by name: rank says nothing once `nn.scan` stacks biases and norm
# scales on a `layers` axis (and some biases have several axes outside scan too).
DECAYED_PARAMETERS = ("kernel",)


def decay_mask(params):
    """True for the leaves of `params` (plain or boxed) whose name is in DECAYED_PARAMETERS."""
    def decayed(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in DECAYED_PARAMETERS
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (first moment kept in fp32; the second follows the fp32 master parameters);
    weight decay on kernels only (`decay_mask`)."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                        weight_decay=config.weight_decay, mu_dtype=jnp.float32, mask=decay_mask)
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def _new_state(task: Task, tx, config: TrainConfig, weights, rng) -> TrainState:
    """Step 0 around model weights (plain or boxed): they are trained, or with LoRA frozen under new adapters."""
    frozen = None
    params = weights
    if task.lora.enabled:
        frozen, params = weights, lora_lib.init_adapters(weights, task.lora, jax.random.fold_in(rng, 1))
        if task.lora.base_dtype:
            frozen = jax.tree.map(lambda w: w.astype(task.lora.base_dtype), frozen)
    ema = jax.tree.map(lambda p: p.astype(jnp.float32), params) if config.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=ema,
                      skipped=jnp.zeros((), jnp.int32), frozen=frozen)


def _init_boxed(task: Task, tx, config: TrainConfig, mesh, rng) -> TrainState:
    weights = task.model.init(rng, *task.example_inputs(mesh))["params"]   # nn.Partitioned leaves (logical axes)
    return _new_state(task, tx, config, weights, rng)


def state_shardings(task: Task, tx, config: TrainConfig, mesh, rules=LOGICAL_AXIS_RULES):
    """(abstract TrainState with shardings, tree of NamedShardings): optimizer moments and EMA inherit the logical
    axes of their parameters (optax maps over the boxed leaves); counters are replicated."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract: the mesh may describe devices not attached (AOT)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: _init_boxed(task, tx, config, mesh, r), key)
    shardings = param_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                            shardings)
    return abstract, shardings


def create_train_state(task: Task, tx, config: TrainConfig, mesh, rng, rules=LOGICAL_AXIS_RULES) -> TrainState:
    """A fresh TrainState initialized on the mesh: each device computes only its shards (jit out_shardings)."""
    _, shardings = state_shardings(task, tx, config, mesh, rules)

    def init(r):
        with nn.logical_axis_rules(rules):
            return nn.unbox(_init_boxed(task, tx, config, mesh, r))
    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings, compiler_options=run_once_options())(rng)


def state_from_params(task: Task, tx, config: TrainConfig, mesh, params, rng=None,
                      rules=LOGICAL_AXIS_RULES) -> TrainState:
    """A fresh TrainState around given (placed) model weights: zero optimizer state, EMA starting from the same
    weights (fp32), or with LoRA the weights frozen under new adapters (from `rng`); built on the mesh with the
    state's shardings."""
    _, shardings = state_shardings(task, tx, config, mesh, rules)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    weights = shardings.frozen if task.lora.enabled else shardings.params
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda p, r: nn.unbox(_new_state(task, tx, config, p, r)), in_shardings=(weights, None),
                       out_shardings=shardings, compiler_options=run_once_options())(params, rng)


def pretrained_params(config, mesh, rules=LOGICAL_AXIS_RULES, shardings=None):
    """`train.init_from`'s weights of the objective's model, checked against `config.model` (or `config.vae.model`
    for the VAE objective; same architecture, else an error naming the fields), cast to its parameter dtype and
    placed on the mesh tensor by tensor (the VAE's onto `shardings`, the parameters' shardings)."""
    train = TrainConfig.from_config(config.train)
    if train.objective == "vae":
        return pretrained_vae_params(config, train.init_from, shardings)
    from hyvideo_jax.convert.dit import load_dit_sharded
    _, params = load_dit_sharded(train.init_from, mesh, like=DiTConfig.from_config(config.model), strict=True,
                                 rules=rules)
    return params


# What a VAE's weights depend on; the others (scaling factor, tiling, compute dtype) may differ from the source's.
VAE_ARCHITECTURE = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                    "norm_num_groups", "act_fn", "spatial_compression_ratio", "temporal_compression_ratio",
                    "mid_block_add_attention")


def pretrained_vae_params(config, source: str, shardings):
    """The VAE weights of `source` (converted folder, PyTorch weights, or a VAE training workdir) for
    `config.vae.model`, placed onto `shardings`."""
    from hyvideo_jax.convert.flax_io import is_training_workdir, training_config, training_params
    from hyvideo_jax.convert.vae import load_vae
    from hyvideo_jax.models.vae import VAEConfig, init_params
    like = VAEConfig.from_config(config.vae.model)
    workdir = is_training_workdir(source)
    if workdir:   # its checkpoint is restored below, straight onto the shardings
        saved = VAEConfig.from_config(training_config(source)["vae"]["model"])
    else:
        saved, params = load_vae(source)
    different = [f"{f} {getattr(saved, f)!r} (config: {getattr(like, f)!r})" for f in VAE_ARCHITECTURE
                 if getattr(saved, f) != getattr(like, f)]
    if different:
        raise ValueError(f"train.init_from: {source} is another VAE architecture than vae.model: "
                         f"{'; '.join(different)}")
    dtype = jnp.dtype(like.param_dtype)
    shapes = jax.eval_shape(lambda: init_params(like, jax.random.PRNGKey(0)))
    targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), shapes, shardings)
    if workdir:
        params, description = training_params(source, targets)
        logging.info("VAE weights: %s", description)
        return params
    return jax.tree.map(lambda x, t: jax.make_array_from_callback(
        t.shape, t.sharding, lambda index: np.asarray(x, dtype)[index]), params, targets)


def start_adapters(state: TrainState, config, mesh, shardings) -> TrainState:
    """A fresh LoRA state whose adapters (and EMA) continue `lora.init_from`'s LoRA file (`lora.start_from`): the
    file is read on every process, placed replicated, and combined on the mesh into the adapters' shardings."""
    from hyvideo_jax.convert.lora import load_lora
    lora = lora_lib.LoRAConfig.from_config(config.lora)
    loaded, loaded_config = load_lora(lora.init_from, DiTConfig.from_config(config.model))
    replicated = NamedSharding(mesh, PartitionSpec())
    loaded = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i]), loaded)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda ad, ld: lora_lib.start_from(ad, ld, loaded_config, lora),
                         out_shardings=shardings.params)(state.params, loaded)
        ema = None if state.ema_params is None else jax.jit(
            lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p), out_shardings=shardings.ema_params)(params)
    logging.info("LoRA adapters start from %s (rank %d, %d kernels)", lora.init_from, loaded_config.rank,
                 len(lora_lib.flat_adapters(loaded)))
    return state.replace(params=params, ema_params=ema)


def make_train_step(task: Task, tx, config: TrainConfig) -> Callable:
    """The pure `train_step(state, batch, rng) -> (state, metrics)`; `rng` is the run's key, folded with the step.

    batch: dict of [B, ...] arrays (task.batch_keys); B must divide by grad_accum_steps. Micro-batch j takes rows
    j, j + k, j + 2k, ... so that a batch sharded over devices gives micro-batches sharded the same way.
    """
    k = config.grad_accum_steps
    schedule = learning_rate_schedule(config)

    def objective(params, batch, rngs, frozen):
        if frozen is not None:   # LoRA: the adapted weights, gradients reach the adapters only
            params = lora_lib.merge(jax.lax.stop_gradient(frozen), params, task.lora)
        return task.objective(params, batch, rngs)

    def train_step(state: TrainState, batch, rng):
        b = next(iter(batch.values())).shape[0]
        rngs = jax.random.split(jax.random.fold_in(rng, state.step), b)
        grad_fn = jax.value_and_grad(lambda p, bt, r: objective(p, bt, r, state.frozen), has_aux=True)

        def micro_batch(carry, inputs):   # accumulates in fp32, whatever the gradients' dtype
            (_, sums), grads = grad_fn(state.params, *inputs)
            return jax.tree.map(lambda c, g: c + g.astype(c.dtype), carry, (grads, sums)), None
        if k == 1:
            (_, sums), grads = grad_fn(state.params, batch, rngs)
        else:
            split = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1), (batch, rngs))
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32),
                                 jax.eval_shape(lambda: grad_fn(state.params, *jax.tree.map(lambda x: x[0], split))))
            (grads, sums), _ = jax.lax.scan(micro_batch, (zeros[1], zeros[0][1]), split)
        count = jnp.maximum(sums.pop("count"), 1.0)
        grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
        metrics = {name: value / count for name, value in sums.items()}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1.0 - config.ema_decay) * p.astype(e.dtype),
                               ema, params)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=keep_if_finite(params, state.params),
                                  opt_state=keep_if_finite(opt_state, state.opt_state),
                                  ema_params=keep_if_finite(ema, state.ema_params), skipped=skipped)
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step - state.skipped),
                       skipped_steps=skipped, valid_samples=count)
        return new_state, metrics
    return train_step


class CompiledStep:
    """`train_step` compiled ahead of time per batch shape (buckets give several), with explicit shardings and the
    state donated; keeps each program's FLOPs (XLA cost analysis of the per-device program) and compile time.

    `global_batch_size` B: this process reads the rows `rows` of each global batch (the rows its devices hold, the
    same rows for processes that share a batch shard); default, B = the local rows × the number of processes."""

    def __init__(self, train_step: Callable, mesh, shardings, rules=LOGICAL_AXIS_RULES,
                 global_batch_size: int | None = None):
        self.mesh, self.rules = mesh, rules
        self.batch_sharding = batch_sharding(mesh)
        self.global_batch_size = global_batch_size
        self.rows = None if global_batch_size is None else process_rows(self.batch_sharding, global_batch_size)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.jitted = jax.jit(train_step, in_shardings=(shardings, self.batch_sharding, replicated),
                              out_shardings=(shardings, replicated), donate_argnums=0)
        self.programs: dict[tuple, Any] = {}
        self.flops: dict[tuple, float] = {}
        self.compile_seconds = 0.0

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows (`rows`, in order) → one global array per key, sharded over the batch axes."""
        if self.rows is None:
            return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                    for k, v in local.items()}
        where = np.full(self.global_batch_size, -1, np.int64)
        where[self.rows] = np.arange(len(self.rows))

        def place(value):
            value = np.asarray(value)
            if value.shape[0] != len(self.rows):
                raise ValueError(f"this process reads {len(self.rows)} rows of each batch, got {value.shape[0]}")
            return jax.make_array_from_callback(
                (self.global_batch_size, *value.shape[1:]), self.batch_sharding,
                lambda index: value[where[np.arange(self.global_batch_size)[index[0]]]][(slice(None), *index[1:])])
        return {k: place(v) for k, v in local.items()}

    @staticmethod
    def batch_key(batch: Mapping[str, Any]) -> tuple:
        return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))

    def compile(self, state, batch, rng) -> Any:
        """The program for this batch's shapes and dtypes (`state`, `batch` may be abstract: jax.ShapeDtypeStruct),
        compiled now unless it already is."""
        key = self.batch_key(batch)
        if key not in self.programs:
            start = time.perf_counter()
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                compiled = self.jitted.lower(state, batch, rng).compile()
            self.compile_seconds += time.perf_counter() - start
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            self.programs[key], self.flops[key] = compiled, float((cost or {}).get("flops", 0.0))
        return self.programs[key]

    def precompile(self, abstract_state, layouts, report=logging.info) -> list[tuple[str, float, bool]]:
        """Compile the step for every batch layout ({key: (shape, dtype)} of the global batch) before training, so
        no bucket shape compiles mid-run; reports each one's time and whether the persistent cache served it.
        Returns [(description, seconds, from cache)]."""
        from hyvideo_jax.compilation import CacheCounter
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        done = []
        for layout in layouts:
            batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
                     for k, (shape, dtype) in layout.items()}
            name = ", ".join(f"{k} {tuple(shape)}" for k, (shape, _) in layout.items() if k in ("latents", "video"))
            start = time.perf_counter()
            with CacheCounter() as counted:
                self.compile(abstract_state, batch, rng)
            seconds = time.perf_counter() - start
            cached = counted.hits > 0 and counted.writes == 0
            report(f"train step for {name}: {seconds:.1f} s ({'from the compilation cache' if cached else 'compiled'})")
            done.append((name, seconds, cached))
        return done

    def __call__(self, state, batch, rng):
        return self.compile(state, batch, rng)(state, batch, rng), self.flops[self.batch_key(batch)]


def peak_flops_per_device(config: TrainConfig) -> float:
    """The configured peak, else the table's entry for this device kind, else 0 (no MFU)."""
    if config.peak_flops_per_device:
        return config.peak_flops_per_device
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS if name in kind), 0.0)
