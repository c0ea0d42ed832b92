"""Check and AOT-compile every named-slice preset (configs/*.py with a `slice` section) for its TPU topology: the
per-chip memory of its train step at the video size it was measured at, against the chip's HBM. Run by hand (each
13B compile takes minutes on a CPU; no TPU is needed, libtpu describes the topology):

    python -m launch.aot_presets                      # every preset
    python -m launch.aot_presets v5p_8_lora           # some
    python -m launch.aot_presets --check              # the static checks only (seconds)
"""

import argparse
import glob
import importlib
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def presets() -> dict[str, object]:
    """{name: config} of every configs/*.py whose config has a `slice` section."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    found = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name.startswith("_") or name == "slices":
            continue
        config = importlib.import_module(f"configs.{name}").get_config()
        if "slice" in config:
            found[name] = config
    return found


def problems(config) -> list[str]:
    """What keeps a preset from running as its `slice` section says (empty: consistent)."""
    from hyvideo_jax import aot
    from hyvideo_jax.models.dit import DiTConfig
    from hyvideo_jax.parallel.mesh import MeshConfig
    found = []
    s, cfg = config.slice, DiTConfig.from_config(config.model)
    chips = math.prod(int(d) for d in s.topology.split(":")[1].split("x"))
    mesh = MeshConfig.from_config(config.mesh)
    try:
        (data, fsdp, sequence, tensor), dcn = mesh.resolve(chips)
    except ValueError as e:
        return [f"mesh: {e}"]
    rows = data * fsdp * dcn[0] * dcn[1]
    if config.data.global_batch_size % rows:
        found.append(f"data.global_batch_size {config.data.global_batch_size} does not fill the {rows} "
                     f"data-parallel groups")
    if cfg.num_heads % (sequence * tensor):
        found.append(f"{cfg.num_heads} heads do not split over sequence {sequence} × tensor {tensor}")
    try:
        latent = aot.latent_size(s.frames, s.height, s.width, 8 * cfg.patch_size)
    except ValueError as e:
        return found + [f"slice video: {e}"]
    tokens = latent[0] // cfg.patch_size_t * (latent[1] // cfg.patch_size) * (latent[2] // cfg.patch_size)
    if tokens % sequence:
        found.append(f"{tokens} image tokens do not split over the sequence axis of {sequence}")
    family = {"v5p": "v5p", "v6e": "v6e", "v4": "v4", "v5e": "v5litepod"}[aot.chip_kind(s.topology)]
    per_chip = 2 if family in ("v5p", "v4") else 1   # v4 / v5p accelerator types count TensorCores
    if s.accelerator_type != f"{family}-{chips * per_chip}":
        found.append(f"accelerator_type {s.accelerator_type} is not the {chips}-chip slice "
                     f"{family}-{chips * per_chip} of topology {s.topology}")
    if not config.train.initialize_distributed and chips > 8:
        found.append("train.initialize_distributed must be True on a multi-host slice")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="presets to compile (default: all)")
    parser.add_argument("--check", action="store_true", help="only the static checks")
    args = parser.parse_args(argv)
    found = presets()
    unknown = sorted(set(args.names) - set(found))
    if unknown:
        print(f"error: no preset {', '.join(unknown)}; presets: {', '.join(found)}", file=sys.stderr)
        return 2
    chosen = {n: c for n, c in found.items() if not args.names or n in args.names}
    bad = {n: problems(c) for n, c in chosen.items()}
    for name, issues in bad.items():
        print(f"{name}: " + ("; ".join(issues) if issues else "consistent"))
    if any(bad.values()) or args.check:
        return 1 if any(bad.values()) else 0
    from hyvideo_jax import aot
    rows = []
    for name, config in chosen.items():
        s = config.slice
        report, _ = aot.compile_train_step(config, s.topology, frames=s.frames, height=s.height, width=s.width)
        gib = lambda b: f"{b / 2**30:.2f}"   # noqa: E731
        fits = report.total_bytes <= report.hbm_bytes
        rows.append(f"| {name} | {s.accelerator_type} ({s.topology}) | {tuple(report.mesh_shape.values())} | "
                    f"{s.height}×{s.width}×{s.frames} | {gib(report.argument_bytes)} / {gib(report.temp_bytes)} / "
                    f"{gib(report.total_bytes)} GiB | {gib(report.hbm_bytes)} GiB | {'yes' if fits else 'no'} | "
                    f"{report.compile_seconds:.0f} s |")
        print(rows[-1], flush=True)
    print("| preset | slice | mesh | video | per chip: args / temp / total | HBM | fits | compile |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
