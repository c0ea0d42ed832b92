"""Ahead-of-time compilation for a TPU topology on a machine without TPUs, and what the compiled program needs.

    python -m hyvideo_jax.aot --config=configs/hunyuan_video_13b.py --topology=v5p:8x8x4 \
        --config.mesh.ici="(1,64,4,1)" --frames=129 --height=720 --width=1280

compiles the full train step (forward, backward, AdamW update, EMA) for the topology (libtpu from the `tpu` extra
describes the chips; nothing runs) and prints per-chip argument / temporary / output memory against the chip's
HBM, the collectives in the optimized HLO, the model's FLOPs per step (counted from the config: XLA's cost analysis
sees a scanned block once and nothing inside Pallas kernels) and the step time that FLOPs imply at a given MFU.
With `--mode=sample` it compiles one denoising step (parameters stored in the compute dtype, no remat; add
`--true_cfg` for the doubled batch of true classifier-free guidance) and one VAE decode tile instead, and prints
the 50-step time those FLOPs imply next to published GPU times, and the VAE's FLOPs per tile and tiles per video.
"""

import collections
import copy
import dataclasses
import math
import os
import re
import sys
import time
from typing import Callable

import jax
from jax.sharding import Mesh

from hyvideo_jax.models.dit import forward_flops as dit_forward_flops
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from hyvideo_jax.parallel.sharding import batch_sharding

# Per chip: HBM bytes and dense bf16 peak FLOP/s (public figures).
CHIPS = {
    "v4": (32 * 2**30, 275e12),
    "v5e": (16 * 2**30, 197e12),
    "v5p": (95 * 2**30, 459e12),
    "v6e": (32 * 2**30, 918e12),
}
# Sampling: the published 50-step times of one 720×1280×129 video (the official code; on 8 GPUs with xDiT), and
# the MFUs at which the report estimates ours.
SAMPLE_STEPS = 50
SAMPLE_ANCHORS = {"1× H100": 1904, "8× H100 (xDiT)": 337.6}
SAMPLE_MFUS = (0.4, 0.6)
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
    kernel_relayouts: int = 0

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
            f"  kernel relayouts     {self.kernel_relayouts} (standalone transposes / copies feeding Pallas kernels)",
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


def kernel_relayouts(hlo_text: str) -> int:
    """How many operands of the Pallas (Mosaic) kernels in an optimized TPU HLO are a standalone transpose or copy,
    i.e. a relayout in memory of its own: 0 when XLA fuses the [B, L, H, D] ↔ [B, H, L, D] transposes around the
    attention kernels into the fusions that produce their inputs (norm, RoPE, padding)."""
    opcode = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?\s([\w\-]+)\(", line)
        if m:
            opcode[m.group(1)] = m.group(2)
    count = 0
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            operands = re.search(r"custom-call\(([^)]*)\)", line).group(1)
            count += sum(opcode.get(name) in ("transpose", "copy") for name in re.findall(r"%([\w.\-]+)", operands))
    return count


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
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hbm, peak = CHIPS[kind]
    return AOTReport(
        topology=topology, mesh_shape=dict(mesh.shape), argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, hbm_bytes=hbm, xla_flops=float(cost.get("flops", 0.0)),
        peak_flops=peak, collectives=count_collectives(hlo), compile_seconds=seconds,
        kernel_relayouts=kernel_relayouts(hlo))


def _dot_flops(eqn) -> float:
    (contract, _), _ = eqn.params["dimension_numbers"]   # ((lhs, rhs) contracting, (lhs, rhs) batch)
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)


def traced_program(fn: Callable, args: tuple) -> dict[str, float]:
    """What the program handed to the compiler computes, from its jaxpr after dead-code elimination (the form in
    which rematerialization shows: a recomputed block appears again in the backward): `matmul`, the FLOPs of every
    dot_general outside `shard_map` bodies (global shapes; scanned bodies × their length), and `attention_forward`
    / `attention_backward`, how many times a splash forward / backward kernel is called (scanned × length)."""
    from jax._src.interpreters import partial_eval as pe
    from jax.extend.core import ClosedJaxpr, Jaxpr
    closed = jax.make_jaxpr(fn)(*args)
    live, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    totals = collections.Counter()

    def walk(jaxpr, times: float, local: bool):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general" and not local:
                totals["matmul"] += times * _dot_flops(eqn)
            elif name == "pallas_call":
                kernel = str(eqn.params.get("name_and_src_info", eqn.params.get("name")))
                if kernel.startswith("splash_mha_fwd"):
                    totals["attention_forward"] += times
                elif kernel.startswith("splash_mha_dkv"):
                    totals["attention_backward"] += times
            inner = times * (eqn.params["length"] if name == "scan" else 1)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                        walk(getattr(sub, "jaxpr", sub), inner, local or name == "shard_map")
    walk(live, 1.0, False)
    return {k: float(totals[k]) for k in ("matmul", "attention_forward", "attention_backward")}


def recompute_overhead(program: dict[str, float], flops: dict[str, float]) -> dict[str, float]:
    """The traced program's FLOPs against the model's (fwd+bwd = 3 × forward, nothing recomputed): matmuls as
    counted, attention as the model's forward attention FLOPs × (forward kernel calls per backward call + 2, the
    backward kernel's share). Splash backends only (other backends' attention is counted in the matmuls)."""
    forward_attention = flops["attention"] / 3.0
    per_backward = program["attention_forward"] / max(program["attention_backward"], 1.0)
    attention = forward_attention * (per_backward + 2.0) if program["attention_backward"] else 0.0
    return {"program": program["matmul"] + attention, "matmul_ratio": program["matmul"] / flops["matmul"],
            "attention_runs": per_backward, "ratio": (program["matmul"] + attention) / flops["total"]}


def _aot_config(config, **model):
    """A copy of `config` for shape-only compiles: random data (no records are read, wherever they live) and
    `model` fields overridden."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.source = "random"
        config.model.update(model)
    return config


def latent_size(frames: int, height: int, width: int, multiple: int = 8) -> tuple[int, int, int]:
    """Latent frames, rows and columns of a video in pixels (the VAE: ×4 in time, ×8 in space); a sentence when
    frames are not 4k+1 or height and width not positive multiples of `multiple`."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1, got {frames}")
    if min(height, width) < multiple or height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def video_latent(cfg, mesh: Mesh, frames: int, height: int, width: int) -> tuple[tuple[int, int, int, int], int]:
    """Latents [T, H, W, C] and image tokens of a video in pixels; a sentence when the VAE, the patch size or the
    mesh's sequence axis cannot take it."""
    latent = (*latent_size(frames, height, width, 8 * cfg.patch_size), cfg.in_channels)
    tokens = latent[0] // cfg.patch_size_t * (latent[1] // cfg.patch_size) * (latent[2] // cfg.patch_size)
    if tokens % mesh.shape["sequence"]:
        raise ValueError(f"{tokens} image tokens do not split over the mesh's sequence axis of size "
                         f"{mesh.shape['sequence']}")
    return latent, tokens


def _data_dtype(config, name: str):
    return jax.numpy.dtype(config.data.get(name, "bfloat16"))


def _text_specs(config, cfg, batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """(text_states [B, L, D], text_mask [B, L], pooled_text [B, Dp]) as the data section stores them."""
    spec, dtype, length = jax.ShapeDtypeStruct, _data_dtype(config, "text_dtype"), int(config.data.text_len)
    return (spec((batch, length, cfg.text_states_dim), dtype), spec((batch, length), jax.numpy.int32),
            spec((batch, cfg.pooled_text_dim), dtype))


def compile_train_step(config, topology: str, *, frames: int, height: int, width: int,
                       batch: int | None = None) -> tuple[AOTReport, dict[str, float]]:
    """AOT-compile the full flow-matching train step (forward, backward, AdamW update, EMA) of `config` for a TPU
    topology at a video size in pixels (frames 4k+1). `batch` defaults to one sample per data-parallel group
    (data × fsdp). Returns the report and the model's FLOPs per step (matmul / attention / total, fwd+bwd)."""
    from hyvideo_jax import train
    from hyvideo_jax.models.dit import DiTConfig

    config = _aot_config(config)
    mesh = topology_mesh(topology, config.mesh)
    cfg = DiTConfig.from_config(config.model)
    tcfg = train.TrainConfig.from_config(config.train)
    latent, image_tokens = video_latent(cfg, mesh, frames, height, width)
    batch = batch or mesh.shape["data"] * mesh.shape["fsdp"]
    task = train.OBJECTIVES[tcfg.objective](config)
    tx = train.make_optimizer(tcfg)
    abstract_state, shardings = train.state_shardings(task, tx, tcfg, mesh)
    text_len = int(config.data.text_len)
    spec = jax.ShapeDtypeStruct
    batch_spec = dict(zip(("text_states", "text_mask", "pooled_text"), _text_specs(config, cfg, batch)),
                      latents=spec((batch, *latent), _data_dtype(config, "latent_dtype")),
                      valid=spec((batch,), jax.numpy.bool_))
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    matmul, attn = dit_forward_flops(cfg, image_tokens, text_len, batch)
    step = train.make_train_step(task, tx, tcfg)

    def ruled_step(state, b, r):
        with nn_rules():
            return step(state, b, r)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    report = compile_report(ruled_step, (abstract_state, batch_spec, rng), topology=topology, mesh=mesh,
                            in_shardings=(shardings, batch_sharding(mesh), replicated),
                            out_shardings=(shardings, replicated), donate_argnums=(0,))
    flops = {"matmul": 3.0 * matmul, "attention": 3.0 * attn, "total": 3.0 * (matmul + attn),
             "image_tokens": float(image_tokens), "batch": float(batch)}
    with jax.set_mesh(mesh):
        program = traced_program(ruled_step, (abstract_state, batch_spec, rng))
    flops.update({f"program_{k}": v for k, v in recompute_overhead(program, flops).items()})
    return report, flops


def compile_sample_step(config, topology: str, *, frames: int, height: int, width: int, batch: int | None = None,
                        true_cfg: bool = False) -> tuple[AOTReport, dict[str, float]]:
    """AOT-compile one denoising step (`denoise.denoise_step`: a DiT forward and the Euler update; with `true_cfg`
    the prompts and the negative prompts run as one batch of 2 × batch) of `config` for a TPU topology at a video
    size in pixels. Parameters in the compute dtype (model.dtype), placed by the rules table (FSDP); no remat;
    latents and text split over the batch axes. `batch` (videos) defaults to one model row per data-parallel group
    (data × fsdp); the rows must fill those groups, else chips would repeat each other's work. Returns the report
    and the model's FLOPs per step (forward only: matmul / attention / total)."""
    import flax.linen as nn

    from hyvideo_jax import denoise, objectives
    from hyvideo_jax.models.dit import DiTConfig
    from hyvideo_jax.parallel.sharding import abstract_params, param_shardings

    # Inference keeps no activations for a backward pass, and its parameters in the compute dtype (the released
    # weights are bf16; training keeps fp32 masters).
    config = _aot_config(config, remat_policy="none", param_dtype=config.model.dtype)
    mesh = topology_mesh(topology, config.mesh)
    cfg = DiTConfig.from_config(config.model)
    latent, image_tokens = video_latent(cfg, mesh, frames, height, width)
    groups, per_video = mesh.shape["data"] * mesh.shape["fsdp"], 2 if true_cfg else 1
    batch = batch or max(1, groups // per_video)
    if batch < 1 or batch * per_video % groups:
        raise ValueError(f"{batch} videos give {batch * per_video} model rows{' (true CFG doubles them)' * true_cfg}, "
                         f"which do not fill the {groups} data-parallel groups (data × fsdp) of the mesh; give a "
                         f"batch whose rows divide by {groups}")
    task = objectives.flow_task(config)
    boxed = abstract_params(task.model, *task.example_inputs(mesh))
    params = nn.unbox(boxed)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = batch_sharding(mesh) if batch % groups == 0 else replicated   # 1 video, CFG pair over 2 groups
    spec, f32, text = jax.ShapeDtypeStruct, jax.numpy.float32, _text_specs(config, cfg, batch)
    args = dict(params=params, latents=spec((batch, *latent), f32), sigma=spec((), f32), sigma_next=spec((), f32),
                cond=text, negative=text if true_cfg else None,
                guidance=spec((batch,), f32) if cfg.guidance_embed else None, true_cfg_scale=spec((), f32))
    shardings = dict(params=param_shardings(boxed, mesh), latents=rows, sigma=replicated, sigma_next=replicated,
                     cond=rows, negative=rows, guidance=rows, true_cfg_scale=replicated)
    names = [k for k, v in args.items() if v is not None]

    def step(*a):
        with nn_rules():
            return denoise.denoise_step(task.model, **dict(zip(names, a)))
    report = compile_report(step, tuple(args[k] for k in names), topology=topology, mesh=mesh,
                            in_shardings=tuple(shardings[k] for k in names), out_shardings=rows,
                            donate_argnums=(names.index("latents"),))
    matmul, attn = dit_forward_flops(cfg, image_tokens, int(config.data.text_len), batch * per_video)
    flops = {"matmul": matmul, "attention": attn, "total": matmul + attn, "image_tokens": float(image_tokens),
             "batch": float(batch), "rows": float(batch * per_video)}
    return report, flops


# A tile is one sample, so only its image rows can be split: 'height' → 'sequence' over every chip of the topology.
VAE_MESH = (1, 1, -1, 1)


def compile_vae_decode_tile(config, topology: str, *, frames: int, height: int, width: int,
                            ici: tuple[int, ...] = VAE_MESH) -> tuple[AOTReport, dict[str, float]]:
    """AOT-compile the VAE decode (`decode_unscaled`, the config's VAE dtypes) of ONE tile of the config's tile
    preset for a TPU topology: the largest tile that a frames × height × width video is cut into (the whole video
    when it fits one), batch 1, its rows split over the `ici` mesh's 'sequence' axis, parameters replicated.
    Returns the report and {tile_flops (the whole tile, XLA's count of the unpartitioned program; the mid-block
    attention's block loop is counted once), tiles (per video), tile_frames / tile_height / tile_width (pixels)}."""
    import flax.linen as nn

    from hyvideo_jax.models.vae import VIDEO_AXES, HunyuanVideoVAE, VAEConfig
    from hyvideo_jax.models.vae_tiling import plan_tiles
    from hyvideo_jax.parallel.sharding import abstract_params, logical_sharding, param_shardings

    vcfg = VAEConfig.from_config(config.vae.model)
    rt, rs = vcfg.temporal_compression_ratio, vcfg.spatial_compression_ratio
    mesh = topology_mesh(topology, MeshConfig(ici=ici))
    latent = (1, *latent_size(frames, height, width, rs), vcfg.latent_channels)
    plans = plan_tiles(latent, vcfg.tile_params(), "decode", rs, rt)
    tile = latent if plans is None else (1, *(int(p.in_len.max()) for p in plans), vcfg.latent_channels)
    if tile[2] % mesh.shape["sequence"]:
        raise ValueError(f"a VAE tile's {tile[2]} latent rows do not split over the sequence axis of size "
                         f"{mesh.shape['sequence']} (mesh {ici})")
    model = HunyuanVideoVAE(vcfg)
    boxed = abstract_params(model, jax.numpy.zeros((1, 1, rs, rs, vcfg.in_channels)))
    params = nn.unbox(boxed)
    z = jax.ShapeDtypeStruct(tile, jax.numpy.float32)

    def decode(p, x):
        with nn_rules():
            return model.apply({"params": p}, x, method=HunyuanVideoVAE.decode_unscaled)
    rows = logical_sharding(mesh, VIDEO_AXES)
    report = compile_report(decode, (params, z), topology=topology, mesh=mesh,
                            in_shardings=(param_shardings(boxed, mesh), rows), out_shardings=rows)
    cost = jax.jit(decode).lower(params, z).cost_analysis()   # the whole tile, before partitioning
    return report, {"tile_flops": float(cost["flops"]), "tiles": float(math.prod(p.size for p in plans or ())),
                    "tile_frames": float(rt * (tile[1] - 1) + 1), "tile_height": float(rs * tile[2]),
                    "tile_width": float(rs * tile[3])}


def nn_rules():
    import flax.linen as nn

    from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
    return nn.logical_axis_rules(LOGICAL_AXIS_RULES)


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    video = dict(frames=f.frames, height=f.height, width=f.width, batch=f.batch)
    try:
        if f.true_cfg and f.mode != "sample":
            raise ValueError("--true_cfg doubles the batch of a denoising step: it needs --mode=sample")
        if f.batch is not None and f.batch < 1:
            raise ValueError(f"--batch must be a positive number of samples, got {f.batch}")
        if f.mode == "train":
            report, flops = compile_train_step(f.config, f.topology, **video)
        else:
            report, flops = compile_sample_step(f.config, f.topology, true_cfg=f.true_cfg, **video)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_chips = math.prod(report.mesh_shape.values())
    seconds = flops["total"] / (report.peak_flops * n_chips)
    print(report.table())
    if f.mode == "train":
        print(f"  model FLOPs / step   {flops['total']:.3e} (fwd+bwd: matmuls {flops['matmul']:.3e}, attention "
              f"{flops['attention']:.3e}) for {int(flops['batch'])} × {int(flops['image_tokens'])} image tokens")
        print(f"  step time at MFU     100%: {seconds:.1f} s, 50%: {2 * seconds:.1f} s, 40%: {2.5 * seconds:.1f} s")
        if flops["program_attention_runs"]:
            print(f"  program FLOPs / step {flops['program_program']:.3e} = {flops['program_ratio']:.3f} × the "
                  "model's "
                  f"(remat '{f.config.model.remat_policy}': matmuls ×{flops['program_matmul_ratio']:.3f}, attention "
                  f"forward run {flops['program_attention_runs']:.0f}× per backward)")
        return
    videos, steps = int(flops["batch"]), SAMPLE_STEPS
    print(f"  model FLOPs / step   {flops['total']:.3e} (forward: matmuls {flops['matmul']:.3e}, attention "
          f"{flops['attention']:.3e}) for {int(flops['rows'])} × {int(flops['image_tokens'])} image tokens"
          + (" (true CFG: 2 rows per video)" if f.true_cfg else ""))
    print(f"  {f'{steps} steps at MFU':<21}" + ", ".join(
        f"{100 * mfu:.0f}%: {steps * seconds / mfu:.0f} s ({steps * seconds / mfu / videos:.0f} s per video)"
        for mfu in SAMPLE_MFUS) + f" for a batch of {videos} video(s)")
    print("  published anchors    " + ", ".join(f"{s:,} s on {where}" for where, s in SAMPLE_ANCHORS.items())
          + " (one 720×1280×129 video, 50 steps)")
    vae_report, vae = compile_vae_decode_tile(f.config, f.topology, frames=f.frames, height=f.height, width=f.width)
    print(f"VAE decode of one tile ({int(vae['tile_frames'])}×{int(vae['tile_height'])}×{int(vae['tile_width'])} "
          f"pixels), batch 1, rows over all chips, parameters replicated")
    print(vae_report.table())
    print(f"  XLA FLOPs / tile     {vae['tile_flops']:.3e}; {int(vae['tiles'])} tiles per video: "
          f"{vae['tiles'] * vae['tile_flops']:.3e} FLOPs")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/hunyuan_video_13b.py",
                                    lock_config=True)
    flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:8x8x4 or v6e:16x16")
    flags.DEFINE_integer("frames", 129, "video frames (4k+1)")
    flags.DEFINE_integer("height", 720, "video height in pixels")
    flags.DEFINE_integer("width", 1280, "video width in pixels")
    flags.DEFINE_enum("mode", "train", ("train", "sample"), "compile the train step, or one denoising step and one "
                      "VAE decode tile")
    flags.DEFINE_integer("batch", None, "global batch (default: data × fsdp, one sample per data-parallel group; "
                         "sample: videos, halved with --true_cfg)")
    flags.DEFINE_bool("true_cfg", False, "sample: true classifier-free guidance, prompts and negative prompts as one "
                      "batch of 2 × batch")
    flags.mark_flags_as_required(["config"])
    app.run(main)
