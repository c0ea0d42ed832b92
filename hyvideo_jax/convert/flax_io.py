"""Our side of a conversion: a folder with an Orbax checkpoint of the params and the model config as JSON, and the
parameters of a training workdir.

    DIR/config.json     {"kind": "dit", "model": {...DiTConfig fields...}}
    DIR/params/         Orbax StandardCheckpointer tree (our layout; stacked blocks)

    WORKDIR/config.json               the run's whole config (written by the trainer)
    WORKDIR/checkpoints/<step>/state  the TrainState (params, opt_state, ema_params, ...)
"""

import json
from typing import Any, Mapping

import orbax.checkpoint as ocp

from hyvideo_jax.paths import resolve


def save_flax_model(folder, kind: str, config: dict[str, Any], params) -> str:
    """Write `params` (NumPy or jax arrays) and `config` under `folder`; `kind` names the model ("dit", "vae")."""
    folder = resolve(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / "params", params, force=True)
    (folder / "config.json").write_text(json.dumps({"kind": kind, "model": config}, indent=2))
    return str(folder)


def is_flax_model(folder) -> bool:
    folder = resolve(folder)
    return (folder / "params").is_dir() and (folder / "config.json").exists()


def read_flax_config(folder, kind: str | None = None) -> dict[str, Any]:
    """The model config dict of a folder written by `save_flax_model` (checking its kind), without the params."""
    folder = resolve(folder)
    if not is_flax_model(folder):
        raise FileNotFoundError(f"{folder} is not a converted model folder (expected config.json and params/)")
    meta = json.loads((folder / "config.json").read_text())
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{folder} holds a {meta.get('kind')!r} model, expected {kind!r}")
    return meta["model"]


def load_flax_model(folder, kind: str | None = None, target=None) -> tuple[dict[str, Any], Any]:
    """(config dict, params) from a folder written by `save_flax_model`. `target` (a tree of ShapeDtypeStructs
    with shardings) restores directly onto devices; without it the arrays come back as NumPy."""
    config = read_flax_config(folder, kind)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(resolve(folder) / "params", target)
    return config, params


def is_training_workdir(path) -> bool:
    """True for a folder the trainer writes (it has checkpoints/)."""
    return (resolve(path) / "checkpoints").is_dir()


def training_config(workdir) -> dict[str, Any]:
    """The whole config a training run was started with (WORKDIR/config.json, written by the trainer)."""
    path = resolve(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} has no config.json (runs write it when they start); give the run's "
                                f"config instead")
    return json.loads(path.read_text())


def run_config(workdir):
    """`training_config(workdir)` as the ConfigDict the commands take for `--config`."""
    import ml_collections
    return ml_collections.ConfigDict(training_config(workdir))


def _checkpoints(workdir) -> ocp.CheckpointManager:
    """A read-only manager of WORKDIR/checkpoints (close it after use)."""
    directory = resolve(workdir) / "checkpoints"
    if not directory.exists():
        raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: is it a training workdir?")
    return ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(create=False, read_only=True))


def checkpoint_steps(workdir) -> list[int]:
    """The steps of a training run's finished checkpoints, ascending (a checkpoint still being written is not
    listed); [] before the run wrote its checkpoints/ folder."""
    try:
        manager = _checkpoints(workdir)
    except FileNotFoundError:
        return []
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def training_params(workdir, targets, *, step: int | None = None, use_ema: bool = True, require_ema: bool = False):
    """(params restored onto `targets` (with shardings: onto devices; without: NumPy), description) from a training
    run's Orbax checkpoints of `step` (default: the latest): the EMA parameters when the run kept them (and
    `use_ema`; `require_ema` makes their absence an error), else the parameters; only that part is read."""
    manager = _checkpoints(workdir)
    directory = manager.directory
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"{directory} has no checkpoint of step {step}; it has steps {sorted(steps)}")
        stored = manager.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored) or {}
        has_ema = isinstance(stored.get("ema_params"), Mapping) and bool(stored["ema_params"])
        if require_ema and not has_ema:
            raise ValueError(f"{workdir} step {step} holds no EMA parameters (the run had train.ema_decay 0)")
        key = "ema_params" if use_ema and has_ema else "params"
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={key: targets}, restore_args={key: ocp.checkpoint_utils.construct_restore_args(targets)},
            partial_restore=True)))
    finally:
        manager.close()
    return restored["state"][key], f"{workdir} step {step} ({'EMA' if key == 'ema_params' else 'raw'} parameters)"


