"""The image side of the LLaVA text encoder of HunyuanVideo-I2V, numerically identical to `transformers` in fp32.

* `CLIPVisionTower`: the CLIP vision transformer (`transformers.CLIPVisionModel`): a patch embedding (a stride-p
  convolution without bias, here a Dense over each p × p × C patch), a class token, learned positions, the
  pre-LayerNorm `pre_layrnorm`, pre-norm encoder layers with bidirectional attention, and `post_layernorm` on the
  class token of the last layer. It returns every hidden state, stacked, so any layer can be read:

      pooled, states = CLIPVisionTower(cfg).apply({"params": p}, images)   # [B, H, W, C] → [B, D], [n+1, B, T, D]

  states[0] is the embedding after `pre_layrnorm` and states[i] the output of encoder layer i, as transformers'
  `hidden_states`; T = 1 + (H/p)·(W/p) (class token first, then the patches in row-major order).

* `LlavaImageEncoder`: the vision tower and the multi-modal projector (linear_1, activation, linear_2) of
  `transformers.LlavaForConditionalGeneration`, i.e. its `get_image_features`: the hidden state(s) at
  `vision_feature_layer` (LLaVA: -2; a tuple concatenates several along channels), without the class token under
  the "default" select strategy or with it under "full", projected to the LLM width.

      features = LlavaImageEncoder(cfg).apply({"params": p}, images)      # [B, H, W, C] → [B, T', text_hidden]

  Only the encoder layers that feed the selected states run (and are loaded); the class-token output is not
  computed there.

Images are channel-last `[B, H, W, C]` at exactly `image_size` (already resized and normalized, as
`CLIPImageProcessor` does): the conversion code owns the transpose from torch's `[B, C, H, W]`. Configs are frozen
dataclasses built from a transformers `config.json` dict by `from_hf`; dtypes and the attention backend are ours.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.models.layers import LayerNorm, dense, dtypes as _dtypes, scan_blocks
from hyvideo_jax.models.text_encoders import ACTIVATIONS, CLIPEncoderLayer, _check_common

SELECT_STRATEGIES = ("default", "full")


def _vision_config(hf: Mapping[str, Any]) -> dict:
    """The vision part of a transformers config dict (LLaVA and full CLIP configs nest it under `vision_config`)."""
    hf = dict(hf.to_dict() if hasattr(hf, "to_dict") else hf)
    if isinstance(hf.get("vision_config"), Mapping):
        return dict(hf["vision_config"])
    return hf


def _square(value, field: str) -> int:
    """transformers allows `image_size` / `patch_size` as an int or a pair; only square ones are supported here."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ValueError(f"clip_vision.{field}: only square sizes are supported, got {value}")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of the CLIP vision transformer; defaults are clip-vit-large-patch14-336 (LLaVA's tower)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "xla"

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        fail = _check_common("clip_vision", self, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_channels", "image_size",
                                                   "patch_size"))
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            fail("patch_size", f"must divide image_size={self.image_size}, got {self.patch_size}")

    @classmethod
    def from_config(cls, config: "CLIPVisionConfig | Mapping[str, Any]") -> "CLIPVisionConfig":
        return from_fields(cls, config, "clip_vision")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "CLIPVisionConfig":
        """From a transformers `config.json` dict (CLIPVisionConfig, or the `vision_config` of a CLIP / LLaVA config).

        Missing fields take transformers' CLIPVisionConfig defaults (which differ from clip-vit-large-patch14-336's).
        """
        hf = _vision_config(hf)
        values = dict(
            hidden_size=int(hf.get("hidden_size", 768)),
            intermediate_size=int(hf.get("intermediate_size", 3072)),
            num_hidden_layers=int(hf.get("num_hidden_layers", 12)),
            num_attention_heads=int(hf.get("num_attention_heads", 12)),
            num_channels=int(hf.get("num_channels", 3)),
            image_size=_square(hf.get("image_size", 224), "image_size"),
            patch_size=_square(hf.get("patch_size", 32), "patch_size"),
            hidden_act=str(hf.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        )
        values.update(overrides)
        return from_fields(cls, values, "clip_vision")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LlavaVisionConfig:
    """The vision tower, feature selection and projector of a LLaVA model; defaults are llava-llama-3-8b's."""
    vision: CLIPVisionConfig = CLIPVisionConfig()
    text_hidden_size: int = 4096
    # transformers' hidden_states index (negative from the end); a tuple concatenates those states along channels.
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    def __post_init__(self):
        if not isinstance(self.vision, CLIPVisionConfig):
            object.__setattr__(self, "vision", CLIPVisionConfig.from_config(self.vision))
        if isinstance(self.vision_feature_layer, (list, tuple)):
            object.__setattr__(self, "vision_feature_layer", tuple(int(i) for i in self.vision_feature_layer))
        self.validate()

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The selected hidden-state indices, non-negative (0 = the embedding, i = the output of layer i)."""
        layers = self.vision_feature_layer
        layers = layers if isinstance(layers, tuple) else (layers,)
        n = self.vision.num_hidden_layers + 1
        return tuple(i % n for i in layers)

    @property
    def num_layers_run(self) -> int:
        """Encoder layers that feed the selected states (the rest are never computed nor loaded)."""
        return max(self.feature_layers)

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors per image: the patches, plus the class token under the "full" strategy."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        def fail(field, msg):
            raise ValueError(f"llava.{field}: {msg}")
        if self.text_hidden_size <= 0:
            fail("text_hidden_size", f"must be positive, got {self.text_hidden_size}")
        layers = self.vision_feature_layer
        layers = layers if isinstance(layers, tuple) else (layers,)
        n = self.vision.num_hidden_layers
        if not layers or any(not -(n + 1) <= i <= n for i in layers):
            fail("vision_feature_layer", f"must be hidden-state indices in [{-(n + 1)}, {n}] (the vision tower has "
                 f"{n} layers), got {self.vision_feature_layer}")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            fail("vision_feature_select_strategy", f"must be one of {SELECT_STRATEGIES}, "
                 f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act not in ACTIVATIONS:
            fail("projector_hidden_act", f"must be one of {sorted(ACTIVATIONS)}, got {self.projector_hidden_act!r}")

    @classmethod
    def from_config(cls, config: "LlavaVisionConfig | Mapping[str, Any]") -> "LlavaVisionConfig":
        return from_fields(cls, config, "llava")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LlavaVisionConfig":
        """From a transformers LlavaConfig dict; `overrides` set our own fields, and `vision` may be a dict of
        CLIPVisionConfig overrides (e.g. `vision={"dtype": "bfloat16"}`)."""
        hf = dict(hf.to_dict() if hasattr(hf, "to_dict") else hf)
        if not isinstance(hf.get("vision_config"), Mapping) or not isinstance(hf.get("text_config"), Mapping):
            raise ValueError("llava: a LLaVA config needs `vision_config` and `text_config` sections, got keys "
                             f"{sorted(hf)}")
        vision_overrides = dict(overrides.pop("vision", {}))
        layer = hf.get("vision_feature_layer", -2)
        values = dict(
            vision=CLIPVisionConfig.from_hf(hf["vision_config"], **vision_overrides),
            text_hidden_size=int(hf["text_config"].get("hidden_size", 4096)),
            vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else int(layer),
            vision_feature_select_strategy=str(hf.get("vision_feature_select_strategy", "default")),
            projector_hidden_act=str(hf.get("projector_hidden_act", "gelu")),
            multimodal_projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        )
        values.update(overrides)
        return from_fields(cls, values, "llava")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vision"] = self.vision.to_dict()
        return d


def check_images(images, cfg: CLIPVisionConfig):
    """Raise ValueError unless `images` is [B, image_size, image_size, num_channels] (channel-last)."""
    s, c = cfg.image_size, cfg.num_channels
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C] (channel-last), got shape {images.shape}")
    if images.shape[-1] != c:
        hint = " (channel-first? images are [B, H, W, C])" if images.shape[1] == c else ""
        raise ValueError(f"images must have num_channels={c} channels in the last axis, got shape "
                         f"{images.shape}{hint}")
    if images.shape[1:3] != (s, s):
        raise ValueError(f"images must be {s}×{s} (the vision tower's image_size; resize first), got "
                         f"{images.shape[1]}×{images.shape[2]} in shape {images.shape}")


class CLIPVisionEncoderLayer(CLIPEncoderLayer):
    """The CLIP text encoder's block (models/text_encoders.py) attending over all tokens, returning every layer's
    output for the scan to stack."""
    causal: bool = False
    stack_outputs: bool = True


class CLIPVisionTower(nn.Module):
    """CLIP vision transformer → (pooled [B, D] or None, hidden states [num_layers + 1, B, T, D]).

    `num_layers` None runs every layer and returns the post-LayerNorm class token as `pooled`
    (`pooler_output` of transformers); a number runs only the first `num_layers` layers (the hidden states up to
    there are the same) and returns `pooled` None, without the `post_layernorm` parameters.
    """
    config: CLIPVisionConfig
    num_layers: int | None = None

    @nn.compact
    def __call__(self, images):
        """images [B, image_size, image_size, num_channels], channel-last, normalized."""
        cfg, dt = self.config, _dtypes(self.config)
        check_images(images, cfg)
        n = cfg.num_hidden_layers if self.num_layers is None else self.num_layers
        if not 0 <= n <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers must be in [0, {cfg.num_hidden_layers}], got {n}")
        b, p, grid = images.shape[0], cfg.patch_size, cfg.image_size // cfg.patch_size
        patches = images.reshape(b, grid, p, grid, p, cfg.num_channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, grid * grid, p, p, cfg.num_channels)
        x = dense(cfg.hidden_size, (None, None, None, "embed"), name="patch_embedding", axis=(-3, -2, -1),
                  use_bias=False, **dt)(patches)
        init = nn.initializers.normal(0.02)
        cls = self.param("class_embedding", nn.with_logical_partitioning(init, ("embed",)), (cfg.hidden_size,),
                         dt["param_dtype"])
        positions = self.param("position_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                               (cfg.num_patches + 1, cfg.hidden_size), dt["param_dtype"])
        cls = jnp.broadcast_to(cls.astype(dt["dtype"]), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + positions[None].astype(dt["dtype"])
        x = LayerNorm(affine=True, eps=cfg.layer_norm_eps, param_dtype=dt["param_dtype"], name="pre_layrnorm")(x)
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        states = x[None]
        if n:
            segments = jnp.ones(x.shape[:2], jnp.int32)
            layers = scan_blocks(CLIPVisionEncoderLayer, cfg, n, "layers", n_broadcast=2)
            x, outputs = layers(x, segments, segments)
            states = jnp.concatenate([states, outputs], axis=0)
        if self.num_layers is not None:
            return None, states
        pooled = LayerNorm(affine=True, eps=cfg.layer_norm_eps, param_dtype=dt["param_dtype"],
                           name="post_layernorm")(x[:, 0])
        return pooled, states


class LlavaProjector(nn.Module):
    """LLaVA's multi-modal projector: linear_2(act(linear_1(features))), vision width(s) → LLM width."""
    config: LlavaVisionConfig

    @nn.compact
    def __call__(self, features):
        cfg = self.config
        dt = _dtypes(cfg.vision)
        kw = dict(use_bias=cfg.multimodal_projector_bias, **dt)
        h = dense(cfg.text_hidden_size, ("embed", "mlp"), name="linear_1", **kw)(features)
        h = nn.with_logical_constraint(ACTIVATIONS[cfg.projector_hidden_act](h), ("batch", "seq", "act_mlp"))
        return dense(cfg.text_hidden_size, ("mlp", "embed"), name="linear_2", **kw)(h)


class LlavaImageEncoder(nn.Module):
    """Images → LLaVA image features [B, num_image_tokens, text_hidden_size] (`get_image_features`)."""
    config: LlavaVisionConfig

    @nn.compact
    def __call__(self, images):
        """images [B, image_size, image_size, num_channels], channel-last, normalized."""
        cfg = self.config
        _, states = CLIPVisionTower(cfg.vision, num_layers=cfg.num_layers_run, name="vision_tower")(images)
        selected = [states[i] for i in cfg.feature_layers]
        if cfg.vision_feature_select_strategy == "default":
            selected = [s[:, 1:] for s in selected]   # drop the class token
        features = jnp.concatenate(selected, axis=-1) if len(selected) > 1 else selected[0]
        features = nn.with_logical_constraint(features, ("batch", "seq", "act_embed"))
        out = LlavaProjector(cfg, name="multi_modal_projector")(features)
        return nn.with_logical_constraint(out, ("batch", "seq", "act_embed"))
