"""Ahead-of-time compilation for a TPU topology on a machine without TPUs, and what the compiled program needs.

    python -m hyvideo_jax.aot --config=configs/hunyuan_video_13b.py --topology=v5p:8x8x4 \
        --config.mesh.ici="(1,64,4,1)" --frames=129 --height=720 --width=1280

compiles the full train step (forward, backward, optimizer update) for the topology (libtpu from the `tpu` extra
describes the chips; nothing runs) and prints per-chip argument / temporary / output memory against the chip's
HBM, FLOPs per step (XLA's count plus the attention FLOPs inside Pallas kernels, which XLA does not see), an MFU
bound at the chip's peak, and the collectives in the optimized HLO.
"""

import collections
import dataclasses
import re
from typing import Callable

import jax
from jax.sharding import Mesh

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
    extra_flops: float
    peak_flops: float
    collectives: dict[str, int]
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        """Per-chip peak: arguments + temporaries + outputs that do not alias (donated) arguments."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def flops(self) -> float:
        return self.xla_flops + self.extra_flops

    def seconds_at_peak(self, n_chips: int) -> float:
        return self.flops / (self.peak_flops * n_chips)

    def table(self) -> str:
        gib = lambda b: f"{b / 2**30:8.2f} GiB"
        n = 1
        for v in self.mesh_shape.values():
            n *= v
        rows = [
            f"topology {self.topology}: {n} chips, mesh {self.mesh_shape}",
            f"  compile time         {self.compile_seconds:8.1f} s",
            f"  arguments / chip     {gib(self.argument_bytes)}",
            f"  temporaries / chip   {gib(self.temp_bytes)}",
            f"  outputs / chip       {gib(self.output_bytes)}  (aliasing donated arguments: {gib(self.alias_bytes)})",
            f"  total / chip         {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM "
            f"({100 * self.total_bytes / self.hbm_bytes:.0f}%, margin {gib(self.hbm_bytes - self.total_bytes)})",
            f"  FLOPs / step         {self.flops:.3e} (XLA {self.xla_flops:.3e} + Pallas attention "
            f"{self.extra_flops:.3e}); {self.seconds_at_peak(n):.2f} s per step at 100% MFU",
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
    return topologies.get_topology_desc(topology, platform="tpu").devices


def topology_mesh(topology: str, mesh_config: MeshConfig | dict) -> Mesh:
    return create_mesh(mesh_config, topology_devices(topology))


def count_collectives(hlo_text: str) -> dict[str, int]:
    counts = collections.Counter()
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"= [^=]*\b{op}(-start)?\(", hlo_text))
    return {k: v for k, v in counts.items() if v}


def compile_report(fn: Callable, args: tuple, *, topology: str, mesh: Mesh, in_shardings, out_shardings,
                   donate_argnums=(), extra_flops: float = 0.0) -> AOTReport:
    """Lower and compile `fn(*args)` (args are ShapeDtypeStructs) for the mesh's devices; report what it needs."""
    import time
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
        extra_flops=extra_flops, peak_flops=peak, collectives=count_collectives(compiled.as_text()),
        compile_seconds=seconds)


def dit_forward_flops(cfg, image_tokens: int, text_tokens: int, batch: int = 1) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one DiT forward, counted from the config (2 FLOPs per multiply-add).

    Attention is 4·N²·D per layer (QKᵀ and PV over the joint sequence); the Pallas kernels that compute it are
    invisible to XLA's cost analysis, and XLA counts a scanned block once, not once per layer, so the model's
    FLOPs come from here. For the 13B model at 720×1280×129 (118,800 + 256 tokens) this gives ≈1.62 PF of
    matmuls and ≈10.45 PF of attention per forward (reference §6).
    """
    d, m = cfg.hidden_size, cfg.mlp_dim
    n = image_tokens + text_tokens
    double = 4 * d * d + 2 * d * m            # per token and stream: qkv, out-proj, MLP
    single = (3 * d + m) * d + (d + m) * d    # linear1, linear2
    refiner = 4 * d * d + 2 * d * int(d * cfg.refiner_mlp_ratio)
    per_sample = (n * cfg.depth_double * double + n * cfg.depth_single * single
                  + text_tokens * (cfg.depth_refiner * refiner + cfg.text_states_dim * d)
                  + image_tokens * (cfg.patch_volume * (cfg.in_channels + cfg.out_channels) * d))
    matmul = 2.0 * per_sample * batch
    attention = 4.0 * n * n * d * (cfg.depth_double + cfg.depth_single) * batch
    return matmul, attention
