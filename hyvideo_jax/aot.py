"""Ahead-of-time compilation for a TPU topology on a machine without TPUs, and what the compiled program needs.

    python -m hyvideo_jax.aot --config=configs/hunyuan_video_13b.py --topology=v5p:8x8x4 \
        --config.mesh.ici="(1,64,4,1)" --frames=129 --height=720 --width=1280

compiles the full train step (forward, backward, AdamW update, EMA) for the topology (libtpu from the `tpu` extra
describes the chips; nothing runs) and prints per-chip argument / temporary / output memory against the chip's
HBM, the collectives in the optimized HLO, the model's FLOPs per step (counted from the config: XLA's cost analysis
sees a scanned block once and nothing inside Pallas kernels) and the step time that FLOPs imply at a given MFU.
"""

import collections
import copy
import dataclasses
import math
import os
import re
import time
from typing import Callable

import jax
from jax.sharding import Mesh

from hyvideo_jax.models.dit import forward_flops as dit_forward_flops
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh

# Per chip: HBM bytes and dense bf16 peak FLOP/s (public figures).
CHIPS = {
    "v4": (32 * 2**30, 275e12),
    "v5e": (16 * 2**30, 197e12),
    "v5p": (95 * 2**30, 459e12),
    "v6e": (32 * 2**30, 918e12),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass
class AOTReport:
    topology: str
    mesh_shape: dict[str, int]
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    hbm_bytes: int
    xla_flops: float
    peak_flops: float
    collectives: dict[str, int]
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        """Per-chip peak: arguments + temporaries + outputs that do not alias (donated) arguments."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    def table(self) -> str:
        gib = lambda b: f"{b / 2**30:8.2f} GiB"
        n = math.prod(self.mesh_shape.values())
        rows = [
            f"topology {self.topology}: {n} chips, mesh {self.mesh_shape}",
            f"  compile time         {self.compile_seconds:8.1f} s",
            f"  arguments / chip     {gib(self.argument_bytes)}",
            f"  temporaries / chip   {gib(self.temp_bytes)}",
            f"  outputs / chip       {gib(self.output_bytes)}  (aliasing donated arguments: {gib(self.alias_bytes)})",
            f"  total / chip         {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM "
            f"({100 * self.total_bytes / self.hbm_bytes:.0f}%, margin {gib(self.hbm_bytes - self.total_bytes)})",
            f"  XLA cost analysis    {self.xla_flops:.3e} FLOPs per chip (a scanned block counted once; Pallas "
            "kernels not counted)",
            "  collectives          " + (", ".join(f"{k} ×{v}" for k, v in self.collectives.items()) or "none"),
        ]
        return "\n".join(rows)


def chip_kind(topology: str) -> str:
    kind = topology.split(":")[0].lower()
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU kind {kind!r} in topology {topology!r}; known: {sorted(CHIPS)}")
    return kind


def topology_devices(topology: str):
    """Device descriptions of a TPU topology such as 'v5p:2x2x1' or 'v6e:4x4' (needs libtpu, no TPU)."""
    from jax.experimental import topologies
    chip_kind(topology)
    # Describing chips attaches to none: let several such processes (tests, compiles side by side) share libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(topology, platform="tpu").devices


def topology_mesh(topology: str, mesh_config: MeshConfig | dict) -> Mesh:
    return create_mesh(mesh_config, topology_devices(topology))


def count_collectives(hlo_text: str) -> dict[str, int]:
    counts = collections.Counter()
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"= [^=]*\b{op}(-start)?\(", hlo_text))
    return {k: v for k, v in counts.items() if v}


def compile_report(fn: Callable, args: tuple, *, topology: str, mesh: Mesh, in_shardings, out_shardings,
                   donate_argnums=()) -> AOTReport:
    """Lower and compile `fn(*args)` (args are ShapeDtypeStructs) for the mesh's devices; report what it needs."""
    kind = chip_kind(topology)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                          donate_argnums=donate_argnums).lower(*args)
        compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hbm, peak = CHIPS[kind]
    return AOTReport(
        topology=topology, mesh_shape=dict(mesh.shape), argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, hbm_bytes=hbm, xla_flops=float(cost.get("flops", 0.0)),
        peak_flops=peak, collectives=count_collectives(compiled.as_text()),
        compile_seconds=seconds)


def compile_train_step(config, topology: str, *, frames: int, height: int, width: int,
                       batch: int | None = None) -> tuple[AOTReport, dict[str, float]]:
    """AOT-compile the full flow-matching train step (forward, backward, AdamW update, EMA) of `config` for a TPU
    topology at a video size in pixels (frames 4k+1). `batch` defaults to one sample per data-parallel group
    (data × fsdp). Returns the report and the model's FLOPs per step (matmul / attention / total, fwd+bwd)."""
    import numpy as np

    from hyvideo_jax import train
    from hyvideo_jax.models.dit import DiTConfig

    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.source = "random"   # only shapes are compiled: no records are read, wherever they live
    mesh = topology_mesh(topology, config.mesh)
    cfg = DiTConfig.from_config(config.model)
    tcfg = train.TrainConfig.from_config(config.train)
    if (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1, got {frames}")
    if height % (8 * cfg.patch_size) or width % (8 * cfg.patch_size):
        raise ValueError(f"height and width must be multiples of {8 * cfg.patch_size}, got {height}x{width}")
    sizes = dict(mesh.shape)
    batch = batch or sizes["data"] * sizes["fsdp"]
    task = train.OBJECTIVES[tcfg.objective](config)
    tx = train.make_optimizer(tcfg)
    abstract_state, shardings = train.state_shardings(task, tx, tcfg, mesh)
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8, cfg.in_channels)
    text_len = int(config.data.text_len)
    data_dtype = lambda name: np.dtype(jax.numpy.dtype(config.data.get(name, "bfloat16")))
    spec = jax.ShapeDtypeStruct
    batch_spec = {
        "latents": spec((batch, *latent), data_dtype("latent_dtype")),
        "text_states": spec((batch, text_len, cfg.text_states_dim), data_dtype("text_dtype")),
        "text_mask": spec((batch, text_len), np.int32),
        "pooled_text": spec((batch, cfg.pooled_text_dim), data_dtype("text_dtype")),
        "valid": spec((batch,), np.bool_),
    }
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    image_tokens = latent[0] // cfg.patch_size_t * (latent[1] // cfg.patch_size) * (latent[2] // cfg.patch_size)
    matmul, attn = dit_forward_flops(cfg, image_tokens, text_len, batch)
    step = train.make_train_step(task, tx, tcfg)

    def ruled_step(state, b, r):
        with nn_rules():
            return step(state, b, r)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    report = compile_report(ruled_step, (abstract_state, batch_spec, rng), topology=topology, mesh=mesh,
                            in_shardings=(shardings, train.batch_sharding(mesh), replicated),
                            out_shardings=(shardings, replicated), donate_argnums=(0,))
    flops = {"matmul": 3.0 * matmul, "attention": 3.0 * attn, "total": 3.0 * (matmul + attn),
             "image_tokens": float(image_tokens), "batch": float(batch)}
    return report, flops


def nn_rules():
    import flax.linen as nn

    from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
    return nn.logical_axis_rules(LOGICAL_AXIS_RULES)


def main(argv):
    del argv
    from absl import flags
    config = flags.FLAGS.config
    report, flops = compile_train_step(config, flags.FLAGS.topology, frames=flags.FLAGS.frames,
                                       height=flags.FLAGS.height, width=flags.FLAGS.width, batch=flags.FLAGS.batch)
    n_chips = math.prod(report.mesh_shape.values())
    print(report.table())
    seconds = flops["total"] / (report.peak_flops * n_chips)
    print(f"  model FLOPs / step   {flops['total']:.3e} (fwd+bwd: matmuls {flops['matmul']:.3e}, attention "
          f"{flops['attention']:.3e}) for {int(flops['batch'])} × {int(flops['image_tokens'])} image tokens")
    print(f"  step time at MFU     100%: {seconds:.1f} s, 50%: {2 * seconds:.1f} s, 40%: {2.5 * seconds:.1f} s")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/hunyuan_video_13b.py",
                                    lock_config=True)
    flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:8x8x4 or v6e:16x16")
    flags.DEFINE_integer("frames", 129, "video frames (4k+1)")
    flags.DEFINE_integer("height", 720, "video height in pixels")
    flags.DEFINE_integer("width", 1280, "video width in pixels")
    flags.DEFINE_integer("batch", None, "global batch (default: data × fsdp, one sample per data-parallel group)")
    flags.mark_flags_as_required(["config"])
    app.run(main)
