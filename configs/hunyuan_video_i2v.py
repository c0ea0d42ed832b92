"""HunyuanVideo-I2V (image-to-video): the 13B transformer with the first frame as condition, for sampling and
fine-tuning. The released "token_replace" model by default; `config.model.image_condition_type = "latent_concat"`
with `in_channels = 33` and `guidance_embed = False` is the first (33-channel) release, sampled with true CFG.

    python -m hyvideo_jax.sample --config=configs/hunyuan_video_i2v.py --torch_weights=HunyuanVideo-I2V/transformer \\
        --config.text.llava_path=HunyuanVideo-I2V/text_encoder_i2v --config.text.clip_path=clip-vit-large-patch14 \\
        --vae_weights=HunyuanVideo-I2V/vae --image=first_frame.png --prompt="..."
"""

import ml_collections

from configs import hunyuan_video_13b


def get_config():
    config = hunyuan_video_13b.get_config()
    config.model.image_condition_type = "token_replace"
    # The I2V text encoder is the whole LLaVA (vision tower, projector, language model) in one transformers folder,
    # with its tokenizer and image processor; the image's 576 features are merged at the template's <image> token.
    text = config.text.to_dict()
    for key in ("llm_path", "crop_start_video", "crop_start_image"):
        text.pop(key)
    config.text = ml_collections.ConfigDict(dict(
        text,
        llava_path="",                # e.g. HunyuanVideo-I2V/text_encoder_i2v (LlavaForConditionalGeneration)
        crop_start_i2v=103,           # BOS + template tokens before the prompt, the <image> token counted once
        image_interleave=0,           # keep every n-th image feature; 0: the model's (4 token_replace, 2 concat)
    ))
    # The released I2V text states: 576 / 4 = 144 image tokens + 256 - 4 text tokens; clips prepared for this model
    # also hold their first frame's own latent, the image the transformer is conditioned on.
    config.data.text_len = 144 + config.text.text_len - 4
    config.data.with_image_latent = True
    # The official sampling of the token-replace model (--i2v-stability: shift 7, embedded guidance 6.0, 50 steps).
    config.sample.update(dict(shift=7.0, guidance=6.0, steps=50, image_resize="crop", negative_image_interleave=0))
    return config
