"""Ahead-of-time compilation of the train step, a denoising step and a VAE decode tile for a TPU topology on this CPU
machine (libtpu describes the chips)."""

import pytest

from configs import hunyuan_video_13b, tiny
from hyvideo_jax.aot import (chip_kind, compile_sample_step, compile_train_step, compile_vae_decode_tile,
                             count_collectives)
from hyvideo_jax.models.dit import DiTConfig, forward_flops as dit_forward_flops


def small_splash_config():
    config = tiny.get_config()
    config.model.attention_backend = "splash"
    config.mesh.ici = (1, 2, 2, 1)   # FSDP 2 × sequence 2 (Ulysses: 4 heads over 2)
    return config


def test_small_train_step_compiles_for_a_4_chip_v5p_with_splash():
    config = small_splash_config()
    report, flops = compile_train_step(config, "v5p:2x2x1", frames=5, height=64, width=64)
    print(report.table())
    assert report.mesh_shape == {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 1}
    assert 0 < report.total_bytes < report.hbm_bytes
    assert report.alias_bytes > 0                                  # the donated train state is reused
    assert report.collectives.get("all-to-all", 0) > 0               # Ulysses sequence parallelism
    assert report.collectives.get("all-gather", 0) > 0               # FSDP parameter gathers
    cfg = DiTConfig.from_config(config.model)
    matmul, attention = dit_forward_flops(cfg, 2 * 4 * 4, config.data.text_len, batch=2)
    assert flops["total"] == pytest.approx(3 * (matmul + attention))
    # The traced program: no remat here, so the splash forward runs once per backward and the matmuls are the
    # model's 3× forward (plus the per-sample modulation vectors the count from the config leaves out).
    assert flops["program_attention_runs"] == 1
    assert 1.0 <= flops["program_matmul_ratio"] < 1.05
    # The [B, L, H, D] ↔ [B, H, L, D] transposes around the kernels are fused into their neighbours.
    assert report.kernel_relayouts == 0


def test_lora_train_step_holds_less_than_full_fine_tuning():
    """Adapters and their AdamW state instead of every parameter's, the base in bf16: the per-chip arguments
    shrink to about a sixth of full fine-tuning (fp32 parameters, two moments) here."""
    full, _ = compile_train_step(small_splash_config(), "v5p:2x2x1", frames=5, height=64, width=64)
    config = small_splash_config()
    config.lora.update(rank=4, base_dtype="bfloat16")
    adapted, _ = compile_train_step(config, "v5p:2x2x1", frames=5, height=64, width=64)
    print(f"per-chip arguments: full {full.argument_bytes:,} B, LoRA rank 4 {adapted.argument_bytes:,} B")
    assert adapted.argument_bytes < 0.3 * full.argument_bytes


@pytest.mark.parametrize("true_cfg", [False, True], ids=["distilled", "true_cfg"])
def test_small_sample_step_compiles_for_a_4_chip_v5p_with_splash(true_cfg):
    config = small_splash_config()
    report, flops = compile_sample_step(config, "v5p:2x2x1", frames=5, height=64, width=64, true_cfg=true_cfg)
    print(report.table())
    assert report.mesh_shape == {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 1}
    assert 0 < report.total_bytes < report.hbm_bytes
    assert report.alias_bytes > 0                                  # the donated latents are updated in place
    assert report.collectives.get("all-to-all", 0) > 0               # Ulysses sequence parallelism
    assert report.collectives.get("all-gather", 0) > 0               # FSDP parameter gathers
    assert report.kernel_relayouts == 0
    # One row per FSDP group: 2 videos, or 1 video with its negative prompt under true CFG.
    assert (flops["batch"], flops["rows"]) == ((1, 2) if true_cfg else (2, 2))
    matmul, attention = dit_forward_flops(DiTConfig.from_config(config.model), 2 * 4 * 4, config.data.text_len, 2)
    assert flops["total"] == pytest.approx(matmul + attention)


def test_small_vae_decode_tile_compiles_for_a_4_chip_v5p():
    config = tiny.get_config()   # tiles of 32 px and 8 frames: 64×64 px are cut into 3 × 3 tiles of 4×4 latents
    report, vae = compile_vae_decode_tile(config, "v5p:2x2x1", frames=5, height=64, width=64)
    print(report.table())
    assert report.mesh_shape == {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 1}   # tile rows over every chip
    assert 0 < report.total_bytes < report.hbm_bytes
    assert report.collectives.get("collective-permute", 0) > 0      # halo rows of the 3×3×3 convolutions
    assert vae["tiles"] == 9 and (vae["tile_frames"], vae["tile_height"], vae["tile_width"]) == (5, 32, 32)
    # Each chip decodes about a quarter of the tile (plus halo rows).
    assert vae["tile_flops"] / 4 < report.xla_flops < vae["tile_flops"] / 2


def test_sample_sizes_that_cannot_work_are_named():
    config = small_splash_config()
    with pytest.raises(ValueError, match="frames must be 4k\\+1, got 6"):
        compile_sample_step(config, "v5p:2x2x1", frames=6, height=64, width=64)
    with pytest.raises(ValueError, match="3 videos give 3 model rows, which do not fill the 2 data-parallel groups"):
        compile_sample_step(config, "v5p:2x2x1", frames=5, height=64, width=64, batch=3)
    with pytest.raises(ValueError, match="height and width must be multiples of 8, got 60x64"):
        compile_vae_decode_tile(config, "v5p:2x2x1", frames=5, height=60, width=64)


def test_flops_match_the_reference_figures_for_13b_at_720p():
    """Reference §6: ≈1.62 PF of matmuls and ≈10.45 PF of attention per forward at 720×1280×129."""
    cfg = DiTConfig.from_config(hunyuan_video_13b.get_config().model)
    matmul, attention = dit_forward_flops(cfg, 33 * 45 * 80, 256)
    assert matmul == pytest.approx(1.62e15, rel=0.01) and attention == pytest.approx(10.45e15, rel=0.01)


def test_collective_counting_and_chip_errors():
    hlo = ("%a = f32[8] all-reduce(f32[8] %x)\n%b = f32[8] all-gather-start(f32[2] %y)\n"
           "%c = f32[8] all-gather(f32[2] %y)\n%d = f32[8] add(f32[8] %a, f32[8] %c)")
    assert count_collectives(hlo) == {"all-reduce": 1, "all-gather": 2}
    with pytest.raises(ValueError, match="unknown TPU kind 'v9x'"):
        chip_kind("v9x:2x2")
