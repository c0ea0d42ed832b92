"""The two text encoders of HunyuanVideo (reference §3), numerically identical to `transformers` in fp32.

* `LlamaTextModel`: the LLaMA decoder of the MLLM (RMSNorm, rotary embeddings incl. Llama-3 frequency scaling,
  grouped-query attention, SwiGLU). It returns `hidden_states[-(hidden_state_skip_layer + 1)]` of
  `transformers.LlamaModel` — by default the output of decoder layer n-2 of n (`hidden_states[-3]`), with no final
  RMSNorm — and runs only the layers that feed that state.

      states = LlamaTextModel(cfg).apply({"params": p}, input_ids, attention_mask)   # [B, L] → [B, L, D]

* `CLIPTextEncoder`: the CLIP text transformer, returning `pooler_output` of `transformers.CLIPTextModel` (the
  final-LayerNorm state at the EOS position) and the full last hidden state.

      pooled, last = CLIPTextEncoder(cfg).apply({"params": p}, input_ids)          # [B, L] → [B, D], [B, L, D]

Masks are 1 for real tokens and 0 for padding (right padding). Both models use causal attention with positions
0..L-1, as transformers does when no position ids are given. Configs are frozen dataclasses built from a
transformers `config.json` dict by `from_hf`; dtypes and the attention backend are ours.
"""

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.models.attention import BACKENDS, attention
from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.models.layers import LayerNorm, RMSNorm, dense, dtypes as _dtypes, scan_blocks

DTYPES = ("float32", "bfloat16", "float16")

# transformers' ACT2FN names used by LLaMA and CLIP configs → JAX functions with the same formula.
ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}

ROPE_TYPES = ("default", "linear", "llama3")


def _check_common(prefix: str, cfg, positive: tuple[str, ...]):
    def fail(field, msg):
        raise ValueError(f"{prefix}.{field}: {msg}")
    for f in positive:
        if int(getattr(cfg, f)) <= 0:
            fail(f, f"must be positive, got {getattr(cfg, f)}")
    if cfg.hidden_act not in ACTIVATIONS:
        fail("hidden_act", f"must be one of {sorted(ACTIVATIONS)}, got {cfg.hidden_act!r}")
    for f in ("dtype", "param_dtype"):
        if getattr(cfg, f) not in DTYPES:
            fail(f, f"must be one of {DTYPES}, got {getattr(cfg, f)!r}")
    if cfg.attention_backend not in BACKENDS:
        fail("attention_backend", f"must be one of {sorted(BACKENDS)}, got {cfg.attention_backend!r}")
    return fail


def _text_config(hf: Mapping[str, Any]) -> dict:
    """The text part of a transformers config dict (LLaVA and full CLIP configs nest it under `text_config`)."""
    hf = dict(hf.to_dict() if hasattr(hf, "to_dict") else hf)
    if isinstance(hf.get("text_config"), Mapping):
        return dict(hf["text_config"])
    return hf


@dataclasses.dataclass(frozen=True)
class LlamaTextConfig:
    """Hyper-parameters of the LLaMA decoder; defaults are Llama-3-8B (the llava-llama-3-8b text model)."""
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_type: str = "default"
    # Parameters of the rope type (e.g. factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    # for llama3) as sorted (name, value) pairs, so the config stays hashable for jit.
    rope_scaling: tuple[tuple[str, float], ...] = ()
    attention_bias: bool = False
    mlp_bias: bool = False
    # Which hidden state to return: hidden_states[-(skip + 1)] of transformers; HunyuanVideo uses 2 and no final norm.
    hidden_state_skip_layer: int = 2
    apply_final_norm: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "xla"

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), float(v)) for k, v in dict(
            self.rope_scaling).items())))
        self.validate()

    @property
    def num_layers_run(self) -> int:
        """Decoder layers that feed the returned state (the rest are never computed nor loaded)."""
        return self.num_hidden_layers - self.hidden_state_skip_layer

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        fail = _check_common("llm", self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "head_dim"))
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}, "
                 f"got {self.num_key_value_heads}")
        if self.head_dim % 2:
            fail("head_dim", f"rotary embeddings need an even head dim, got {self.head_dim}")
        if not 0 <= self.hidden_state_skip_layer < self.num_hidden_layers:
            fail("hidden_state_skip_layer", f"must be in [0, num_hidden_layers={self.num_hidden_layers}), "
                 f"got {self.hidden_state_skip_layer}")
        if self.rope_type not in ROPE_TYPES:
            fail("rope_type", f"must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        needed = {"default": (), "linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        missing = [k for k in needed[self.rope_type] if k not in dict(self.rope_scaling)]
        if missing:
            fail("rope_scaling", f"rope type {self.rope_type!r} needs {missing}, got {dict(self.rope_scaling)}")

    @classmethod
    def from_config(cls, config: "LlamaTextConfig | Mapping[str, Any]") -> "LlamaTextConfig":
        """From a `LlamaTextConfig` or a dict of its fields; unknown keys are errors."""
        return from_fields(cls, config, "llm")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LlamaTextConfig":
        """From a transformers `config.json` dict (LlamaConfig, or a LLaVA config's `text_config`).

        Both rope layouts are read: transformers ≥ 5 `rope_parameters` (with `rope_theta` inside) and the older
        top-level `rope_theta` + `rope_scaling`. `overrides` set our own fields (dtypes, skip layer, backend).
        """
        hf = _text_config(hf)
        defaults = cls()
        heads = int(hf.get("num_attention_heads", defaults.num_attention_heads))
        hidden = int(hf.get("hidden_size", defaults.hidden_size))
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = {k: v for k, v in rope.items()
                   if k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        values = dict(
            vocab_size=int(hf.get("vocab_size", defaults.vocab_size)),
            hidden_size=hidden,
            intermediate_size=int(hf.get("intermediate_size", defaults.intermediate_size)),
            num_hidden_layers=int(hf.get("num_hidden_layers", defaults.num_hidden_layers)),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            hidden_act=str(hf.get("hidden_act", "silu")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=str(rope_type),
            rope_scaling=tuple(scaling.items()),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )
        values.update(overrides)
        return from_fields(cls, values, "llm")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        return d


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of the CLIP text transformer; defaults are clip-vit-large-patch14."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # clip-vit-large-patch14 stores eos_token_id=2, which transformers treats as "pool at the largest token id"
    # (the EOS id is the largest of the vocabulary); any other value pools at the first occurrence of that id.
    eos_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "xla"

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        fail = _check_common("clip", self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")

    @classmethod
    def from_config(cls, config: "CLIPTextConfig | Mapping[str, Any]") -> "CLIPTextConfig":
        return from_fields(cls, config, "clip")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "CLIPTextConfig":
        """From a transformers `config.json` dict (CLIPTextConfig, or a full CLIPConfig's `text_config`).

        Missing fields take transformers' CLIPTextConfig defaults (which differ from clip-vit-large-patch14's).
        """
        hf = _text_config(hf)
        values = dict(
            vocab_size=int(hf.get("vocab_size", 49408)),
            hidden_size=int(hf.get("hidden_size", 512)),
            intermediate_size=int(hf.get("intermediate_size", 2048)),
            num_hidden_layers=int(hf.get("num_hidden_layers", 12)),
            num_attention_heads=int(hf.get("num_attention_heads", 8)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 77)),
            hidden_act=str(hf.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            eos_token_id=int(hf.get("eos_token_id", 49407)),
        )
        values.update(overrides)
        return from_fields(cls, values, "clip")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _embedding(module: nn.Module, name: str, shape: tuple[int, int], axes, param_dtype):
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(0.02), axes), shape, param_dtype)


def rope_inv_freq(cfg: LlamaTextConfig) -> np.ndarray:
    """Inverse rotary frequencies [head_dim / 2] (fp32), as transformers' ROPE_INIT_FUNCTIONS compute them.

    `llama3` keeps high frequencies, divides low ones by `factor` and blends in between (Llama 3.1 scaling).
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    p = dict(cfg.rope_scaling)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / p["factor"]
    elif cfg.rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return np.asarray(inv_freq, np.float32)


def apply_rotary(x, cos, sin):
    """Rotary embedding in the half-split layout of transformers (`rotate_half`), computed in fp32.

    x [B, L, H, D]; cos, sin [L, D] or [B, L, D] (frequencies repeated as [f | f]).
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = (jnp.broadcast_to(c, (x.shape[0],) + c.shape[-2:])[:, :, None] for c in (cos, sin))
    return (x32 * cos + rotated * sin).astype(x.dtype)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(rms(x)), then x + SwiGLU(rms(x)); GQA by repeating each KV head for its group."""
    cfg: LlamaTextConfig

    @nn.compact
    def __call__(self, x, cos, sin, q_segments, kv_segments):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        h = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=dt["param_dtype"], name="input_layernorm")(x)
        proj = dict(use_bias=cfg.attention_bias, **dt)
        q = dense((cfg.num_attention_heads, cfg.head_dim), ("embed", "heads", "kv"), name="q_proj", **proj)(h)
        k = dense((cfg.num_key_value_heads, cfg.head_dim), ("embed", "heads", "kv"), name="k_proj", **proj)(h)
        v = dense((cfg.num_key_value_heads, cfg.head_dim), ("embed", "heads", "kv"), name="v_proj", **proj)(h)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Query head i reads KV head i // group, as transformers' repeat_kv.
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        q = nn.with_logical_constraint(q, ("batch", "seq", "act_heads", "act_kv"))
        a = attention(q, k, v, q_segments, kv_segments, causal=True, backend=cfg.attention_backend)
        x = x + dense(cfg.hidden_size, ("heads", "kv", "embed"), name="o_proj", axis=(-2, -1), **proj)(a)

        h = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=dt["param_dtype"], name="post_attention_layernorm")(x)
        mlp = dict(use_bias=cfg.mlp_bias, **dt)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **mlp)(h)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **mlp)(h)
        h = nn.with_logical_constraint(ACTIVATIONS[cfg.hidden_act](gate) * up, ("batch", "seq", "act_mlp"))
        x = x + dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **mlp)(h)
        return nn.with_logical_constraint(x, ("batch", "seq", "act_embed")), None


class LlamaTextModel(nn.Module):
    """LLaMA decoder → hidden state `hidden_states[-(skip + 1)]` [B, L, hidden_size] in the compute dtype."""
    config: LlamaTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, position_ids=None, image_features=None, image_mask=None):
        """input_ids [B, L] int; attention_mask [B, L] (1 = token, 0 = padding), all ones if None.

        `position_ids` [B, L] (default 0..L-1) place the rotary embedding. `image_features` [B, N, hidden_size]
        replace the token embeddings where `image_mask` [B, L] is true, in order (LLaVA's merge of the projected
        image features at its image tokens, `masked_scatter`): each row needs exactly N true positions.
        """
        cfg, dt = self.config, _dtypes(self.config)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, "
                             f"got {attention_mask.shape}")
        table = _embedding(self, "embed_tokens", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           dt["param_dtype"])
        x = jnp.take(table, input_ids, axis=0).astype(dt["dtype"])
        if (image_features is None) != (image_mask is None):
            raise ValueError("image_features and image_mask go together: pass both or neither")
        if image_features is not None:
            x = merge_image_features(x, image_features, image_mask)
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))

        if position_ids is None:
            freqs = np.arange(length, dtype=np.float32)[:, None] * rope_inv_freq(cfg)[None]
            emb = np.concatenate([freqs, freqs], axis=-1)
            cos, sin = jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))
        else:
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids must have the shape of input_ids {input_ids.shape}, "
                                 f"got {position_ids.shape}")
            freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
            emb = jnp.concatenate([freqs, freqs], axis=-1)
            cos, sin = jnp.cos(emb), jnp.sin(emb)
        # Every query (padded ones too, as in transformers) sees the real keys up to its position: queries are all
        # segment 1 and padded keys segment 0.
        q_segments = jnp.ones((b, length), jnp.int32)
        kv_segments = attention_mask.astype(jnp.int32)
        if cfg.num_layers_run:
            layers = scan_blocks(LlamaDecoderLayer, cfg, cfg.num_layers_run, "layers", n_broadcast=4)
            x, _ = layers(x, cos, sin, q_segments, kv_segments)
        if cfg.apply_final_norm:
            x = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=dt["param_dtype"], name="norm")(x)
        return x


def merge_image_features(embeds, image_features, image_mask):
    """embeds [B, L, D] with the rows of `image_features` [B, N, D] written, in order, where `image_mask` [B, L]
    is true (each row of the mask has N true positions)."""
    if image_features.ndim != 3 or image_features.shape[0] != embeds.shape[0] \
            or image_features.shape[2] != embeds.shape[2]:
        raise ValueError(f"image_features must be [B={embeds.shape[0]}, N, {embeds.shape[2]}], "
                         f"got {image_features.shape}")
    if image_mask.shape != embeds.shape[:2]:
        raise ValueError(f"image_mask must be [B, L]={embeds.shape[:2]}, got {image_mask.shape}")
    image_mask = image_mask.astype(bool)
    slot = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features.astype(embeds.dtype), slot[..., None], axis=1)
    return jnp.where(image_mask[..., None], gathered, embeds)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x)))). Causal attention (the text
    encoder) or, with `causal` False, over all tokens (the vision tower, models/vision.py). Returns (x, x if
    `stack_outputs` (every layer's output, stacked by the scan) else None)."""
    cfg: Any   # CLIPTextConfig or vision.CLIPVisionConfig: the same block
    causal: bool = True
    stack_outputs: bool = False

    @nn.compact
    def __call__(self, x, q_segments, kv_segments):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        heads = (cfg.num_attention_heads, cfg.head_dim)
        h = LayerNorm(affine=True, eps=cfg.layer_norm_eps, param_dtype=dt["param_dtype"], name="layer_norm1")(x)
        q = dense(heads, ("embed", "heads", "kv"), name="q_proj", **dt)(h)
        k = dense(heads, ("embed", "heads", "kv"), name="k_proj", **dt)(h)
        v = dense(heads, ("embed", "heads", "kv"), name="v_proj", **dt)(h)
        a = attention(q, k, v, q_segments, kv_segments, causal=self.causal, backend=cfg.attention_backend)
        x = x + dense(cfg.hidden_size, ("heads", "kv", "embed"), name="out_proj", axis=(-2, -1), **dt)(a)
        h = LayerNorm(affine=True, eps=cfg.layer_norm_eps, param_dtype=dt["param_dtype"], name="layer_norm2")(x)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **dt)(h)
        h = nn.with_logical_constraint(ACTIVATIONS[cfg.hidden_act](h), ("batch", "seq", "act_mlp"))
        x = x + dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **dt)(h)
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        return x, (x if self.stack_outputs else None)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer → (pooled [B, hidden_size], last hidden state [B, L, hidden_size]), both final-normed."""
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """input_ids [B, L] with L <= max_position_embeddings; attention_mask [B, L] optional (1 = token).

        The pooled vector does not depend on the mask: EOS attends causally to real tokens only.
        """
        cfg, dt = self.config, _dtypes(self.config)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"CLIP takes at most max_position_embeddings={cfg.max_position_embeddings} tokens, "
                             f"got {length}")
        tokens = _embedding(self, "token_embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                            dt["param_dtype"])
        positions = _embedding(self, "position_embedding", (cfg.max_position_embeddings, cfg.hidden_size),
                               (None, "embed"), dt["param_dtype"])
        x = (jnp.take(tokens, input_ids, axis=0) + positions[None, :length]).astype(dt["dtype"])
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        q_segments = jnp.ones((b, length), jnp.int32)
        kv_segments = q_segments if attention_mask is None else attention_mask.astype(jnp.int32)
        layers = scan_blocks(CLIPEncoderLayer, cfg, cfg.num_hidden_layers, "layers", n_broadcast=2)
        x, _ = layers(x, q_segments, kv_segments)
        x = LayerNorm(affine=True, eps=cfg.layer_norm_eps, param_dtype=dt["param_dtype"], name="final_layer_norm")(x)
        if cfg.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)   # legacy configs: the EOS id is the largest id
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)   # first EOS (padding may also be EOS)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return pooled, x
