"""Import of transformers-layout LLaMA and CLIP text weights into the Flax modules of `models/text_encoders.py`.

    llm_cfg, llm_params = load_llama("llava-llama-3-8b-text-encoder", param_dtype="bfloat16", mesh=mesh)
    clip_cfg, clip_params = load_clip_text("clip-vit-large-patch14")

A source is a folder (config.json + *.safetensors), a safetensors / .pt file, a state dict or a `TensorSource`.
Tensors are streamed one at a time; decoder layers are stacked on the leading 'layers' axis of the scanned blocks.
Accepted layouts: `LlamaModel` and `LlamaForCausalLM` (prefix `model.`, `lm_head` ignored); `CLIPTextModel` with or
without the `text_model.` prefix, and a full `CLIPModel` (the vision tower and projections are ignored).
Weights the returned hidden state does not use (the last `hidden_state_skip_layer` layers, the final norm when it
is not applied) are never read. Unknown and missing names are errors that list them; shape mismatches give both shapes.

With a `mesh`, each tensor is placed by `jax.device_put` with the NamedSharding its logical axes map to under
`rules` (default: `parallel.rules.LOGICAL_AXIS_RULES`), so an 8B encoder never sits whole on one device.
"""

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.convert.torch_io import TensorSource
from hyvideo_jax.models.text_encoders import CLIPTextConfig, CLIPTextEncoder, LlamaTextConfig, LlamaTextModel
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One Flax parameter: the torch name (with `{i}` for a layer index), the torch shape, and torch → Flax."""
    path: tuple[str, ...]
    name: str
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    layers: int = 0   # > 0: stacked over this many decoder layers


def _identity(w):
    return w


def _linear_in(*out_shape):
    """torch Linear weight [out, in] → kernel [in, *out_shape]."""
    return lambda w: w.T.reshape(w.shape[1], *out_shape)


def _linear_out(*in_shape):
    """torch Linear weight [out, in] → kernel [*in_shape, out]."""
    return lambda w: w.T.reshape(*in_shape, w.shape[0])


def _reshape(*shape):
    return lambda b: b.reshape(shape)


def _llama_entries(cfg: LlamaTextConfig) -> list[_Entry]:
    d, f, h, kvh, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim)
    n = cfg.num_layers_run
    entries = [_Entry(("embed_tokens",), "embed_tokens.weight", (cfg.vocab_size, d), _identity)]
    layer = "layers.{i}."
    for proj, heads in (("q_proj", h), ("k_proj", kvh), ("v_proj", kvh)):
        entries.append(_Entry(("layers", proj, "kernel"), f"{layer}self_attn.{proj}.weight", (heads * hd, d),
                              _linear_in(heads, hd), n))
        if cfg.attention_bias:
            entries.append(_Entry(("layers", proj, "bias"), f"{layer}self_attn.{proj}.bias", (heads * hd,),
                                  _reshape(heads, hd), n))
    entries.append(_Entry(("layers", "o_proj", "kernel"), f"{layer}self_attn.o_proj.weight", (d, h * hd),
                          _linear_out(h, hd), n))
    if cfg.attention_bias:
        entries.append(_Entry(("layers", "o_proj", "bias"), f"{layer}self_attn.o_proj.bias", (d,), _identity, n))
    for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
        entries.append(_Entry(("layers", proj, "kernel"), f"{layer}mlp.{proj}.weight", shape, np.transpose, n))
        if cfg.mlp_bias:
            entries.append(_Entry(("layers", proj, "bias"), f"{layer}mlp.{proj}.bias", shape[:1], _identity, n))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        entries.append(_Entry(("layers", norm, "scale"), f"{layer}{norm}.weight", (d,), _identity, n))
    if cfg.apply_final_norm:
        entries.append(_Entry(("norm", "scale"), "norm.weight", (d,), _identity))
    return entries


def _llama_unused(name: str, cfg: LlamaTextConfig) -> bool:
    """Known LLaMA weights that the returned hidden state does not depend on."""
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) >= cfg.num_layers_run and int(m.group(1)) < cfg.num_hidden_layers
    return (name in ("lm_head.weight", "norm.weight") or name.endswith("rotary_emb.inv_freq")
            or name.startswith(_LLAVA_IMAGE_PREFIXES))


# The image side of a LLaVA checkpoint (read by `convert.vision.load_llava_vision`), beside its language model.
_LLAVA_IMAGE_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                         "model.multi_modal_projector.")


def _clip_entries(cfg: CLIPTextConfig) -> list[_Entry]:
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    entries = [
        _Entry(("token_embedding",), "embeddings.token_embedding.weight", (cfg.vocab_size, d), _identity),
        _Entry(("position_embedding",), "embeddings.position_embedding.weight", (cfg.max_position_embeddings, d),
               _identity),
        _Entry(("final_layer_norm", "scale"), "final_layer_norm.weight", (d,), _identity),
        _Entry(("final_layer_norm", "bias"), "final_layer_norm.bias", (d,), _identity),
    ]
    return entries + clip_layer_entries(cfg, n)


def clip_layer_entries(cfg, n: int) -> list[_Entry]:
    """The first `n` layers of a CLIP encoder (text or vision: the same block), stacked under "layers"."""
    d, f, h, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    layer, entries = "encoder.layers.{i}.", []
    for proj in ("q_proj", "k_proj", "v_proj"):
        entries.append(_Entry(("layers", proj, "kernel"), f"{layer}self_attn.{proj}.weight", (d, d),
                              _linear_in(h, hd), n))
        entries.append(_Entry(("layers", proj, "bias"), f"{layer}self_attn.{proj}.bias", (d,), _reshape(h, hd), n))
    entries.append(_Entry(("layers", "out_proj", "kernel"), f"{layer}self_attn.out_proj.weight", (d, d),
                          _linear_out(h, hd), n))
    entries.append(_Entry(("layers", "out_proj", "bias"), f"{layer}self_attn.out_proj.bias", (d,), _identity, n))
    for proj, shape in (("fc1", (f, d)), ("fc2", (d, f))):
        entries.append(_Entry(("layers", proj, "kernel"), f"{layer}mlp.{proj}.weight", shape, np.transpose, n))
        entries.append(_Entry(("layers", proj, "bias"), f"{layer}mlp.{proj}.bias", shape[:1], _identity, n))
    for norm in ("layer_norm1", "layer_norm2"):
        entries.append(_Entry(("layers", norm, "scale"), f"{layer}{norm}.weight", (d,), _identity, n))
        entries.append(_Entry(("layers", norm, "bias"), f"{layer}{norm}.bias", (d,), _identity, n))
    return entries


def _clip_unused(name: str, cfg: CLIPTextConfig) -> bool:
    """Known weights of a full CLIPModel (or old checkpoints) that the text encoder does not use."""
    return (name.startswith(("vision_model.", "visual_projection.", "text_projection."))
            or name in ("logit_scale", "embeddings.position_ids"))


def _strip(name: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _torch_names(entry: _Entry) -> list[str]:
    return [entry.name.format(i=i) for i in range(entry.layers)] if entry.layers else [entry.name]


def _import(source: TensorSource, entries: list[_Entry], prefixes: Sequence[str], unused: Callable[[str], bool],
            what: str, param_dtype, shardings: Mapping[tuple[str, ...], Any] | None) -> dict:
    """Check names and shapes of every entry against `source`, then stream, convert, stack and place them."""
    by_name = {_strip(name, prefixes): name for name in source}
    expected = {n: (e, n_i) for e in entries for n_i, n in enumerate(_torch_names(e))}
    missing = sorted(n for n in expected if n not in by_name)
    unknown = sorted(n for n in by_name if n not in expected and not unused(n))
    mismatched = []
    for n, (e, _) in expected.items():
        if n in by_name:
            shape = tuple(source.shape(by_name[n]))
            if shape != e.torch_shape:
                mismatched.append(f"{by_name[n]}: checkpoint {shape}, model expects {e.torch_shape}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weight(s): {missing[:20]}")
    if unknown:
        problems.append(f"unknown {len(unknown)} weight(s): {unknown[:20]}")
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} weight(s): {mismatched[:20]}")
    if problems:
        raise ValueError(f"{what} weights from {source.description} do not match the config: " + "; ".join(problems))

    params: dict = {}
    for e in entries:
        arrays = [e.to_flax(np.asarray(source[by_name[n]])).astype(param_dtype) for n in _torch_names(e)]
        value = np.stack(arrays) if e.layers else arrays[0]
        del arrays
        if shardings is not None:
            value = jax.device_put(value, shardings[e.path])
        else:
            value = jnp.asarray(value)
        node = params
        for key in e.path[:-1]:
            node = node.setdefault(key, {})
        node[e.path[-1]] = value
    return params


def sharding_table(module: nn.Module, mesh: jax.sharding.Mesh,
                   rules=LOGICAL_AXIS_RULES) -> dict[tuple[str, ...], jax.sharding.NamedSharding]:
    """path → NamedSharding of every parameter of `module` (`parallel.sharding.param_shardings` of its abstract
    parameters, flattened for tensor-by-tensor placement)."""
    from hyvideo_jax.parallel.sharding import abstract_params, param_shardings
    shardings = param_shardings(abstract_params(module, jnp.zeros((1, 1), jnp.int32)), mesh, rules)
    return {tuple(k.key for k in path): sharding
            for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def _source_and_config(source, config, config_cls, what):
    src = TensorSource.open(source)
    if config is None:
        if src.config is None:
            raise ValueError(f"{what}: {src.description} has no config.json; pass config= (a transformers config dict "
                             f"or a {config_cls.__name__})")
        config = src.config
    return src, config


def load_llama(source, config: "LlamaTextConfig | Mapping[str, Any] | None" = None, *, mesh=None,
               rules=LOGICAL_AXIS_RULES, **overrides) -> tuple[LlamaTextConfig, dict]:
    """(config, params) of `LlamaTextModel` from a transformers LLaMA checkpoint.

    `config` is a `LlamaTextConfig`, or a transformers config dict (default: the folder's config.json);
    `overrides` set our own fields (`param_dtype`, `dtype`, `hidden_state_skip_layer`, ...).
    """
    src, config = _source_and_config(source, config, LlamaTextConfig, "llm")
    if isinstance(config, LlamaTextConfig):
        cfg = dataclasses.replace(config, **overrides) if overrides else config
    else:
        cfg = LlamaTextConfig.from_hf(config, **overrides)
    shardings = None if mesh is None else sharding_table(LlamaTextModel(cfg), mesh, rules)
    prefixes = ("model.language_model.", "model.", "language_model.model.", "language_model.")
    params = _import(src, _llama_entries(cfg), prefixes,
                     lambda n: _llama_unused(n, cfg), "LLaMA", jnp.dtype(cfg.param_dtype), shardings)
    return cfg, params


def load_clip_text(source, config: "CLIPTextConfig | Mapping[str, Any] | None" = None, *, mesh=None,
                   rules=LOGICAL_AXIS_RULES, **overrides) -> tuple[CLIPTextConfig, dict]:
    """(config, params) of `CLIPTextEncoder` from a transformers CLIPTextModel / CLIPModel checkpoint."""
    src, config = _source_and_config(source, config, CLIPTextConfig, "clip")
    if isinstance(config, CLIPTextConfig):
        cfg = dataclasses.replace(config, **overrides) if overrides else config
    else:
        cfg = CLIPTextConfig.from_hf(config, **overrides)
    shardings = None if mesh is None else sharding_table(CLIPTextEncoder(cfg), mesh, rules)
    params = _import(src, _clip_entries(cfg), ("text_model.",), lambda n: _clip_unused(n, cfg), "CLIP text",
                     jnp.dtype(cfg.param_dtype), shardings)
    return cfg, params
