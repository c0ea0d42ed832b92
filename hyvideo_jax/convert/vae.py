"""PyTorch ↔ Flax conversion of the causal 3D VAE, both layouts, bit-exact.

The official checkpoint (`vae/pytorch_model.pt` + `vae/config.json` of `AutoencoderKLCausal3D`) and the diffusers
folder (`AutoencoderKLHunyuanVideo`: config.json + safetensors) use identical tensor names (reference §2.6); only
the config differs. Our tree mirrors those names: torch `encoder.down_blocks.1.resnets.0.conv1.conv.weight`
is Flax `encoder/down_blocks_1_resnets_0/conv1/kernel`. Conv kernels are transposed [Cout, Cin, kt, kh, kw] ↔
[kt, kh, kw, Cin, Cout], linear weights [out, in] ↔ [in, out], GroupNorm `weight` ↔ `scale`; dtypes are kept.

    config, params = load_torch_vae("path/to/vae")      # a diffusers folder, an official folder/.pt, or a dict
    save_torch_vae(config, params, "out/vae", layout="diffusers")
"""

import json
import os
import re
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from hyvideo_jax.compilation import run_once_options
from hyvideo_jax.convert.torch_io import TensorSource, require_torch, to_torch, write_safetensors_folder
from hyvideo_jax.models.vae import HunyuanVideoVAE, VAEConfig
from hyvideo_jax.paths import writable_folder

PLAIN_CONVS = ("quant_conv", "post_quant_conv")  # nn.Conv3d in torch; every other conv is a CausalConv3d wrapper
OFFICIAL_WEIGHTS = "pytorch_model.pt"
_DIFFUSERS_BLOCKS = ("HunyuanVideoDownBlock3D", "HunyuanVideoUpBlock3D")
_OFFICIAL_BLOCKS = ("DownEncoderBlockCausal3D", "UpDecoderBlockCausal3D")


def _torch_module_name(flax_name: str) -> str:
    """`down_blocks_1_resnets_0` → `down_blocks.1.resnets.0`; `to_out_0` → `to_out.0`."""
    return re.sub(r"_(\d+)(_|$)", lambda m: "." + m[1] + ("." if m[2] else ""), flax_name)


def torch_names(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> dict[tuple[str, ...], str]:
    """Flax path → torch state-dict name for every parameter (`shapes` as from `param_shapes`)."""
    causal_convs = {path[:-1] for path, shape in shapes.items()
                    if path[-1] == "kernel" and len(shape) == 5 and path[-2] not in PLAIN_CONVS}
    names = {}
    for path in shapes:
        *modules, leaf = path
        parts = [_torch_module_name(m) for m in modules]
        if tuple(modules) in causal_convs:
            parts.append("conv")
        parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
        names[path] = ".".join(parts)
    return names


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 5:
        return np.transpose(array, (4, 3, 0, 1, 2))
    if array.ndim == 2:
        return np.transpose(array)
    return array


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 5:
        return np.transpose(array, (2, 3, 4, 1, 0))
    if array.ndim == 2:
        return np.transpose(array)
    return array


def param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat Flax path → shape of every parameter, without allocating weights."""
    model = HunyuanVideoVAE(config)
    s = config.spatial_compression_ratio
    video = jax.ShapeDtypeStruct((1, 1, s, s, config.in_channels), np.float32)
    boxed = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v), video)["params"]
    flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: hasattr(x, "shape") or hasattr(x, "value"))
    return {path: tuple(getattr(leaf, "value", leaf).shape) for path, leaf in flat.items()}


def config_from_json(config_json: Mapping[str, Any]) -> VAEConfig:
    """A `VAEConfig` from a diffusers or an official `config.json` (the official one also fixes the tile sizes)."""
    c = dict(config_json)
    values = dict(
        in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
        latent_channels=c.get("latent_channels", 16),
        block_out_channels=tuple(c.get("block_out_channels", (128, 256, 512, 512))),
        layers_per_block=c.get("layers_per_block", 2), norm_num_groups=c.get("norm_num_groups", 32),
        act_fn=c.get("act_fn", "silu"), spatial_compression_ratio=c.get("spatial_compression_ratio", 8),
        temporal_compression_ratio=c.get("temporal_compression_ratio", c.get("time_compression_ratio", 4)),
        mid_block_add_attention=c.get("mid_block_add_attention", True),
        scaling_factor=c.get("scaling_factor", 0.476986),
    )
    if "sample_size" in c:  # official: tiles of sample_size px and sample_tsize frames, overlap factor 0.25
        values.update(tiling="official", tile_sample_min_size=c["sample_size"],
                      tile_sample_stride=int(c["sample_size"] * 0.75))
        if "sample_tsize" in c:
            values.update(tile_sample_min_frames=c["sample_tsize"],
                          tile_sample_stride_frames=int(c["sample_tsize"] * 0.75))
    for field, expected in (("down_block_types", _DIFFUSERS_BLOCKS[0]), ("up_block_types", _DIFFUSERS_BLOCKS[1])):
        official = _OFFICIAL_BLOCKS[0] if field == "down_block_types" else _OFFICIAL_BLOCKS[1]
        bad = [t for t in c.get(field, ()) if t not in (expected, official)]
        if bad:
            raise ValueError(f"config.json {field}: unsupported block types {bad}; expected {expected!r} "
                             f"or {official!r}")
    return VAEConfig(**values)


def config_from_state_dict(source: Mapping[str, Any], norm_num_groups: int = 32) -> VAEConfig:
    """Infer the architecture from tensor shapes. GroupNorm groups and conv strides are not stored in the weights:
    the released values (32 groups, 8× spatial, 4× temporal compression) are assumed."""
    names = set(source)
    shape = source.shape if hasattr(source, "shape") else (lambda n: tuple(source[n].shape))
    for required in ("encoder.conv_in.conv.weight", "post_quant_conv.weight", "decoder.conv_out.conv.weight"):
        if required not in names:
            raise KeyError(f"not a HunyuanVideo VAE state dict: missing {required!r}")
    blocks = sorted({int(m[1]) for n in names if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", n))})
    channels = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in blocks)
    layers = len({m[1] for n in names if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", n))})
    return VAEConfig(in_channels=shape("encoder.conv_in.conv.weight")[1],
                     out_channels=shape("decoder.conv_out.conv.weight")[0],
                     latent_channels=shape("post_quant_conv.weight")[0], block_out_channels=channels,
                     layers_per_block=layers, norm_num_groups=norm_num_groups,
                     mid_block_add_attention=any(".attentions." in n for n in names))


class _Prefixed(Mapping[str, np.ndarray]):
    """A view of a TensorSource with an optional `vae.` prefix stripped from every name (official checkpoints)."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.names = {(n[4:] if n.startswith("vae.") else n): n for n in source}

    def __getitem__(self, name):
        return self.source[self.names[name]]

    def shape(self, name):
        return self.source.shape(self.names[name]) if hasattr(self.source, "shape") else self[name].shape

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def _open(path_or_state_dict) -> tuple[_Prefixed, dict | None]:
    src = path_or_state_dict
    config_json = None
    if isinstance(src, (str, os.PathLike)) and epath.Path(src).is_dir():
        path = epath.Path(src)
        if (path / "config.json").exists():
            config_json = json.loads((path / "config.json").read_text())
        if (path / OFFICIAL_WEIGHTS).exists():
            src = str(path / OFFICIAL_WEIGHTS)
    source = TensorSource.open(src)
    return _Prefixed(source), config_json or source.config


def load_torch_vae(path_or_state_dict, config: VAEConfig | Mapping | None = None) -> tuple[VAEConfig, dict]:
    """(config, params) from a diffusers folder, an official folder or `.pt`, a safetensors file, or a state dict.

    The config comes from `config` if given, else the folder's config.json, else the tensor shapes. Raises
    KeyError listing missing and unexpected tensor names, ValueError for shape mismatches (both shapes shown).
    """
    source, config_json = _open(path_or_state_dict)
    if config is not None:
        config = VAEConfig.from_config(config)
    elif config_json is not None:
        config = config_from_json(config_json)
    else:
        config = config_from_state_dict(source)
    shapes = param_shapes(config)
    expected = {name: (path, shapes[path]) for path, name in torch_names(shapes).items()}
    missing = sorted(set(expected) - set(source))
    unexpected = sorted(set(source) - set(expected))
    if missing or unexpected:
        raise KeyError(f"VAE checkpoint does not match the config: missing {missing}, unexpected {unexpected}")
    flat = {}
    for name, (path, shape) in expected.items():
        array = _to_flax_layout(source[name])
        if tuple(array.shape) != shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(source.shape(name))} (Flax layout {array.shape}) "
                             f"does not match the expected Flax shape {shape}")
        flat[path] = array
    return config, traverse_util.unflatten_dict(flat)


def torch_state_dict(config: VAEConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """(torch name, array in torch layout) for every parameter, one at a time; names are checked against config."""
    shapes = param_shapes(config)
    flat = traverse_util.flatten_dict(params)
    missing = sorted("/".join(p) for p in set(shapes) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(shapes))
    if missing or unexpected:
        raise KeyError(f"VAE params do not match the config: missing {missing}, unexpected {unexpected}")
    for path, name in torch_names(shapes).items():
        array = np.asarray(flat[path])
        if tuple(array.shape) != shapes[path]:
            raise ValueError(f"{'/'.join(path)}: param shape {array.shape} does not match the config's "
                             f"{shapes[path]}")
        yield name, np.array(_to_torch_layout(array), order="C")  # a writable copy: torch wants one


def diffusers_config_json(config: VAEConfig) -> dict[str, Any]:
    n = len(config.block_out_channels)
    return {"_class_name": "AutoencoderKLHunyuanVideo", "in_channels": config.in_channels,
            "out_channels": config.out_channels, "latent_channels": config.latent_channels,
            "down_block_types": [_DIFFUSERS_BLOCKS[0]] * n, "up_block_types": [_DIFFUSERS_BLOCKS[1]] * n,
            "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
            "act_fn": config.act_fn, "norm_num_groups": config.norm_num_groups,
            "scaling_factor": config.scaling_factor, "spatial_compression_ratio": config.spatial_compression_ratio,
            "temporal_compression_ratio": config.temporal_compression_ratio,
            "mid_block_add_attention": config.mid_block_add_attention}


def official_config_json(config: VAEConfig) -> dict[str, Any]:
    n = len(config.block_out_channels)
    tiles = config.tile_params()
    return {"_class_name": "AutoencoderKLCausal3D", "in_channels": config.in_channels,
            "out_channels": config.out_channels, "latent_channels": config.latent_channels,
            "down_block_types": [_OFFICIAL_BLOCKS[0]] * n, "up_block_types": [_OFFICIAL_BLOCKS[1]] * n,
            "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
            "act_fn": config.act_fn, "norm_num_groups": config.norm_num_groups,
            "scaling_factor": config.scaling_factor, "time_compression_ratio": config.temporal_compression_ratio,
            "mid_block_add_attention": config.mid_block_add_attention,
            "sample_size": tiles.min_size, "sample_tsize": tiles.min_frames}


def save_torch_vae(config: VAEConfig, params, path: str, layout: str = "diffusers") -> str:
    """Write params as a diffusers folder (config.json + safetensors, loads with
    `AutoencoderKLHunyuanVideo.from_pretrained`) or an official folder (config.json + pytorch_model.pt).
    Returns `path`."""
    config = VAEConfig.from_config(config)
    if layout == "diffusers":
        write_safetensors_folder(torch_state_dict(config, params), path, config=diffusers_config_json(config))
    elif layout == "official":
        torch = require_torch()
        state = {name: to_torch(array) for name, array in torch_state_dict(config, params)}
        with writable_folder(path) as local:
            torch.save(state, os.path.join(local, OFFICIAL_WEIGHTS))
            with open(os.path.join(local, "config.json"), "w") as f:
                json.dump(official_config_json(config), f, indent=2)
    else:
        raise ValueError(f"layout must be 'diffusers' or 'official', got {layout!r}")
    return path


def load_vae(source: str = "", config: VAEConfig | Mapping | None = None, seed: int = 0) -> tuple[VAEConfig, dict]:
    """(config, params) of the VAE to run: from a folder written by `python -m hyvideo_jax.convert` (kind "vae"),
    from PyTorch weights (`load_torch_vae`), or, with `source` empty, random weights drawn from `seed` for `config`
    (what the offline demo prepares its clips with, so its samples decode with the same VAE)."""
    from hyvideo_jax.convert.flax_io import is_flax_model, load_flax_model
    from hyvideo_jax.models.vae import init_params
    if not source:
        config = VAEConfig.from_config(config if config is not None else VAEConfig())
        # jitted: tracing the VAE's init once compiled is faster than running it op by op
        init = jax.jit(lambda key: init_params(config, key), compiler_options=run_once_options())
        return config, init(jax.random.PRNGKey(seed))
    if is_flax_model(source):
        saved, params = load_flax_model(source, kind="vae")
        return VAEConfig.from_config(saved), params
    if not epath.Path(source).exists():
        raise FileNotFoundError(f"VAE weights {source} do not exist (expected a converted folder, a diffusers or "
                                f"official folder, or a .pt / .safetensors file)")
    return load_torch_vae(source, config=None)
