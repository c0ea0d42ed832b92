"""Our side of a conversion: a folder with an Orbax checkpoint of the params and the model config as JSON.

    DIR/config.json     {"kind": "dit", "model": {...DiTConfig fields...}}
    DIR/params/         Orbax StandardCheckpointer tree (our layout; stacked blocks)
"""

import json
import os
from typing import Any

import orbax.checkpoint as ocp


def save_flax_model(folder, kind: str, config: dict[str, Any], params) -> str:
    """Write `params` (NumPy or jax arrays) and `config` under `folder`; `kind` names the model ("dit", "vae")."""
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(folder, "params"), params, force=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"kind": kind, "model": config}, f, indent=2)
    return folder


def is_flax_model(folder) -> bool:
    folder = os.fspath(folder)
    return os.path.isdir(os.path.join(folder, "params")) and os.path.exists(os.path.join(folder, "config.json"))


def read_flax_config(folder, kind: str | None = None) -> dict[str, Any]:
    """The model config dict of a folder written by `save_flax_model` (checking its kind), without the params."""
    folder = os.path.abspath(os.fspath(folder))
    if not is_flax_model(folder):
        raise FileNotFoundError(f"{folder} is not a converted model folder (expected config.json and params/)")
    with open(os.path.join(folder, "config.json")) as f:
        meta = json.load(f)
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{folder} holds a {meta.get('kind')!r} model, expected {kind!r}")
    return meta["model"]


def load_flax_model(folder, kind: str | None = None, target=None) -> tuple[dict[str, Any], Any]:
    """(config dict, params) from a folder written by `save_flax_model`. `target` (a tree of ShapeDtypeStructs
    with shardings) restores directly onto devices; without it the arrays come back as NumPy."""
    config = read_flax_config(folder, kind)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(os.path.abspath(os.fspath(folder)), "params"), target)
    return config, params
