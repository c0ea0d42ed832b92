"""Reading and writing PyTorch checkpoints tensor by tensor, for conversion of large models.

Sources are opened lazily: a `.pt` file is memory-mapped (`torch.load(mmap=True)`), safetensors are read per tensor,
so converting the 25.6 GB transformer holds roughly one copy of the weights in RAM (the converted tree), not three.
Tensors cross to NumPy bit-exactly: bf16 and fp8 become `ml_dtypes` arrays over the same bits. Sources in cloud
storage (gs://) are copied to a local cache first (`paths.local_copy`): the readers memory-map local files.
"""

import json
import os
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
from etils import epath

from hyvideo_jax.paths import local_copy, writable_folder


def require_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is installed with the `test` / `torch` extras
        raise ImportError("converting PyTorch checkpoints needs torch: pip install 'hyvideo_jax[torch]'") from e
    return torch


_TORCH_TO_ML_DTYPES = {
    "torch.bfloat16": ("int16", ml_dtypes.bfloat16),
    "torch.float8_e4m3fn": ("uint8", ml_dtypes.float8_e4m3fn),
    "torch.float8_e5m2": ("uint8", ml_dtypes.float8_e5m2),
}


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor (any dtype, incl. bf16/fp8) as a NumPy array with identical bits; never a lossy cast."""
    torch = require_torch()
    tensor = tensor.detach().cpu().contiguous()
    key = str(tensor.dtype)
    if key in _TORCH_TO_ML_DTYPES:
        int_name, np_dtype = _TORCH_TO_ML_DTYPES[key]
        return tensor.view(getattr(torch, int_name)).numpy().view(np_dtype)
    return tensor.numpy()


def to_torch(array: np.ndarray):
    """A NumPy array (incl. ml_dtypes bf16/fp8) as a torch tensor with identical bits."""
    torch = require_torch()
    array = np.ascontiguousarray(array)
    for key, (int_name, np_dtype) in _TORCH_TO_ML_DTYPES.items():
        if array.dtype == np_dtype:
            int_np = np.int16 if int_name == "int16" else np.uint8
            return torch.from_numpy(array.view(int_np)).view(getattr(torch, key.split(".")[1]))
    return torch.from_numpy(array)


class TensorSource(Mapping[str, np.ndarray]):
    """Read-only name → NumPy mapping over a state dict, a `.pt` file, safetensors file(s) or a diffusers folder.

    Tensors are materialized one at a time on access. `config` holds a folder's `config.json` (or None).
    """

    def __init__(self, tensors: Mapping[str, Any], config: dict | None = None, description: str = "state dict",
                 files: dict[str, str] | None = None):
        self._tensors = tensors          # name → torch tensor (maybe memory-mapped), or None if in `files`
        self._files = files or {}        # name → safetensors file holding it
        self.config = config
        self.description = description

    @classmethod
    def open(cls, source, *, load_key: str | None = None) -> "TensorSource":
        if isinstance(source, TensorSource):
            return source
        if isinstance(source, Mapping):
            return cls(_unwrap(dict(source), load_key, "state dict"), description="state dict")
        path = os.fspath(source)
        if epath.Path(path).is_dir():
            return cls._open_folder(path)
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        description, path = path, local_copy(path)   # torch and safetensors read local files (memory-mapped)
        if path.endswith(".safetensors"):
            return cls({}, files=_safetensors_index([path]), description=description)
        torch = require_torch()
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return cls(_unwrap(obj, load_key, description), description=description)

    @classmethod
    def _open_folder(cls, path: str) -> "TensorSource":
        folder = epath.Path(path)
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else None
        files = sorted(str(f) for f in folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.safetensors files")
        return cls({}, config=config, files=_safetensors_index([local_copy(f) for f in files]), description=path)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._files:
            from safetensors import safe_open
            with safe_open(self._files[name], framework="pt") as f:
                return to_numpy(f.get_tensor(name))
        return to_numpy(self._tensors[name])

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._files:
            from safetensors import safe_open
            with safe_open(self._files[name], framework="pt") as f:
                return tuple(f.get_slice(name).get_shape())
        return tuple(self._tensors[name].shape)

    def __iter__(self) -> Iterator[str]:
        yield from self._files
        yield from self._tensors

    def __len__(self) -> int:
        return len(self._files) + len(self._tensors)


def _unwrap(obj, load_key: str | None, where: str) -> dict:
    """The state dict in a checkpoint: under `load_key`, else under 'module' / 'state_dict', else the dict itself."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict, got {type(obj).__name__}")
    if load_key is not None:
        if load_key not in obj:
            raise KeyError(f"{where}: no key {load_key!r} (top-level keys: {sorted(obj)[:10]})")
        obj = obj[load_key]
    else:
        for key in ("module", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    bad = [k for k, v in obj.items() if not hasattr(v, "shape")]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {bad[:10]} (pass load_key= to pick a sub-dict)")
    return dict(obj)


def _safetensors_index(files: list[str]) -> dict[str, str]:
    from safetensors import safe_open
    index = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                index[name] = file
    return index


def write_safetensors_folder(tensors: Iterable[tuple[str, np.ndarray]], folder: str, config: dict | None = None,
                             max_shard_bytes: int = 5 * 2**30, prefix: str = "diffusion_pytorch_model") -> list[str]:
    """Write (name, array) pairs as sharded safetensors + index json (+ config.json): the diffusers folder layout,
    in a local or cloud folder (written locally, then copied up).

    Holds at most one shard in memory beyond the source arrays. Returns the written file names.
    """
    from safetensors.torch import save_file
    with writable_folder(folder) as local:
        return _write_safetensors(tensors, local, config, max_shard_bytes, prefix, save_file)


def _write_safetensors(tensors, folder: str, config, max_shard_bytes: int, prefix: str, save_file) -> list[str]:
    shards: list[dict] = [{}]
    size = 0
    tmp_names = []
    weight_map = {}

    def flush():
        nonlocal size
        if shards[-1]:
            name = f"{prefix}-{len(tmp_names) + 1:05d}.safetensors"
            save_file(shards[-1], os.path.join(folder, name), metadata={"format": "pt"})
            tmp_names.append(name)
            for k in shards[-1]:
                weight_map[k] = name
            shards[-1] = {}
            size = 0

    for name, array in tensors:
        nbytes = array.nbytes
        if size and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = to_torch(array)
        size += nbytes
    flush()
    if len(tmp_names) == 1:  # a single shard takes the plain name diffusers looks for first
        single = f"{prefix}.safetensors"
        os.replace(os.path.join(folder, tmp_names[0]), os.path.join(folder, single))
        weight_map = {k: single for k in weight_map}
        tmp_names = [single]
    else:
        total = sum(os.path.getsize(os.path.join(folder, n)) for n in tmp_names)
        renamed = {}
        for i, n in enumerate(tmp_names):
            new = f"{prefix}-{i + 1:05d}-of-{len(tmp_names):05d}.safetensors"
            os.replace(os.path.join(folder, n), os.path.join(folder, new))
            renamed[n] = new
        weight_map = {k: renamed[v] for k, v in weight_map.items()}
        tmp_names = list(renamed.values())
        with open(os.path.join(folder, f"{prefix}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return tmp_names
