"""PyTorch ↔ Flax conversion of the HunyuanVideo transformer.

    config, params = load_torch_dit("mp_rank_00_model_states.pt")       # or a diffusers folder / a state dict
    save_torch_dit(config, params, "out_folder", layout="diffusers")     # or layout="official" → a .pt file

Our parameter tree (see `hyvideo_jax.models.dit`) differs from the PyTorch layouts only by transposes, reshapes,
slices and concatenations, all owned by the `_Group` table below; so every conversion is bit-exact. Block
parameters are stacked on a leading axis (`nn.scan`); the table maps each PyTorch block to one slice of it.
Conversion streams tensor by tensor (memory-mapped `.pt`, per-tensor safetensors), so it needs about one copy
of the weights in RAM. The image-to-video variants have the same tensors (the 33-channel one a wider `img_in`); which
variant a checkpoint is comes with its config (`dit_configs`: diffusers' config.json, our side-car beside an official
file, or a released transformer's name).
"""

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from hyvideo_jax.convert.dit_configs import (config_from_diffusers, config_to_diffusers, dtype_name, infer_config,
                                             released_config)
from hyvideo_jax.convert.dit_layouts import DiffusersAsOfficial, detect_layout, official_to_diffusers
from hyvideo_jax.convert.torch_io import TensorSource, require_torch, to_numpy, to_torch, write_safetensors_folder
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT, example_inputs
from hyvideo_jax.paths import writable_file

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Group:
    """Official tensors ↔ our parameter leaves (one block's slice of them when `layer` is set)."""
    official: tuple[str, ...]
    ours: tuple[Path, ...]
    to_ours: Callable[[list[np.ndarray], list[tuple[int, ...]]], list[np.ndarray]]
    to_official: Callable[[list[np.ndarray]], list[np.ndarray]]
    layer: int | None = None


def _linear(official: str, ours: Path, n_in: int = 1, bias: bool = True, layer=None) -> _Group:
    """torch Linear W [out, in] ↔ our kernel [*in_axes, *out_axes] = Wᵀ reshaped (`n_in` leading input axes)."""
    names = (f"{official}.weight",) + ((f"{official}.bias",) if bias else ())
    paths = (ours + ("kernel",),) + ((ours + ("bias",),) if bias else ())

    def to_ours(arrays, shapes):
        return [arrays[0].T.reshape(shapes[0])] + ([arrays[1].reshape(shapes[1])] if bias else [])

    def to_official(arrays):
        k = arrays[0]
        n_out = math.prod(k.shape[n_in:])
        return [k.reshape(-1, n_out).T] + ([arrays[1].reshape(-1)] if bias else [])
    return _Group(names, paths, to_ours, to_official, layer)


def _same(official: str, ours: Path, layer=None) -> _Group:
    """A tensor that is stored identically (norm scales and biases)."""
    return _Group((official,), (ours,), lambda a, s: [a[0].reshape(s[0])], lambda a: [a[0]], layer)


def _norm(official: str, ours: Path, affine_bias: bool = False, layer=None) -> list[_Group]:
    groups = [_same(f"{official}.weight", ours + ("scale",), layer)]
    if affine_bias:
        groups.append(_same(f"{official}.bias", ours + ("bias",), layer))
    return groups


def _patch_embed() -> _Group:
    """Conv3d weight [D, C, pt, ph, pw] ↔ our kernel [pt, ph, pw, C, D] (channel-last patches)."""
    return _Group(("img_in.proj.weight", "img_in.proj.bias"), (("img_in", "kernel"), ("img_in", "bias")),
                  lambda a, s: [a[0].transpose(2, 3, 4, 1, 0), a[1]],
                  lambda a: [a[0].transpose(4, 3, 0, 1, 2), a[1]])


def _final_linear(cfg: DiTConfig) -> _Group:
    """Linear [C·pt·ph·pw, D] with outputs ordered (c, pt, ph, pw) ↔ our kernel [D, pt, ph, pw, C]."""
    patch = (cfg.out_channels, cfg.patch_size_t, cfg.patch_size, cfg.patch_size)

    def to_ours(a, s):
        return [a[0].T.reshape(-1, *patch).transpose(0, 2, 3, 4, 1), a[1].reshape(patch).transpose(1, 2, 3, 0)]

    def to_official(a):
        return [a[0].transpose(0, 4, 1, 2, 3).reshape(a[0].shape[0], -1).T, a[1].transpose(3, 0, 1, 2).reshape(-1)]
    return _Group(("final_layer.linear.weight", "final_layer.linear.bias"),
                  (("final_layer", "linear", "kernel"), ("final_layer", "linear", "bias")), to_ours, to_official)


def _single_linear1(cfg: DiTConfig, i: int) -> _Group:
    """linear1 [3D+M, D] (q|k|v|mlp) ↔ linear1_qkv [D, 3, H, Dh] + linear1_mlp [D, M] (kernels and biases)."""
    d3 = 3 * cfg.hidden_size
    base = ("single_blocks",)

    def to_ours(a, s):
        w, b = a
        return [w[:d3].T.reshape(s[0]), b[:d3].reshape(s[1]), w[d3:].T, b[d3:]]

    def to_official(a):
        qkv_k, qkv_b, mlp_k, mlp_b = a
        w = np.concatenate([qkv_k.reshape(qkv_k.shape[0], -1).T, mlp_k.T], axis=0)
        return [w, np.concatenate([qkv_b.reshape(-1), mlp_b])]
    return _Group((f"single_blocks.{i}.linear1.weight", f"single_blocks.{i}.linear1.bias"),
                  (base + ("linear1_qkv", "kernel"), base + ("linear1_qkv", "bias"),
                   base + ("linear1_mlp", "kernel"), base + ("linear1_mlp", "bias")), to_ours, to_official, i)


def _single_linear2(cfg: DiTConfig, i: int) -> _Group:
    """linear2 [D, D+M] on [attn, mlp] ↔ linear2_attn [H, Dh, D] (+ the bias) and linear2_mlp [M, D]."""
    d = cfg.hidden_size
    base = ("single_blocks",)

    def to_ours(a, s):
        w, b = a
        return [w[:, :d].T.reshape(s[0]), b, w[:, d:].T]

    def to_official(a):
        attn_k, bias, mlp_k = a
        return [np.concatenate([attn_k.reshape(d, d).T, mlp_k.T], axis=1), bias]
    return _Group((f"single_blocks.{i}.linear2.weight", f"single_blocks.{i}.linear2.bias"),
                  (base + ("linear2_attn", "kernel"), base + ("linear2_attn", "bias"),
                   base + ("linear2_mlp", "kernel")),
                  to_ours, to_official, i)


def _embedder(official_1: str, official_2: str, ours: Path) -> list[_Group]:
    return [_linear(official_1, ours + ("linear_1",)), _linear(official_2, ours + ("linear_2",))]


def conversion_groups(cfg: DiTConfig) -> list[_Group]:
    """The complete official ↔ ours table for a config (one entry per tensor group and block)."""
    g: list[_Group] = [_patch_embed()]
    g += [_linear("txt_in.input_embedder", ("txt_in", "input_embedder"))]
    g += _embedder("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.mlp.2", ("txt_in", "t_embedder"))
    g += _embedder("txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2", ("txt_in", "c_embedder"))
    for i in range(cfg.depth_refiner):
        o, u = f"txt_in.individual_token_refiner.blocks.{i}", ("txt_in", "blocks")
        g += _norm(f"{o}.norm1", u + ("norm1",), affine_bias=True, layer=i)
        g += _norm(f"{o}.norm2", u + ("norm2",), affine_bias=True, layer=i)
        g += [_linear(f"{o}.self_attn_qkv", u + ("self_attn_qkv",), layer=i),
              _linear(f"{o}.self_attn_proj", u + ("self_attn_proj",), n_in=2, layer=i),
              _linear(f"{o}.mlp.fc1", u + ("mlp", "fc1"), layer=i),
              _linear(f"{o}.mlp.fc2", u + ("mlp", "fc2"), layer=i),
              _linear(f"{o}.adaLN_modulation.1", u + ("adaLN_modulation", "linear"), layer=i)]
    g += _embedder("time_in.mlp.0", "time_in.mlp.2", ("time_in",))
    g += _embedder("vector_in.in_layer", "vector_in.out_layer", ("vector_in",))
    if cfg.guidance_embed:
        g += _embedder("guidance_in.mlp.0", "guidance_in.mlp.2", ("guidance_in",))
    for i in range(cfg.depth_double):
        o, u = f"double_blocks.{i}", ("double_blocks",)
        for s in ("img", "txt"):
            g += [_linear(f"{o}.{s}_mod.linear", u + (f"{s}_mod", "linear"), layer=i),
                  _linear(f"{o}.{s}_attn_qkv", u + (f"{s}_attn_qkv",), bias=cfg.qkv_bias, layer=i),
                  _linear(f"{o}.{s}_attn_proj", u + (f"{s}_attn_proj",), n_in=2, layer=i),
                  _linear(f"{o}.{s}_mlp.fc1", u + (f"{s}_mlp", "fc1"), layer=i),
                  _linear(f"{o}.{s}_mlp.fc2", u + (f"{s}_mlp", "fc2"), layer=i)]
            g += _norm(f"{o}.{s}_attn_q_norm", u + (f"{s}_attn_q_norm",), layer=i)
            g += _norm(f"{o}.{s}_attn_k_norm", u + (f"{s}_attn_k_norm",), layer=i)
    for i in range(cfg.depth_single):
        o, u = f"single_blocks.{i}", ("single_blocks",)
        g += [_single_linear1(cfg, i), _single_linear2(cfg, i),
              _linear(f"{o}.modulation.linear", u + ("modulation", "linear"), layer=i)]
        g += _norm(f"{o}.q_norm", u + ("q_norm",), layer=i) + _norm(f"{o}.k_norm", u + ("k_norm",), layer=i)
    g += [_final_linear(cfg), _linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation", "linear"))]
    return g


def param_shapes(cfg: DiTConfig) -> dict:
    """Our parameter tree as ShapeDtypeStructs (no allocation), for a config."""
    import flax.linen as nn
    model = HunyuanVideoDiT(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_inputs(cfg)))
    return nn.unbox(shapes)["params"]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------------------------------
# fp8 checkpoints


class _Fp8Dequantized(Mapping[str, np.ndarray]):
    """An official fp8 checkpoint seen dequantized: W = W_fp8.to(bf16) · scale, per layer (as the original runs it)."""

    def __init__(self, source: TensorSource, scales: Mapping[str, Any]):
        self.source, self.scales = source, scales

    def __getitem__(self, name):
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in self.scales:
            torch = require_torch()
            return to_numpy(to_torch(self.source[name]).to(torch.bfloat16) * self.scales[module])
        return self.source[name]

    def shape(self, name):
        return self.source.shape(name)

    def __iter__(self):
        return iter(self.source)

    def __len__(self):
        return len(self.source)


def _fp8_scales(fp8_map) -> Mapping[str, Any]:
    if isinstance(fp8_map, Mapping):
        return fp8_map
    torch = require_torch()
    return torch.load(os.fspath(fp8_map), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# public API


def open_torch_dit(path_or_state_dict, layout: str | None = None, config: DiTConfig | Mapping | str | None = None,
                   *, fp8_map=None, load_key: str | None = None, dtype: str | None = None
                   ) -> tuple[DiTConfig, Mapping[str, np.ndarray], str]:
    """(config, official-layout view of the tensors, description) of a PyTorch transformer checkpoint, reading only
    names and shapes (tensors are materialized on access, one at a time). Arguments as `load_torch_dit`."""
    source = TensorSource.open(path_or_state_dict, load_key=load_key)
    layout = layout or detect_layout(source)
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    if fp8_map is None and isinstance(path_or_state_dict, (str, os.PathLike)):
        candidate = os.fspath(path_or_state_dict)
        if candidate.endswith("_fp8.pt") and epath.Path(candidate[:-3] + "_map.pt").exists():
            fp8_map = candidate[:-3] + "_map.pt"
    official: Mapping[str, np.ndarray] = source
    if layout == "diffusers":
        official = DiffusersAsOfficial(source)
        if official.unexpected or official.missing:
            raise KeyError(_key_report(f"diffusers checkpoint {source.description}", official.missing,
                                       official.unexpected))
    if fp8_map is not None:
        if layout != "official":
            raise ValueError("fp8 scale maps belong to official-layout checkpoints")
        official = _Fp8Dequantized(source, _fp8_scales(fp8_map))

    sidecar = os.fspath(path_or_state_dict) + ".config.json" if isinstance(path_or_state_dict, (str, os.PathLike)) \
        else None
    if config is None and sidecar and epath.Path(sidecar).exists():  # written by save_torch_dit(layout="official")
        config = DiTConfig.from_config(json.loads(epath.Path(sidecar).read_text()))
    if isinstance(config, str):   # a released transformer: its architecture, the checkpoint's stored dtype
        config = {k: v for k, v in released_config(config).to_dict().items() if k != "param_dtype"}
    overrides = config.to_dict() if isinstance(config, DiTConfig) else dict(config or {})
    if layout == "diffusers" and source.config is not None:
        cfg = config_from_diffusers(source.config, **overrides)
    elif isinstance(config, DiTConfig):
        cfg = config
    else:
        cfg = infer_config(official, **overrides)
    if "param_dtype" not in overrides:  # the checkpoint's own dtype (fp8 runs as bf16, like the original)
        stored = "bfloat16" if fp8_map is not None else dtype_name(official["img_in.proj.weight"].dtype)
        cfg = dataclasses.replace(cfg, param_dtype=dtype or stored)
    return cfg, official, source.description


def load_torch_dit(path_or_state_dict, layout: str | None = None, config: DiTConfig | Mapping | str | None = None,
                   *, fp8_map=None, load_key: str | None = None, dtype: str | None = None,
                   progress: bool = True) -> tuple[DiTConfig, dict]:
    """Load a PyTorch HunyuanVideo transformer as (config, params).

    `path_or_state_dict`: an official `.pt` (weights under "module", or a bare state dict; `load_key` picks another
    sub-dict such as "ema"), a diffusers folder (config.json + safetensors, which supplies the config), a
    `.safetensors` file, or an in-memory state dict. `layout` ("official" | "diffusers") is detected when None.
    fp8 checkpoints: give `fp8_map` (the `*_fp8_map.pt` path or dict); a file named `*_fp8.pt` finds its map beside it.
    `config` overrides or replaces the inferred config: a DiTConfig, a dict of fields, or a released transformer's
    name (`dit_configs.RELEASED`, e.g. "HYVideo-T/2-I2V-16ch": an official token_replace checkpoint has the
    text-to-video tensors and needs it, or `image_condition_type`). `dtype` casts the params (default: keep the
    checkpoint's dtype). Params are NumPy arrays in our tree layout (stacked blocks).
    """
    cfg, official, description = open_torch_dit(path_or_state_dict, layout, config, fp8_map=fp8_map,
                                                load_key=load_key, dtype=dtype)
    return cfg, _official_to_params(official, cfg, description, dtype, progress)


ARCHITECTURE_EXEMPT = ("param_dtype", "dtype", "remat_policy", "attention_backend", "sequence_parallel")


def architecture_differences(ours: DiTConfig, theirs: DiTConfig) -> list[str]:
    """'field (a vs b)' for every field that makes the two configs different models (dtypes and how the model is run
    do not)."""
    return [f"{f.name} ({getattr(ours, f.name)!r} vs {getattr(theirs, f.name)!r})" for f in dataclasses.fields(ours)
            if f.name not in ARCHITECTURE_EXEMPT and getattr(ours, f.name) != getattr(theirs, f.name)]


def load_dit_sharded(source, mesh, *, like: DiTConfig | None = None, strict: bool = False, rules=None,
                     progress: bool = True, **torch_kwargs) -> tuple[DiTConfig, Any]:
    """(config, params placed on `mesh` by the logical-axis rules) from a folder written by `convert to-flax` or any
    PyTorch source `load_torch_dit` reads, without the model ever sitting whole on one device or in host memory:
    Orbax restores straight into the shards, and a PyTorch source is converted tensor by tensor, each finished
    parameter placed on the mesh at once (the host holds one stacked parameter at a time).

    `like`: the run's config. Its dtype, remat policy, attention backend and sequence parallelism replace the
    source's. With `strict`, the source must be the same model (ValueError naming every differing field), the RoPE
    settings official checkpoints do not store are taken from `like`, and parameters are cast to
    `like.param_dtype` (e.g. fp32 masters for training); without, they keep the stored dtype.
    """
    from hyvideo_jax.convert.flax_io import is_flax_model, load_flax_model, read_flax_config
    from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
    from hyvideo_jax.parallel.sharding import param_targets
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    official = None
    if is_flax_model(source):
        cfg, description = DiTConfig.from_config(read_flax_config(source, kind="dit")), f"converted folder {source}"
    else:
        try:
            cfg, official, description = open_torch_dit(source, **torch_kwargs)
        except ValueError as e:   # an official checkpoint does not store the RoPE split of a non-128 head dim
            if not (strict and like is not None and "RoPE" in str(e) and "config" not in torch_kwargs):
                raise
            cfg, official, description = open_torch_dit(source, config=dict(
                rope_axes_dim=like.rope_axes_dim, rope_theta=like.rope_theta), **torch_kwargs)
    if like is not None:
        if strict:
            differences = architecture_differences(cfg, like)
            if differences:
                raise ValueError(f"{description} is another model than config.model: " + ", ".join(
                    d.replace(" vs ", " in the checkpoint vs ") for d in differences))
        run = {f: getattr(like, f) for f in ARCHITECTURE_EXEMPT if strict or f != "param_dtype"}
        cfg = dataclasses.replace(cfg, **run)
    targets, shardings = param_targets(HunyuanVideoDiT(cfg), example_inputs(cfg), mesh, rules)
    if official is None:
        return cfg, load_flax_model(source, kind="dit", target=targets)[1]
    flat = {path: sharding for path, sharding in _flat_items(shardings)}

    def place(path, array):
        return jax.device_put(np.asarray(array, jax.numpy.dtype(cfg.param_dtype)), flat[path])
    return cfg, _official_to_params(official, cfg, description, None, progress, place=place)


def _flat_items(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat_items(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _key_report(what: str, missing, unexpected) -> str:
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)[:20]))
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:20]))
    return "\n".join(lines)


def _official_to_params(official, cfg: DiTConfig, description: str, dtype: str | None, progress: bool,
                        place: Callable[[tuple, np.ndarray], Any] | None = None) -> dict:
    """Our params tree (NumPy) from an official-layout source. `place(path, array)`, when given, receives each
    parameter as soon as it is complete (a stacked one once all its layers are in) and its result replaces it."""
    groups = conversion_groups(cfg)
    expected = {n for grp in groups for n in grp.official}
    present = set(official)
    if expected != present:
        raise KeyError(_key_report(f"checkpoint {description}", expected - present, present - expected))
    shapes = param_shapes(cfg)
    out_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))
    params: dict = {}
    filled: dict[tuple, int] = {}   # layers written so far into each stacked parameter
    for grp in tqdm(groups, desc="converting to Flax", unit="group", disable=not progress):
        arrays = [official[n] for n in grp.official]
        targets = [_get(shapes, p) for p in grp.ours]
        want = [t.shape[1:] if grp.layer is not None else t.shape for t in targets]
        try:
            converted = grp.to_ours(arrays, want)
        except ValueError:
            converted = None
        if converted is None or any(c.shape != tuple(w) for c, w in zip(converted, want)):
            expected_official = grp.to_official([np.zeros(w, np.int8) for w in want])
            raise ValueError("shape mismatch: " + "; ".join(
                f"{n} is {tuple(a.shape)} in the checkpoint, the config expects {tuple(e.shape)}"
                for n, a, e in zip(grp.official, arrays, expected_official) if tuple(a.shape) != tuple(e.shape)))
        for path, target, value in zip(grp.ours, targets, converted):
            value_dtype = out_dtype or value.dtype
            if grp.layer is None:
                value = np.ascontiguousarray(value, dtype=value_dtype)
                _set(params, path, value if place is None else place(tuple(path), value))
                continue
            try:
                stacked = _get(params, path)
            except KeyError:
                stacked = np.empty(target.shape, value_dtype)
                _set(params, path, stacked)
                filled[tuple(path)] = 0
            stacked[grp.layer] = value
            filled[tuple(path)] += 1
            if place is not None and filled[tuple(path)] == target.shape[0]:
                _set(params, path, place(tuple(path), stacked))
    return params


def params_to_official(cfg: DiTConfig, params, progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Our params as (official name, NumPy array) pairs, one tensor at a time."""
    for grp in tqdm(conversion_groups(cfg), desc="converting to PyTorch", unit="group", disable=not progress):
        arrays = []
        for path in grp.ours:
            try:
                leaf = _get(params, path)
            except (KeyError, TypeError):
                raise KeyError(f"params lack {'/'.join(path)} (needed for {grp.official[0]})") from None
            leaf = np.asarray(leaf if grp.layer is None else leaf[grp.layer])
            arrays.append(leaf)
        for name, array in zip(grp.official, grp.to_official(arrays)):
            yield name, np.ascontiguousarray(array)


def save_torch_dit(config: DiTConfig | Mapping, params, path, layout: str = "diffusers", *,
                   max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> str:
    """Write params as a PyTorch checkpoint.

    layout="diffusers": a folder (config.json + sharded safetensors) that
    `HunyuanVideoTransformer3DModel.from_pretrained(path)` loads. layout="official": a `torch.save` file with the
    weights under "module" (like `mp_rank_00_model_states.pt`). Returns the path written.
    """
    cfg = DiTConfig.from_config(config)
    params = params.get("params", params) if isinstance(params, Mapping) else params
    path = os.fspath(path)
    if layout == "diffusers":
        def tensors():
            for name, array in params_to_official(cfg, params, progress):
                yield from official_to_diffusers(name, array, cfg.hidden_size)
        write_safetensors_folder(tensors(), path, config=config_to_diffusers(cfg), max_shard_bytes=max_shard_bytes)
    elif layout == "official":
        torch = require_torch()
        state = {name: to_torch(array) for name, array in params_to_official(cfg, params, progress)}
        with writable_file(path) as local:
            torch.save({"module": state}, local)
            with open(local + ".config.json", "w") as f:  # the official file has no config; keep ours beside it
                json.dump(cfg.to_dict(), f, indent=2)
    else:
        raise ValueError(f"layout must be 'diffusers' or 'official', got {layout!r}")
    return path
