"""configs/tiny.py as an image-to-video transformer (HunyuanVideo-I2V, `model.image_condition_type`), for CPU tests
and trying the image-to-video objective:

    python -m hyvideo_jax.train --config=configs/tiny_i2v.py --workdir=/tmp/i2v               # "token_replace"
    python -m hyvideo_jax.train --config=configs/tiny_i2v.py:latent_concat --workdir=/tmp/i2v

The text encoders are the demo LLaVA (random LLM + a CLIP ViT of 16 px images in 4 px patches: 16 image features,
every 4th kept for "token_replace", every 2nd for "latent_concat") and CLIP; the clips hold their first frame's own
latent (`data.with_image_latent`), and their text states are image tokens + text_len − the 12 tokens of the byte
tokenizer's assistant header (`ImagePromptEncoders.states_len`; prepare checks `data.text_len` against it).
"""

from configs import tiny

IMAGE_TOKENS = 16            # (image_size / patch_size)²
HEADER_TOKENS = 12           # <|eot_id|><|start_header_id|>assistant<|end_header_id|> in the demo's byte tokenizer


def get_config(image_condition_type: str | None = None):
    kind = image_condition_type or "token_replace"
    if kind not in ("token_replace", "latent_concat"):
        raise ValueError(f"configs/tiny_i2v.py:<type> takes token_replace or latent_concat, got {kind!r}")
    config = tiny.get_config()
    channels = config.model.out_channels
    config.model.image_condition_type = kind
    if kind == "latent_concat":   # [noisy latents | image latent | mask]; guidance by true CFG only, as released
        config.model.update(in_channels=2 * channels + 1, guidance_embed=False)
    interleave = 4 if kind == "token_replace" else 2
    config.text.update(image_size=16, patch_size=4, vision_dim=32, vision_layers=3, vision_heads=2,
                       image_interleave=interleave)
    config.data.update(latent_channels=channels, with_image_latent=True,
                       text_len=IMAGE_TOKENS // interleave + config.text.text_len - HEADER_TOKENS)
    return config
