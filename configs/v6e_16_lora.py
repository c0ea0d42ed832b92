"""LoRA fine-tuning of the 13B at 544×960×129 on a v6e-16 (16 chips, topology 4x4): rank 32 over a bf16 base, mesh
(data 1, fsdp 4, sequence 4, tensor 1), 4 videos per step. AOT: 7.13 / 19.87 / 27.00 GiB per chip (arguments /
temporaries / total) of 32 GiB. At 720×1280 the same slice needs 36.8 GiB per chip: it does not fit."""

from configs import hunyuan_video_13b_lora
from configs.slices import slice_preset


def get_config():
    config = slice_preset(hunyuan_video_13b_lora.get_config(), topology="v6e:4x4", accelerator_type="v6e-16",
                          ici=(1, 4, 4, 1), height=544, width=960, measured="7.13 / 19.87 / 27.00 GiB of 32 GiB")
    config.sample.update(height=544, width=960)
    return config
