"""LoRA fine-tuning of the released transformer: rank-32 adapters on the attention and MLP layers of every block,
the base frozen in bf16 (never updated, so no fp32 master copy), the adapters and their AdamW state in fp32.

    python -m hyvideo_jax.train --config=configs/hunyuan_video_13b_lora.py --workdir=gs://bucket/run \\
        --config.train.init_from=ckpt/dit --config.data.path=gs://bucket/clips

`train.init_from` is required: a folder from `python -m hyvideo_jax.convert to-flax`, the official
mp_rank_00_model_states.pt (or its fp8 file) or a diffusers folder. To continue training a LoRA (ours, diffusers/PEFT,
diffusion-pipe or kohya/musubi-tuner files), add `--config.lora.init_from=lora.safetensors` (its rank at most
lora.rank, its layers among lora.targets).
"""

from configs import hunyuan_video_13b


def get_config():
    config = hunyuan_video_13b.get_config()
    config.lora.update(rank=32, alpha=32.0, base_dtype="bfloat16")
    config.train.update(learning_rate=1e-4, lr_schedule="constant", warmup_steps=100, weight_decay=0.0,
                        ema_decay=0.0, checkpoint_every_steps=250)
    return config
