"""Full fine-tuning of the 13B (fp32 masters, AdamW, EMA) at 720×1280×129 on a v6e-256 (256 chips, topology 16x16):
mesh (data 1, fsdp 32, sequence 8, tensor 1), 32 videos per step, remat "attention" (attention never recomputed: the
step is 1.045× the model's FLOPs, against 1.333× with full remat, 19.58 GiB). AOT: 6.04 / 20.76 / 26.80 GiB per chip
(arguments / temporaries / total) of 32 GiB."""

from configs import hunyuan_video_13b
from configs.slices import slice_preset


def get_config():
    return slice_preset(hunyuan_video_13b.get_config(), topology="v6e:16x16", accelerator_type="v6e-256",
                        ici=(1, 32, 8, 1), measured="6.04 / 20.76 / 26.80 GiB of 32 GiB", remat_policy="attention")
