"""Tensor names of the HunyuanVideo transformer in the two PyTorch layouts, and the map between them.

The *official* layout is Tencent's (`mp_rank_00_model_states.pt`, weights under "module"); the *diffusers* layout
is `HunyuanVideoTransformer3DModel`'s. The map (reference §1.12 and `dit_official_to_diffusers.tsv`) is pure
renaming plus four reversible tensor edits: fused q|k|v split into thirds, the single-block `linear1` split into
q | k | v | mlp, and the final adaLN halves swapped (official shift|scale, diffusers scale|shift). Every edit is a
slice or a concatenation, so conversions in both directions are bit-exact.
"""

import re
from typing import Iterator, Mapping

import numpy as np

_REFINER_O = "txt_in.individual_token_refiner.blocks.{i}"
_REFINER_D = "context_embedder.token_refiner.refiner_blocks.{i}"

# (official module, diffusers module(s), edit). Each applies to that module's `.weight` and `.bias`.
RULES: list[tuple[str, tuple[str, ...], str]] = [
    ("img_in.proj", ("x_embedder.proj",), "same"),
    ("txt_in.input_embedder", ("context_embedder.proj_in",), "same"),
    ("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",), "same"),
    ("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",), "same"),
    ("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",), "same"),
    ("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",), "same"),
    (f"{_REFINER_O}.norm1", (f"{_REFINER_D}.norm1",), "same"),
    (f"{_REFINER_O}.norm2", (f"{_REFINER_D}.norm2",), "same"),
    (f"{_REFINER_O}.self_attn_qkv", tuple(f"{_REFINER_D}.attn.to_{x}" for x in "qkv"), "thirds"),
    (f"{_REFINER_O}.self_attn_proj", (f"{_REFINER_D}.attn.to_out.0",), "same"),
    (f"{_REFINER_O}.mlp.fc1", (f"{_REFINER_D}.ff.net.0.proj",), "same"),
    (f"{_REFINER_O}.mlp.fc2", (f"{_REFINER_D}.ff.net.2",), "same"),
    (f"{_REFINER_O}.adaLN_modulation.1", (f"{_REFINER_D}.norm_out.linear",), "same"),
    ("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "same"),
    ("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "same"),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), "same"),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), "same"),
    ("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",), "same"),
    ("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",), "same"),
    ("double_blocks.{i}.img_mod.linear", ("transformer_blocks.{i}.norm1.linear",), "same"),
    ("double_blocks.{i}.txt_mod.linear", ("transformer_blocks.{i}.norm1_context.linear",), "same"),
    ("double_blocks.{i}.img_attn_qkv", tuple(f"transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv"), "thirds"),
    ("double_blocks.{i}.txt_attn_qkv", tuple(f"transformer_blocks.{{i}}.attn.add_{x}_proj" for x in "qkv"),
     "thirds"),
    ("double_blocks.{i}.img_attn_q_norm", ("transformer_blocks.{i}.attn.norm_q",), "same"),
    ("double_blocks.{i}.img_attn_k_norm", ("transformer_blocks.{i}.attn.norm_k",), "same"),
    ("double_blocks.{i}.txt_attn_q_norm", ("transformer_blocks.{i}.attn.norm_added_q",), "same"),
    ("double_blocks.{i}.txt_attn_k_norm", ("transformer_blocks.{i}.attn.norm_added_k",), "same"),
    ("double_blocks.{i}.img_attn_proj", ("transformer_blocks.{i}.attn.to_out.0",), "same"),
    ("double_blocks.{i}.txt_attn_proj", ("transformer_blocks.{i}.attn.to_add_out",), "same"),
    ("double_blocks.{i}.img_mlp.fc1", ("transformer_blocks.{i}.ff.net.0.proj",), "same"),
    ("double_blocks.{i}.img_mlp.fc2", ("transformer_blocks.{i}.ff.net.2",), "same"),
    ("double_blocks.{i}.txt_mlp.fc1", ("transformer_blocks.{i}.ff_context.net.0.proj",), "same"),
    ("double_blocks.{i}.txt_mlp.fc2", ("transformer_blocks.{i}.ff_context.net.2",), "same"),
    ("single_blocks.{i}.linear1", tuple(f"single_transformer_blocks.{{i}}.{x}"
                                        for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), "linear1"),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), "same"),
    ("single_blocks.{i}.q_norm", ("single_transformer_blocks.{i}.attn.norm_q",), "same"),
    ("single_blocks.{i}.k_norm", ("single_transformer_blocks.{i}.attn.norm_k",), "same"),
    ("single_blocks.{i}.modulation.linear", ("single_transformer_blocks.{i}.norm.linear",), "same"),
    ("final_layer.linear", ("proj_out",), "same"),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
]

# A checkpoint is HunyuanVideo's if it has this key (the test diffusers' single-file loader uses).
OFFICIAL_MARKER = "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias"


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<p>weight|bias)$")


_OFFICIAL_RE = [(_regex(o), o, d, edit) for o, d, edit in RULES]
_DIFFUSERS_RE = [(_regex(dn), k, o, d, edit) for o, d, edit in RULES for k, dn in enumerate(d)]


def detect_layout(names) -> str:
    """'official' or 'diffusers' from the tensor names; a clear error for anything else."""
    names = list(names)
    if any(n.startswith(("double_blocks.", "img_in.", "txt_in.")) for n in names):
        return "official"
    if any(n.startswith(("transformer_blocks.", "x_embedder.", "context_embedder.")) for n in names):
        return "diffusers"
    raise ValueError("cannot tell the checkpoint layout: no 'double_blocks.*'/'img_in.*' (official) and no "
                     f"'transformer_blocks.*'/'x_embedder.*' (diffusers) tensors; first names: {names[:8]}")


def _split_linear1(array: np.ndarray, hidden: int) -> list[np.ndarray]:
    return [array[:hidden], array[hidden:2 * hidden], array[2 * hidden:3 * hidden], array[3 * hidden:]]


def official_to_diffusers(name: str, array: np.ndarray, hidden_size: int) -> list[tuple[str, np.ndarray]]:
    """One official tensor as its diffusers tensor(s)."""
    for regex, _, d_names, edit in _OFFICIAL_RE:
        m = regex.match(name)
        if m is None:
            continue
        names = [dn.replace("{i}", (m.groupdict().get("i") or "")) + "." + m.group("p") for dn in d_names]
        if edit == "same":
            parts = [array]
        elif edit == "thirds":
            parts = np.split(array, 3, axis=0)
        elif edit == "linear1":
            parts = _split_linear1(array, hidden_size)
        else:  # swap: official [shift; scale] → diffusers [scale; shift]
            shift, scale = np.split(array, 2, axis=0)
            parts = [np.concatenate([scale, shift], axis=0)]
        return list(zip(names, parts))
    raise KeyError(f"unexpected tensor in official checkpoint: {name}")


class DiffusersAsOfficial(Mapping[str, np.ndarray]):
    """A diffusers-layout source seen through official names (tensors joined on access)."""

    def __init__(self, source: Mapping[str, np.ndarray]):
        self.source = source
        self._parts: dict[str, tuple[str, list[str]]] = {}
        self.unexpected: list[str] = []
        for name in source:
            for regex, k, o_name, d_names, edit in _DIFFUSERS_RE:
                m = regex.match(name)
                if m is None:
                    continue
                i, p = (m.groupdict().get("i") or ""), m.group("p")
                off = o_name.replace("{i}", i) + "." + p
                entry = self._parts.setdefault(off, (edit, [None] * len(d_names)))
                entry[1][k] = name
                break
            else:
                self.unexpected.append(name)
        self.missing = []  # diffusers names absent although a sibling of the same official tensor is present
        for off, (edit, parts) in self._parts.items():
            for k, dn in enumerate(parts):
                if dn is None:
                    self.missing.append(self._expected_name(off, k))

    def _expected_name(self, official_name: str, k: int) -> str:
        for regex, _, d_names, _ in _OFFICIAL_RE:
            m = regex.match(official_name)
            if m:
                return d_names[k].replace("{i}", (m.groupdict().get("i") or "")) + "." + m.group("p")
        return official_name

    def __getitem__(self, official_name: str) -> np.ndarray:
        edit, parts = self._parts[official_name]
        if any(p is None for p in parts):
            absent = [self._expected_name(official_name, k) for k, p in enumerate(parts) if p is None]
            raise KeyError(f"diffusers checkpoint lacks {absent} (needed for {official_name})")
        arrays = [self.source[p] for p in parts]
        if edit == "swap":
            scale, shift = np.split(arrays[0], 2, axis=0)
            return np.concatenate([shift, scale], axis=0)
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    def shape(self, official_name: str) -> tuple[int, ...]:
        edit, parts = self._parts[official_name]
        shapes = [tuple(self.source.shape(p)) if hasattr(self.source, "shape") else self.source[p].shape
                  for p in parts if p is not None]
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)
