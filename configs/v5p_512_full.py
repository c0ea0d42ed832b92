"""Full fine-tuning of the 13B (fp32 masters, AdamW, EMA) at 720×1280×129 on a v5p-512 (256 chips, topology 8x8x4):
mesh (data 1, fsdp 64, sequence 4, tensor 1), 64 videos per step, remat "attention" (attention never recomputed: the
step is 1.045× the model's FLOPs, against 1.333× with full remat). AOT: 3.05 / 37.94 / 41.00 GiB per chip (arguments
/ temporaries / total) of 95 GiB."""

from configs import hunyuan_video_13b
from configs.slices import slice_preset


def get_config():
    return slice_preset(hunyuan_video_13b.get_config(), topology="v5p:8x8x4", accelerator_type="v5p-512",
                        ici=(1, 64, 4, 1), measured="3.05 / 37.94 / 41.00 GiB of 95 GiB", remat_policy="attention")
