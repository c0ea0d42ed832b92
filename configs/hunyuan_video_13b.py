"""The released HunyuanVideo transformer, "HYVideo-T/2-cfgdistill" (12,821,012,544 parameters)."""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        in_channels=16,
        out_channels=16,
        hidden_size=3072,
        num_heads=24,                 # head dim 128
        mlp_ratio=4.0,                # 12288
        depth_double=20,
        depth_single=40,
        depth_refiner=2,
        refiner_mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        text_states_dim=4096,         # LLaVA-LLaMA-3 hidden states
        pooled_text_dim=768,          # CLIP-L pooled vector
        rope_axes_dim=(16, 56, 56),   # t | h | w, sums to the head dim
        rope_theta=256.0,
        qkv_bias=True,
        guidance_embed=True,
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat_policy="dots_no_batch",
        attention_backend="xla",
    ))
    return config
