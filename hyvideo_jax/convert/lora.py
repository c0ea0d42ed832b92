"""LoRA files people exchange for HunyuanVideo ↔ our adapters (`hyvideo_jax.lora`), exactly.

    adapters, lora_config = load_lora("my_lora.safetensors", config)    # any of the formats below, from the keys
    params = lora.merge(params, adapters, lora_config)
    save_diffusers_lora(config, adapters, lora_config, "out.safetensors")  # pipe.load_lora_weights(...) reads it

Formats read (a key's module may carry a `transformer.`, `diffusion_model.` or `base_model.model.` prefix):
- diffusers / PEFT: `transformer_blocks.N.attn.to_q.lora_A.weight` / `lora_B.weight`; alpha from the file's
  `lora_adapter_metadata`, a PEFT `adapter_config.json` beside the file (or in its folder), or `adapter_config=`;
- the original module names (diffusion-pipe): `double_blocks.N.img_attn_qkv.lora_A.weight`, `single_blocks.N.linear1`;
- kohya / musubi-tuner: `lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight` / `lora_up.weight` + `.alpha`.
A `<module>.alpha` tensor in any format sets that module's scale alpha / r.

Every LoRA is a low-rank update ΔW = B·A of one official Linear W [out, in] (`conversion_groups` gives each and says
where our kernels sit in it; `official_to_diffusers` says which rows each diffusers Linear holds). An update restricted
to a block of rows and columns is still low rank, and updates on the same block add by stacking their ranks, so every
conversion is exact: diffusers' separate q, k, v LoRAs become one q|k|v adapter of rank 3r (A stacked, B block-
diagonal; identical A's, as diffusers' own converter writes them, collapse back to rank r), the official linear1 LoRA
our linear1_qkv and linear1_mlp adapters sharing a, and our linear2_attn and linear2_mlp adapters one proj_out LoRA of
rank 2r (A block-diagonal over the [attn | mlp] input, B = [b_attn | b_mlp]). Scales are folded into B (files) or b
(adapters, returned with alpha = rank).
"""

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np
from etils import epath

from hyvideo_jax.convert.dit import _get, _Group, conversion_groups, param_shapes
from hyvideo_jax.convert.dit_layouts import official_to_diffusers
from hyvideo_jax.convert.torch_io import TensorSource, to_numpy
from hyvideo_jax.lora import LoRAConfig, flat_adapters, input_dims, is_stacked, put_adapter
from hyvideo_jax.models.dit import DiTConfig
from hyvideo_jax.paths import local_copy, writable_file

_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_down\.weight|lora_B\.weight|lora_up\.weight|alpha)$")
_PARTS = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B", "alpha": "alpha"}
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")
_KOHYA = "lora_unet_"


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """One of our kernels inside an official Linear W [out, in]:
    kernel.reshape(∏inputs, ∏outputs) = W[rows][:, cols]ᵀ."""
    name: str                   # "/"-joined path in our tree
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    rows: np.ndarray
    cols: np.ndarray
    layers: int | None          # size of the stacked `layers` axis (None: not stacked)


@dataclasses.dataclass(frozen=True)
class _Linear:
    group: _Group
    shape: tuple[int, int]      # official (out, in)
    kernels: tuple[_Kernel, ...]


def _layout(grp: _Group, want: list[tuple[int, ...]], layers) -> tuple[tuple[int, int], tuple[_Kernel, ...]] | None:
    """Where the group's kernels sit in its official Linear, found by converting index probes (a one-row A holding
    column numbers, or a one-column B holding row numbers) with the group's own `to_ours`."""
    official = grp.to_official([np.zeros(w, np.int8) for w in want])[0].shape
    if len(official) != 2:
        return None  # the patch embedding is a convolution
    out, n_in = official
    slots = [k for k, p in enumerate(grp.ours) if p[-1] == "kernel"]
    names = {k: "/".join(grp.ours[k]) for k in slots}
    split = {k: (want[k][:input_dims(names[k])], want[k][input_dims(names[k]):]) for k in slots}
    if all(math.prod(split[k][0]) == n_in for k in slots):        # only the outputs are split: probe the rows
        probe = [np.arange(out, dtype=np.float64)[:, None]] + [np.zeros(out)] * (len(grp.official) - 1)
        fed = grp.to_ours(probe, [(1, *split[k][1]) if k in slots else w for k, w in enumerate(want)])
        rows = {k: fed[k].reshape(-1).astype(np.int64) for k in slots}
        cols = {k: np.arange(n_in) for k in slots}
    elif all(math.prod(split[k][1]) == out for k in slots):       # only the inputs are split: probe the columns
        probe = [np.arange(n_in, dtype=np.float64)[None]] + [np.zeros(1)] * (len(grp.official) - 1)
        fed = grp.to_ours(probe, [(*split[k][0], 1) if k in slots else (1,) for k in range(len(want))])
        cols = {k: fed[k].reshape(-1).astype(np.int64) for k in slots}
        rows = {k: np.arange(out) for k in slots}
    else:
        # Every conversion group cuts an official Linear along its outputs (q|k|v, linear1) or its inputs (linear2),
        # never both; a new group that did would need a two-sided probe here.
        raise AssertionError(f"{grp.official[0]}: its kernels split both its inputs and its outputs")
    return (out, n_in), tuple(_Kernel(names[k], *split[k], rows[k], cols[k], layers) for k in slots)


def _linears(cfg: DiTConfig) -> dict[str, _Linear]:
    """Official Linear module name (e.g. "double_blocks.3.img_attn_qkv") → its shape and our kernels in it."""
    shapes = param_shapes(cfg)
    linears, layouts = {}, {}
    for grp in conversion_groups(cfg):
        if not any(p[-1] == "kernel" for p in grp.ours):
            continue
        kind = re.sub(r"\.\d+\.", ".#.", grp.official[0])   # every block of a stack has the same layout
        if kind not in layouts:
            stacked = [_get(shapes, p).shape for p in grp.ours]
            want = [s[1:] if grp.layer is not None else s for s in stacked]
            layouts[kind] = _layout(grp, want, stacked[0][0] if grp.layer is not None else None)
        if layouts[kind] is not None:
            linears[grp.official[0].removesuffix(".weight")] = _Linear(grp, *layouts[kind])
    return linears


def _module_names(linears: Mapping[str, _Linear], hidden_size: int) -> dict[str, tuple[str, np.ndarray]]:
    """Every LoRA-able module name, official or diffusers → (official module, the official rows it holds)."""
    names = {}
    for official, lin in linears.items():
        rows = np.arange(lin.shape[0])
        names[official] = (official, rows)
        for d_name, d_rows in official_to_diffusers(f"{official}.weight", rows, hidden_size):
            names[d_name.removesuffix(".weight")] = (official, d_rows)
    return names


def _mask(n: int, index: np.ndarray) -> np.ndarray:
    m = np.zeros(n, bool)
    m[index] = True
    return m


def _combine(pieces, rows: np.ndarray, cols: np.ndarray):
    """One LoRA (A [R, len(cols)], B [len(rows), R]) for the block W[rows][:, cols] of the sum of `pieces`
    ((A [r, in], B [out, r], row mask, column mask) of the updates B·A of a whole official W), or None."""
    As, Bs = [], []
    for A, B, row_mask, col_mask in pieces:
        if not (row_mask[rows].any() and col_mask[cols].any()):
            continue
        A, B = A[:, cols], B[rows]
        for j, seen in enumerate(As):
            if np.array_equal(seen, A):   # same down-projection: one rank, the up-projections add
                Bs[j] = Bs[j] + B
                break
        else:
            As.append(A)
            Bs.append(B)
    if not As:
        return None
    A, B = np.concatenate(As, axis=0), np.concatenate(Bs, axis=1)
    keep = np.any(A != 0, axis=1)         # rank components outside this block
    return (A[keep], B[:, keep]) if keep.any() else None


# ---------------------------------------------------------------------------------------------------------------------
# reading


def _read(source) -> tuple[dict[str, np.ndarray], dict | None, str]:
    """(tensors as float32 NumPy, the PEFT adapter config found with them or None, description)."""
    if isinstance(source, Mapping):
        tensors = {k: to_numpy(v) if hasattr(v, "detach") else np.asarray(v) for k, v in source.items()}
        return {k: v.astype(np.float32) for k, v in tensors.items()}, None, "state dict"
    path = os.fspath(source)
    src = TensorSource.open(path)
    tensors = {k: src[k].astype(np.float32) for k in src}
    is_folder = epath.Path(path).is_dir()
    folder = epath.Path(path) if is_folder else epath.Path(path).parent
    files = sorted(str(f) for f in folder.glob("*.safetensors")) if is_folder else [path]
    for file in (f for f in files if f.endswith(".safetensors")):
        from safetensors import safe_open
        with safe_open(local_copy(file), framework="np") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")   # written by diffusers' save_lora_weights
        if raw:
            return tensors, {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}, path
    if (folder / "adapter_config.json").exists():
        return tensors, json.loads((folder / "adapter_config.json").read_text()), path
    return tensors, None, path


def _peft_scale(peft: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scale for a module: lora_alpha (or its alpha_pattern entry) / r (√r with rsLoRA)."""
    alpha = peft.get("lora_alpha", rank)
    for pattern, value in (peft.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):   # PEFT's own matching rule
            alpha = value
            break
    return alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)


def load_lora(path_or_state_dict, config: DiTConfig | Mapping, *, adapter_config: Mapping | None = None
              ) -> tuple[dict, LoRAConfig]:
    """(adapters, LoRAConfig) from a LoRA file (`.safetensors`, `.pt`, a PEFT folder) or state dict, in any format
    of the module docstring, such that `lora.merge(params, adapters, lora_config)` applies it exactly. Scales are
    folded into b (alpha = rank); ranks may differ between kernels; layers a file leaves out get zero adapters, kernels
    it leaves out none. `adapter_config`: a PEFT LoraConfig dict (lora_alpha, alpha_pattern, use_rslora) that
    overrides the one found with the file. Keys that name no Linear of the transformer are an error."""
    cfg = DiTConfig.from_config(config)
    tensors, peft, description = _read(path_or_state_dict)
    peft = adapter_config if adapter_config is not None else peft
    linears = _linears(cfg)
    names = _module_names(linears, cfg.hidden_size)
    kohya = {n.replace(".", "_"): n for n in names}

    found: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        m = _KEY.match(key)
        module = m["module"] if m else ""
        if module.startswith(_KOHYA):
            module = kohya.get(module[len(_KOHYA):], "")
        for prefix in _PREFIXES:
            module = module.removeprefix(prefix)
        if module not in names:
            unknown.append(key)
            continue
        found.setdefault(module, {})[_PARTS[m["part"]]] = value
    if unknown:
        raise ValueError(f"LoRA {description}: {len(unknown)} keys name no Linear layer of the transformer ("
                         f"{cfg.depth_double} double, {cfg.depth_single} single blocks): " + ", ".join(sorted(unknown)))
    if not found:
        raise ValueError(f"LoRA {description} holds no LoRA weights")

    pieces: dict[str, list] = {}
    for module, parts in sorted(found.items()):
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"LoRA {description}: {module} has no {'up (lora_B)' if 'A' in parts else 'down (lora_A)'}"
                             " matrix")
        official, rows = names[module]
        out, n_in = linears[official].shape
        A, B = parts["A"], parts["B"]
        rank = A.shape[0]
        if A.shape != (rank, n_in) or B.shape != (len(rows), rank):
            raise ValueError(f"LoRA {description}: {module} has A {A.shape} and B {B.shape}, the model expects "
                             f"[r, {n_in}] and [{len(rows)}, r]")
        scale = (float(np.reshape(parts["alpha"], -1)[0]) / rank if "alpha" in parts
                 else _peft_scale(peft, module, rank) if peft else 1.0)
        B_full = np.zeros((out, rank), np.float32)
        B_full[rows] = B * scale
        pieces.setdefault(official, []).append((A, B_full, _mask(out, rows), np.ones(n_in, bool)))

    per_kernel: dict[str, dict] = {}
    for official, ps in pieces.items():
        lin = linears[official]
        for k in lin.kernels:
            low = _combine(ps, k.rows, k.cols)
            if low is not None:
                A, B = low
                per_kernel.setdefault(k.name, {"kernel": k})[lin.group.layer] = (
                    A.T.reshape(*k.inputs, -1), B.T.reshape(-1, *k.outputs))
    adapters: dict = {}
    for name, entry in per_kernel.items():
        k = entry.pop("kernel")
        rank = max(a.shape[-1] for a, _ in entry.values())
        pad = lambda a, b: (np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])]),  # noqa: E731
                            np.pad(b, [(0, rank - b.shape[0])] + [(0, 0)] * (b.ndim - 1)))
        zero = (np.zeros((*k.inputs, rank), np.float32), np.zeros((rank, *k.outputs), np.float32))
        if k.layers is None:
            a, b = pad(*entry[None])
        else:
            a, b = (np.stack(x) for x in zip(*(pad(*entry[i]) if i in entry else zero for i in range(k.layers))))
        put_adapter(adapters, name, a, b)
    rank = max(np.shape(ad["a"])[-1] for ad in flat_adapters(adapters).values())
    targets = tuple(f"^{re.escape(name)}$" for name in sorted(per_kernel))
    return adapters, LoRAConfig(rank=rank, alpha=float(rank), targets=targets)


# ---------------------------------------------------------------------------------------------------------------------
# writing


def save_diffusers_lora(config: DiTConfig | Mapping, adapters, lora_config: LoRAConfig | Mapping, path) -> str:
    """Write `adapters` as a diffusers/PEFT LoRA `.safetensors` (`transformer.<module>.lora_A.weight` [r, in],
    `lora_B.weight` [out, r], float32, the scale folded into B, so no alpha) that
    `HunyuanVideoTransformer3DModel.load_lora_adapter` and `HunyuanVideoPipeline.load_lora_weights` load. Ranks may
    differ between modules (diffusers reads them per module): proj_out, which holds linear2_attn and linear2_mlp, has
    rank 2r. Returns the path."""
    import flax.linen as nn
    from safetensors.numpy import save_file
    cfg = DiTConfig.from_config(config)
    scale = LoRAConfig.from_config(lora_config).scale
    linears = _linears(cfg)
    where = {(k.name, lin.group.layer): (official, k) for official, lin in linears.items() for k in lin.kernels}
    pieces: dict[str, list] = {}
    for name, ad in flat_adapters(nn.unbox(adapters)).items():
        a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32) * scale
        for i in (range(a.shape[0]) if is_stacked(name) else [None]):
            if (name, i) not in where:
                raise KeyError(f"adapter {name}: no PyTorch Linear holds this kernel (layer {i})")
            official, k = where[(name, i)]
            a_i, b_i = (a, b) if i is None else (a[i], b[i])
            rank = a_i.shape[-1]
            out, n_in = linears[official].shape
            A, B = np.zeros((rank, n_in), np.float32), np.zeros((out, rank), np.float32)
            A[:, k.cols] = a_i.reshape(-1, rank).T
            B[k.rows] = b_i.reshape(rank, -1).T
            pieces.setdefault(official, []).append((A, B, _mask(out, k.rows), _mask(n_in, k.cols)))
    tensors = {}
    for official, ps in pieces.items():
        out, n_in = linears[official].shape
        for d_name, rows in official_to_diffusers(f"{official}.weight", np.arange(out), cfg.hidden_size):
            low = _combine(ps, rows, np.arange(n_in))
            if low is not None:
                module = f"transformer.{d_name.removesuffix('.weight')}"
                tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(low[0])
                tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(low[1])
    path = os.fspath(path)
    with writable_file(path) as local:
        save_file(tensors, local, metadata={"format": "pt"})
    return path
