"""Low-rank adapters (LoRA) on the transformer's kernels: which ones, their initialization, and the merge.

    lora_config = LoRAConfig.from_config(config.lora)              # rank, alpha, target patterns
    adapters = init_adapters(params, lora_config, rng)              # {"double_blocks": {"img_attn_qkv": {"kernel":
                                                                    #   {"a": [L, D, r], "b": [L, r, 3, H, Dh]}}}}
    velocity = model.apply({"params": merge(params, adapters, lora_config)}, ...)

A target is a kernel W of our tree (blocks stacked on a leading `layers` axis) whose path matches one of
`targets` (regular expressions over the "/"-joined path). Its input dimensions are the ones the layer contracts
(`input_dims`: the model dimension D for q|k|v, MLP-in and single-block linear1; heads × head dim for the attention
output projections; the MLP width for MLP-out), the rest are outputs. The adapter is a: [layers, *inputs, r] and
b: [layers, r, *outputs]; the layer computes with W + (alpha / r)·a·b, merged inside the jitted step, so the
model itself is unchanged and the base weights stay frozen outside the optimizer. As in PEFT, a starts random
(uniform ±1/√fan_in) and b at zero, so training starts from the base model exactly.

The defaults follow the community trainers (diffusion-pipe, musubi-tuner): the attention q|k|v and output
projections and both MLP layers of every double-stream block (image and text streams), and the fused linear1 (q|k|v
and MLP-in) and linear2 (attention-out and MLP-out) of every single-stream block.
"""

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyvideo_jax.config_fields import from_fields

DEFAULT_TARGETS = (
    r"double_blocks/(img|txt)_attn_(qkv|proj)/kernel",
    r"double_blocks/(img|txt)_mlp/fc[12]/kernel",
    r"single_blocks/linear1_(qkv|mlp)/kernel",
    r"single_blocks/linear2_(attn|mlp)/kernel",
)
# Kernels whose layer contracts two input dimensions (heads × head dim); every other target contracts one.
_TWO_INPUT_DIMS = re.compile(r"(attn_proj|linear2_attn)/kernel$")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The `config.lora` section. `rank` 0 trains every parameter (no adapters); `alpha` 0 means alpha = rank
    (scale 1). `base_dtype` stores the frozen base weights in another dtype than the model's parameters (e.g.
    bfloat16: they are never updated, so no fp32 master copy is needed); empty keeps model.param_dtype.
    `init_from` starts the adapters from a LoRA file (any format `convert.lora.load_lora` reads) instead of from
    zero (`start_from`)."""
    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_dtype: str = ""
    init_from: str = ""

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if self.rank < 0:
            raise ValueError(f"lora.rank: must be >= 0 (0: no adapters), got {self.rank}")
        if self.base_dtype not in ("", "float32", "bfloat16", "float16"):
            raise ValueError(f"lora.base_dtype: must be '', float32, bfloat16 or float16, got {self.base_dtype!r}")
        if self.init_from and not self.rank:
            raise ValueError(f"lora.init_from: starting adapters from {self.init_from} needs lora.rank > 0 (the rank "
                             f"to train at, at least the file's)")
        if self.alpha < 0:
            raise ValueError(f"lora.alpha: must be >= 0 (0: alpha = rank), got {self.alpha}")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(f"lora.targets: {t!r} is not a regular expression ({e})") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    @classmethod
    def from_config(cls, config: "LoRAConfig | Mapping[str, Any] | None") -> "LoRAConfig":
        return from_fields(cls, config or {}, "lora")


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def input_dims(name: str) -> int:
    """How many leading dimensions (after `layers`) of the kernel at `name` the layer contracts."""
    return 2 if _TWO_INPUT_DIMS.search(name) else 1


def target_names(params, config: LoRAConfig) -> list[str]:
    """The "/"-joined paths of the kernels the adapters apply to; an error if a pattern matches nothing."""
    names = [_path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(params))]
    chosen = [n for n in names if any(re.search(t, n) for t in config.targets)]
    for t in config.targets:
        if not any(re.search(t, n) for n in names):
            raise ValueError(f"lora.targets: {t!r} matches no parameter of the model")
    return chosen


def is_stacked(name: str) -> bool:
    """Whether the parameter at `name` is stacked on a leading `layers` axis (the scanned blocks)."""
    return re.search(r"(^|/)(double_blocks|single_blocks|blocks)/", name) is not None


def _split(shape, name: str, stacked: bool):
    lead = shape[:1] if stacked else ()
    rest = shape[1:] if stacked else shape
    k = input_dims(name)
    return lead, rest[:k], rest[k:]


def init_adapters(params, config: LoRAConfig, rng, dtype=jnp.float32):
    """Adapters {path: {"a", "b"}} (nested like `params`) for every target of `params` (plain or boxed with logical
    axes; boxed in gives boxed out, a and b named after their kernel's axes, the rank axis unsharded)."""
    flat = {_path_name(p): leaf for p, leaf in
            jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
    names = target_names(params, config)
    keys = jax.random.split(rng, max(len(names), 1))
    adapters: dict = {}
    for key, name in zip(keys, names):
        leaf = flat[name]
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        stacked = is_stacked(name)
        lead, inputs, outputs = _split(value.shape, name, stacked)
        fan_in = math.prod(inputs)
        a = jax.random.uniform(key, (*lead, *inputs, config.rank), dtype, -1.0, 1.0) / math.sqrt(fan_in)
        b = jnp.zeros((*lead, config.rank, *outputs), dtype)
        if isinstance(leaf, nn.Partitioned):
            axes = tuple(leaf.names)
            lead_axes, in_axes, out_axes = _split(axes, name, stacked)
            a = nn.LogicallyPartitioned(a, (*lead_axes, *in_axes, None))   # logical names, as the kernel's
            b = nn.LogicallyPartitioned(b, (*lead_axes, None, *out_axes))
        put_adapter(adapters, name, a, b)
    return adapters


def delta(a, b, scale: float, stacked: bool):
    """scale·a·b in fp32: a [L, *in, r], b [L, r, *out] → [L, *in, *out] (without the L axis if not `stacked`)."""
    r = a.shape[-1]
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if stacked:
        lead = a.shape[0]
        out = jnp.einsum("lir,lro->lio", a32.reshape(lead, -1, r), b32.reshape(lead, r, -1))
        return scale * out.reshape(a.shape[:-1] + b.shape[2:])
    return scale * (a32.reshape(-1, r) @ b32.reshape(r, -1)).reshape(a.shape[:-1] + b.shape[1:])


def merge(params, adapters, config: LoRAConfig):
    """`params` with W + scale·a·b at every adapted kernel (in W's dtype); the others unchanged."""
    def walk(p, ad, name):
        if set(ad) == {"a", "b"}:
            d = delta(ad["a"], ad["b"], config.scale, is_stacked(name))
            return (p.astype(jnp.float32) + d).astype(p.dtype)
        return {k: walk(v, ad[k], f"{name}/{k}" if name else k) if k in ad else v for k, v in p.items()}
    return walk(params, adapters, "")


def start_from(adapters, loaded, loaded_config: "LoRAConfig", config: LoRAConfig):
    """Fresh `adapters` (a random, b zero) that continue a `loaded` LoRA (as `convert.lora.load_lora` returns it):
    for every kernel it adapts, its rank slots hold the loaded a and b (b rescaled to `config.scale`, so that
    `merge(params, result, config)` equals `merge(params, loaded, loaded_config)`); slots it leaves empty keep the
    fresh a and b = 0, so they add nothing and still train. jnp operations: jit it to keep the adapters' shardings.
    Errors if the loaded LoRA adapts a kernel outside `config.targets` or has a higher rank than `config.rank`."""
    fresh, loaded = flat_adapters(adapters), flat_adapters(loaded)
    outside = sorted(set(loaded) - set(fresh))
    if outside:
        raise ValueError(f"lora.init_from: the LoRA adapts {', '.join(outside)}, which lora.targets "
                         f"{config.targets} leaves out: add them to the targets")
    result: dict = {}
    for name, current in fresh.items():
        a, b = current["a"], current["b"]
        if name in loaded:
            la, lb = loaded[name]["a"], loaded[name]["b"]
            rank = la.shape[-1]
            if rank > config.rank:
                raise ValueError(f"lora.init_from: {name} has rank {rank} in the LoRA, above lora.rank "
                                 f"{config.rank}: set lora.rank >= {rank}")
            lead = int(is_stacked(name))
            la = jnp.pad(la.astype(jnp.float32), [(0, 0)] * (la.ndim - 1) + [(0, config.rank - rank)])
            lb = jnp.pad(lb.astype(jnp.float32) * (loaded_config.scale / config.scale),
                         [(0, 0)] * lead + [(0, config.rank - rank)] + [(0, 0)] * (lb.ndim - 1 - lead))
            in_axes, out_axes = tuple(range(lead, la.ndim - 1)), tuple(range(lead + 1, lb.ndim))
            used = (jnp.abs(la).sum(in_axes) > 0) | (jnp.abs(lb).sum(out_axes) > 0)    # [layers?, r]
            a = jnp.where(jnp.expand_dims(used, tuple(range(lead, lead + len(in_axes)))), la, a).astype(a.dtype)
            b = jnp.where(jnp.expand_dims(used, tuple(range(used.ndim, used.ndim + len(out_axes)))), lb, b
                          ).astype(b.dtype)
        put_adapter(result, name, a, b)
    return result


def put_adapter(tree: dict, name: str, a, b):
    """Set {"a", "b"} at the "/"-joined path `name` of a nested adapter tree (the inverse of `flat_adapters`)."""
    node = tree
    for part in name.split("/"):
        node = node.setdefault(part, {})
    node.update(a=a, b=b)


def flat_adapters(tree, prefix: str = "") -> dict:
    """"/"-joined path → {"a", "b"} of an adapter tree."""
    if set(tree) == {"a", "b"}:
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flat_adapters(value, f"{prefix}/{key}" if prefix else key))
    return out
