"""Import of transformers-layout CLIP vision and LLaVA image weights into the Flax modules of `models/vision.py`.

    clip_cfg, clip_params = load_clip_vision("clip-vit-large-patch14-336")
    llava_cfg, llava_params = load_llava_vision("llava-llama-3-8b-v1_1-transformers", mesh=mesh)

Sources are those of `convert.text_encoders` (a folder, a safetensors / .pt file, a state dict or a `TensorSource`),
streamed one tensor at a time, encoder layers stacked on the leading 'layers' axis of the scanned blocks.
Accepted layouts:
* `load_clip_vision`: `CLIPVisionModel` as transformers 5 names it (`embeddings.`, `encoder.`, ...), the older
  `vision_model.` prefix, and a full `CLIPModel` (the text tower and projections are ignored).
* `load_llava_vision`: `LlavaForConditionalGeneration` with the vision tower under `vision_tower.vision_model.`
  (older checkpoints), `vision_tower.` (transformers 5 files) or `model.vision_tower.` (its in-memory state dict),
  and the projector under `multi_modal_projector.` or `model.multi_modal_projector.`; the language model is
  ignored (`load_llama` reads it from the same source).
Weights the selected features do not use (the layers after the last `vision_feature_layer`, `post_layernorm`) are
never read. Unknown and missing names are errors that list them; shape mismatches give both shapes.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.convert.text_encoders import _Entry, _identity, _import, _source_and_config, clip_layer_entries
from hyvideo_jax.models.vision import CLIPVisionConfig, CLIPVisionTower, LlavaImageEncoder, LlavaVisionConfig
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES

_TOWER_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                   "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_LANGUAGE_PREFIXES = ("model.language_model.", "language_model.", "lm_head.")


def _conv_to_patch(w):
    """torch Conv2d weight [D, C, p, p] → kernel [p (row), p (column), C, D] of the patch Dense."""
    return w.transpose(2, 3, 1, 0)


def _tower_entries(cfg: CLIPVisionConfig, num_layers: int, post_layernorm: bool) -> list[_Entry]:
    d, p = cfg.hidden_size, cfg.patch_size
    entries = [
        _Entry(("class_embedding",), "embeddings.class_embedding", (d,), _identity),
        _Entry(("patch_embedding", "kernel"), "embeddings.patch_embedding.weight", (d, cfg.num_channels, p, p),
               _conv_to_patch),
        _Entry(("position_embedding",), "embeddings.position_embedding.weight", (cfg.num_patches + 1, d),
               _identity),
        _Entry(("pre_layrnorm", "scale"), "pre_layrnorm.weight", (d,), _identity),
        _Entry(("pre_layrnorm", "bias"), "pre_layrnorm.bias", (d,), _identity),
    ]
    if post_layernorm:
        entries += [_Entry(("post_layernorm", "scale"), "post_layernorm.weight", (d,), _identity),
                    _Entry(("post_layernorm", "bias"), "post_layernorm.bias", (d,), _identity)]
    if not num_layers:
        return entries
    return entries + clip_layer_entries(cfg, num_layers)


def _tower_unused(name: str, cfg: CLIPVisionConfig, num_layers: int) -> bool:
    """Known tower weights the requested outputs do not use (later layers, post_layernorm) and position ids."""
    if name == "embeddings.position_ids":
        return True
    if name.startswith("encoder.layers."):
        index = name.split(".")[2]
        return index.isdigit() and num_layers <= int(index) < cfg.num_hidden_layers
    return name in ("post_layernorm.weight", "post_layernorm.bias")   # consulted only when not expected


def _projector_entries(cfg: LlavaVisionConfig) -> list[_Entry]:
    n_features = len(cfg.feature_layers)
    d_in, d = cfg.vision.hidden_size * n_features, cfg.text_hidden_size
    entries = [_Entry(("linear_1", "kernel"), "linear_1.weight", (d, d_in), np.transpose),
               _Entry(("linear_2", "kernel"), "linear_2.weight", (d, d), np.transpose)]
    if cfg.multimodal_projector_bias:
        entries += [_Entry(("linear_1", "bias"), "linear_1.bias", (d,), _identity),
                    _Entry(("linear_2", "bias"), "linear_2.bias", (d,), _identity)]
    return entries


def vision_sharding_table(module, mesh: jax.sharding.Mesh,
                          rules=LOGICAL_AXIS_RULES) -> dict[tuple[str, ...], jax.sharding.NamedSharding]:
    """path → NamedSharding of every parameter of a `CLIPVisionTower` / `LlavaImageEncoder` (as `sharding_table`)."""
    from hyvideo_jax.parallel.sharding import abstract_params, param_shardings
    vision = module.config.vision if isinstance(module.config, LlavaVisionConfig) else module.config
    images = jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32)
    shardings = param_shardings(abstract_params(module, images), mesh, rules)
    return {tuple(k.key for k in path): sharding
            for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def _subtable(table, key: str):
    return None if table is None else {path[1:]: s for path, s in table.items() if path[0] == key}


def load_clip_vision(source, config: "CLIPVisionConfig | Mapping[str, Any] | None" = None, *, mesh=None,
                     rules=LOGICAL_AXIS_RULES, **overrides) -> tuple[CLIPVisionConfig, dict]:
    """(config, params) of `CLIPVisionTower` (every layer and `post_layernorm`) from a transformers
    CLIPVisionModel / CLIPModel checkpoint; `overrides` set our own fields (`param_dtype`, `dtype`, ...)."""
    src, config = _source_and_config(source, config, CLIPVisionConfig, "clip_vision")
    if isinstance(config, CLIPVisionConfig):
        cfg = dataclasses.replace(config, **overrides) if overrides else config
    else:
        cfg = CLIPVisionConfig.from_hf(config, **overrides)
    shardings = None if mesh is None else vision_sharding_table(CLIPVisionTower(cfg), mesh, rules)
    n = cfg.num_hidden_layers

    def unused(name):
        return (_tower_unused(name, cfg, n)
                or name.startswith(("text_model.", "visual_projection.", "text_projection."))
                or name == "logit_scale")
    params = _import(src, _tower_entries(cfg, n, post_layernorm=True), ("vision_model.",), unused, "CLIP vision",
                     jnp.dtype(cfg.param_dtype), shardings)
    return cfg, params


def load_llava_vision(source, config: "LlavaVisionConfig | Mapping[str, Any] | None" = None, *, mesh=None,
                      rules=LOGICAL_AXIS_RULES, **overrides) -> tuple[LlavaVisionConfig, dict]:
    """(config, params) of `LlavaImageEncoder` from a transformers LlavaForConditionalGeneration checkpoint.

    `config` is a `LlavaVisionConfig`, or a transformers LlavaConfig dict (default: the folder's config.json);
    `overrides` set our own fields, `vision={...}` those of the tower (e.g. `vision={"param_dtype": "bfloat16"}`).
    """
    src, config = _source_and_config(source, config, LlavaVisionConfig, "llava")
    if isinstance(config, LlavaVisionConfig):
        vision = dict(overrides.pop("vision", {}))
        cfg = dataclasses.replace(config, vision=dataclasses.replace(config.vision, **vision), **overrides)
    else:
        cfg = LlavaVisionConfig.from_hf(config, **overrides)
    table = None if mesh is None else vision_sharding_table(LlavaImageEncoder(cfg), mesh, rules)
    n, dtype = cfg.num_layers_run, jnp.dtype(cfg.vision.param_dtype)

    def tower_unused(name):
        return (_tower_unused(name, cfg.vision, n) or name.startswith(_PROJECTOR_PREFIXES)
                or name.startswith(_LANGUAGE_PREFIXES))
    tower = _import(src, _tower_entries(cfg.vision, n, post_layernorm=False), _TOWER_PREFIXES, tower_unused,
                    "LLaVA vision tower", dtype, _subtable(table, "vision_tower"))

    def projector_unused(name):
        return not name.startswith("linear_")   # every other name was checked with the tower
    projector = _import(src, _projector_entries(cfg), _PROJECTOR_PREFIXES, projector_unused, "LLaVA projector",
                        dtype, _subtable(table, "multi_modal_projector"))
    return cfg, {"vision_tower": tower, "multi_modal_projector": projector}
