"""A CPU-sized HunyuanVideo transformer for tests: every code path of the 13B model, a few thousand times smaller."""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        in_channels=4,
        out_channels=4,
        hidden_size=64,
        num_heads=4,                  # head dim 16
        mlp_ratio=4.0,
        depth_double=2,
        depth_single=2,
        depth_refiner=2,
        refiner_mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        text_states_dim=32,
        pooled_text_dim=24,
        rope_axes_dim=(4, 6, 6),
        rope_theta=256.0,
        qkv_bias=True,
        guidance_embed=True,
        param_dtype="float32",
        dtype="float32",
        remat_policy="none",
        attention_backend="xla",
    ))
    return config
