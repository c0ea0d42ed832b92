"""The transformer's config as each PyTorch world states it: diffusers' config.json, the official code's arguments
and released model names, and what official-layout tensors tell (an official checkpoint stores no config).

Official code (Tencent HunyuanVideo and HunyuanVideo-I2V, `HYVideoDiffusionTransformer`): the architecture comes from
`HUNYUAN_VIDEO_CONFIG[--model]` (`mm_double_blocks_depth`, `heads_num`, ...), while the inference code passes the
channels, `guidance_embed` (True when `--embedded-cfg-scale` is given) and, in the I2V repo, the image condition
(`--i2v-condition-type`, read as `args.i2v_condition_type`): the I2V models are "HYVideo-T/2" built with
in_channels = 2·latent_channels + 1 for latent_concat and latent_channels for token_replace.
diffusers names the three released transformers "HYVideo-T/2-cfgdistill", "HYVideo-T/2-I2V-33ch" (latent_concat, no
guidance embedding) and "HYVideo-T/2-I2V-16ch" (token_replace, guidance embedding): the `--transformer_type` of its
`scripts/convert_hunyuan_video_to_diffusers.py`. `RELEASED` holds their official arguments; `released_config` gives
ours. A token_replace checkpoint has exactly the text-to-video tensors, so loading one from the official layout needs
its config (a released name, `image_condition_type`, or the side-car config `save_torch_dit` writes).
"""

from typing import Any, Mapping

import numpy as np

from hyvideo_jax.models.dit import DiTConfig

# ---------------------------------------------------------------------------------------------------------- diffusers
DIFFUSERS_CONFIG_KEYS = {  # diffusers config.json key → our DiTConfig field
    "in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "depth_double",
    "num_single_layers": "depth_single", "num_refiner_layers": "depth_refiner", "mlp_ratio": "mlp_ratio",
    "patch_size": "patch_size", "patch_size_t": "patch_size_t", "guidance_embeds": "guidance_embed",
    "text_embed_dim": "text_states_dim", "pooled_projection_dim": "pooled_text_dim", "rope_theta": "rope_theta",
    "rope_axes_dim": "rope_axes_dim", "image_condition_type": "image_condition_type",
}


def config_from_diffusers(d: Mapping[str, Any], **overrides) -> DiTConfig:
    """Our config from a diffusers `HunyuanVideoTransformer3DModel` config.json dict (its `image_condition_type`
    included)."""
    if d.get("qk_norm", "rms_norm") != "rms_norm":
        raise ValueError(f"qk_norm={d['qk_norm']!r} is not supported (HunyuanVideo uses 'rms_norm')")
    values = {ours: d[k] for k, ours in DIFFUSERS_CONFIG_KEYS.items() if k in d}
    values["num_heads"] = d.get("num_attention_heads", 24)
    values["hidden_size"] = values["num_heads"] * d.get("attention_head_dim", 128)
    values.update(overrides)
    return DiTConfig(**values)


def config_to_diffusers(cfg: DiTConfig) -> dict[str, Any]:
    """The diffusers config.json for our config."""
    if not cfg.qkv_bias:
        raise ValueError("diffusers' HunyuanVideoTransformer3DModel always has q/k/v biases; this config has "
                         "qkv_bias=False")
    if cfg.refiner_mlp_ratio != 4.0:
        raise ValueError(f"diffusers' token refiner has MLP ratio 4; this config has refiner_mlp_ratio="
                         f"{cfg.refiner_mlp_ratio}")
    d = {"_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.42.1",
         "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim, "qk_norm": "rms_norm"}
    for k, ours in DIFFUSERS_CONFIG_KEYS.items():
        v = getattr(cfg, ours)
        d[k] = list(v) if isinstance(v, tuple) else v
    return d


# ----------------------------------------------------------------------------------------------------------- official
OFFICIAL_CONFIG_KEYS = {  # official HYVideoDiffusionTransformer argument (or `args` field) → our DiTConfig field
    "in_channels": "in_channels", "out_channels": "out_channels", "hidden_size": "hidden_size",
    "heads_num": "num_heads", "mlp_width_ratio": "mlp_ratio", "mm_double_blocks_depth": "depth_double",
    "mm_single_blocks_depth": "depth_single", "rope_dim_list": "rope_axes_dim", "qkv_bias": "qkv_bias",
    "guidance_embed": "guidance_embed", "text_states_dim": "text_states_dim", "text_states_dim_2": "pooled_text_dim",
    "i2v_condition_type": "image_condition_type",
}
# What the official code fixes and our model implements (argument → the only value accepted).
_OFFICIAL_FIXED = {"qk_norm": True, "qk_norm_type": "rms", "mlp_act_type": "gelu_tanh",
                   "text_projection": "single_refiner", "use_attention_mask": True}
_T2 = dict(mm_double_blocks_depth=20, mm_single_blocks_depth=40, rope_dim_list=[16, 56, 56], hidden_size=3072,
           heads_num=24, mlp_width_ratio=4)   # HUNYUAN_VIDEO_CONFIG["HYVideo-T/2"]
# Released transformer → its official arguments (as the inference code builds it).
RELEASED: dict[str, dict[str, Any]] = {
    "HYVideo-T/2-cfgdistill": dict(_T2, in_channels=16, out_channels=16, guidance_embed=True),
    "HYVideo-T/2-I2V-33ch": dict(_T2, in_channels=16 * 2 + 1, out_channels=16, guidance_embed=False,
                                 i2v_condition_type="latent_concat"),
    "HYVideo-T/2-I2V-16ch": dict(_T2, in_channels=16, out_channels=16, guidance_embed=True,
                                 i2v_condition_type="token_replace"),
}


def config_from_official(args: Mapping[str, Any], **overrides) -> DiTConfig:
    """Our config from the official model's arguments: a `HUNYUAN_VIDEO_CONFIG` entry with what the inference code
    adds (`in_channels`, `out_channels`, `guidance_embed`, `patch_size` [pt, p, p], `text_states_dim`,
    `text_states_dim_2`, `i2v_condition_type`); absent ones take the official defaults (in_channels 4, out_channels =
    in_channels, no guidance embedding, text dims 4096 / 768, text-to-video)."""
    for k, want in _OFFICIAL_FIXED.items():
        if k in args and args[k] != want:
            raise ValueError(f"official argument {k}={args[k]!r} is not supported (HunyuanVideo uses {want!r})")
    unknown = sorted(set(args) - set(OFFICIAL_CONFIG_KEYS) - set(_OFFICIAL_FIXED) - {"patch_size"})
    if unknown:
        raise ValueError(f"unknown official model argument(s) {unknown}; known: "
                         f"{sorted(set(OFFICIAL_CONFIG_KEYS) | set(_OFFICIAL_FIXED) | {'patch_size'})}")
    values = {ours: args[k] for k, ours in OFFICIAL_CONFIG_KEYS.items() if k in args}
    values.setdefault("in_channels", 4)
    values.setdefault("out_channels", values["in_channels"])
    values.setdefault("guidance_embed", False)
    values.setdefault("text_states_dim", 4096)
    values.setdefault("pooled_text_dim", 768)
    pt, p, p_w = args.get("patch_size", [1, 2, 2])
    if p != p_w:
        raise ValueError(f"official patch_size {args['patch_size']}: height and width patches must be equal")
    values.update(patch_size_t=pt, patch_size=p)
    values.update(overrides)
    return DiTConfig(**values)


def config_to_official(cfg: DiTConfig) -> dict[str, Any]:
    """The official model's arguments for our config (inverse of `config_from_official`)."""
    if cfg.refiner_mlp_ratio != 4.0:
        raise ValueError(f"the official token refiner has MLP ratio 4; this config has refiner_mlp_ratio="
                         f"{cfg.refiner_mlp_ratio}")
    if cfg.rope_theta != 256.0:
        raise ValueError(f"the official model has RoPE theta 256; this config has rope_theta={cfg.rope_theta}")
    d = {k: getattr(cfg, ours) for k, ours in OFFICIAL_CONFIG_KEYS.items()}
    d["rope_dim_list"] = list(cfg.rope_axes_dim)
    d["patch_size"] = [cfg.patch_size_t, cfg.patch_size, cfg.patch_size]
    return d


def released_config(name: str, **overrides) -> DiTConfig:
    """Our config of a released transformer by its diffusers name (`RELEASED`)."""
    if name not in RELEASED:
        raise ValueError(f"unknown released transformer {name!r}; known: {sorted(RELEASED)}")
    return config_from_official(RELEASED[name], **overrides)


# ------------------------------------------------------------------------------------------------ official tensors
def infer_config(source: Mapping[str, np.ndarray], **overrides) -> DiTConfig:
    """A config from the tensor shapes of an official-layout source. RoPE settings are not stored in weights: they
    default to the released model's and must be given in `overrides` for other head dims. in_channels =
    2·out_channels + 1 is read as latent_concat (the 33-channel I2V model); token_replace is not visible in the
    tensors and must be given (`image_condition_type`)."""
    def shape(name):
        if name not in source:
            raise KeyError(f"cannot infer the config: the checkpoint lacks {name}")
        return tuple(source.shape(name)) if hasattr(source, "shape") else tuple(source[name].shape)

    def count(prefix, suffix):
        n = 0
        while f"{prefix}.{n}.{suffix}" in source:
            n += 1
        return n
    hidden, c_in, pt, p, _ = shape("img_in.proj.weight")
    depth_double = count("double_blocks", "img_mod.linear.weight")
    depth_single = count("single_blocks", "modulation.linear.weight")
    if depth_double:
        head_dim = shape("double_blocks.0.img_attn_q_norm.weight")[0]
        mlp_dim = shape("double_blocks.0.img_mlp.fc1.weight")[0]
    elif depth_single:
        head_dim = shape("single_blocks.0.q_norm.weight")[0]
        mlp_dim = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    else:
        raise ValueError("cannot infer the config: the checkpoint has no double or single blocks")
    c_out = shape("final_layer.linear.weight")[0] // (pt * p * p)
    values = dict(
        in_channels=c_in, out_channels=c_out, hidden_size=hidden,
        num_heads=hidden // head_dim, mlp_ratio=mlp_dim / hidden, depth_double=depth_double, depth_single=depth_single,
        depth_refiner=count("txt_in.individual_token_refiner.blocks", "norm1.weight"), patch_size=p, patch_size_t=pt,
        refiner_mlp_ratio=(shape("txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight")[0] / hidden
                           if "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight" in source else 4.0),
        text_states_dim=shape("txt_in.input_embedder.weight")[1], pooled_text_dim=shape("vector_in.in_layer.weight")[1],
        guidance_embed="guidance_in.mlp.0.weight" in source,
        qkv_bias=depth_double == 0 or "double_blocks.0.img_attn_qkv.bias" in source,
        param_dtype=dtype_name(source["img_in.proj.weight"].dtype),
        image_condition_type="latent_concat" if c_in == 2 * c_out + 1 else None,
    )
    values.update(overrides)
    if "rope_axes_dim" not in values and head_dim != 128:
        raise ValueError(f"head dim {head_dim} differs from the released model's 128: the RoPE split is not stored "
                         "in the weights, pass config=... (with rope_axes_dim) to load_torch_dit")
    return DiTConfig(**values)


def dtype_name(dtype) -> str:
    """Our dtype name of a stored tensor dtype (fp8 and others run as bfloat16)."""
    name = np.dtype(dtype).name
    return name if name in ("float32", "bfloat16", "float16") else "bfloat16"
