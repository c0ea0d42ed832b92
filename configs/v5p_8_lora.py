"""LoRA fine-tuning of the 13B at 720×1280×129 on a v5p-8 (4 chips, topology 2x2x1): rank 32 over a bf16 base,
mesh (data 1, fsdp 2, sequence 2, tensor 1), 2 videos per step. AOT: 13.2 / 58.0 / 71.2 GiB per chip (arguments /
temporaries / total) of 95 GiB."""

from configs import hunyuan_video_13b_lora
from configs.slices import slice_preset


def get_config():
    return slice_preset(hunyuan_video_13b_lora.get_config(), topology="v5p:2x2x1", accelerator_type="v5p-8",
                        ici=(1, 2, 2, 1), measured="13.20 / 58.02 / 71.21 GiB of 95 GiB")
