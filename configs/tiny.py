"""A CPU-sized HunyuanVideo transformer for tests: every code path of the 13B model, a few thousand times smaller."""

import ml_collections

from hyvideo_jax import lora


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
        sequence_parallel="auto",
    ))
    # Text encoders: small random LLaMA + CLIP with byte-level tokenizers built in code (no downloads), seeded.
    config.text = ml_collections.ConfigDict(dict(
        demo=True,
        seed=0,
        llm_dim=config.model.text_states_dim,
        clip_dim=config.model.pooled_text_dim,
        llm_layers=4,                 # the state of layer 4 - 2 is used, as hidden_states[-3] of the 32-layer LLM
        llm_heads=4,
        llm_kv_heads=2,
        clip_layers=2,
        clip_heads=2,
        text_len=32,
        clip_len=32,
    ))
    config.vae = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_block_size=64,
            tiling="official",
            tile_sample_min_size=32,      # tiles of 32 px / 8 frames, so CPU tests exercise tiling
            tile_sample_stride=24,
            tile_sample_min_frames=8,
            tile_sample_stride_frames=4,
        )),
        loss=ml_collections.ConfigDict(dict(l1_weight=1.0, kl_weight=1e-6, temporal_weight=0.0,
                                            sample_posterior=True)),
    ))
    # Tokenized clips (hyvideo_jax/data): random clips of the tiny model's shapes until prepared records exist.
    config.data = ml_collections.ConfigDict(dict(
        source="random",
        path="",
        global_batch_size=8,
        num_epochs=0,                 # 0: repeat forever
        shuffle=True,
        drop_remainder=False,         # False: the last batch of a bucket is padded (valid=False), no clip dropped
        worker_count=0,
        read_threads=2,
        prefetch_buffer_size=4,
        latent_channels=config.model.in_channels,
        text_len=config.text.text_len,
        text_dim=config.model.text_states_dim,
        pooled_dim=config.model.pooled_text_dim,
        latent_dtype="bfloat16",
        text_dtype="float32",
        random_records=64,
        random_latent_shapes=((2, 4, 4), (3, 4, 6)),  # [T, H, W] latents; H, W even for patch_size 2
        video_index="",               # source "videos": a JSON file keeping probed shapes across restarts
        caption_dropout=0.0,          # chance a sample trains on the empty prompt (for CFG later)
        eval_path="",                 # evaluation clips (a prepared folder; a split name for tfds), or
        eval_fraction=0.0,            # a share of the training records held out (never trained on)
        prepare=ml_collections.ConfigDict(dict(
            fps=8.0,
            buckets=((5, 32, 32), (5, 16, 32)),  # (frames, height, width) pixels: one VAE tile, no tiling
            records_per_shard=16,
            vae_batch_size=2,
            vae_checkpoint="",            # random VAE weights (vae_seed): the records have the right structure only
            vae_seed=0,
        )),
        synthetic=ml_collections.ConfigDict(dict(
            num_videos=8, sizes=((32, 32), (16, 32)), frames=(6, 9), fps=8.0, seed=0)),
    ))
    # Device mesh (data, fsdp, sequence, tensor): all devices on fsdp; tests override it.
    config.mesh = ml_collections.ConfigDict(dict(ici=(1, -1, 1, 1), dcn=(1, 1, 1, 1)))
    # Flow matching (hyvideo_jax/flow.py): the released convention, logit-normal σ, guidance input 1.0 (×1000).
    config.flow = ml_collections.ConfigDict(dict(
        sigma_density="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, shift=1.0,
        shift_base_tokens=0, loss_weighting="none", guidance=1.0, guidance_range=()))
    # Sampling (hyvideo_jax/sample.py): 9 frames at 32x32 pixels (latents 3 x 4 x 4, 12 image tokens). A model
    # trained from scratch here saw only the constant guidance input flow.guidance, so it samples with that.
    config.sample = ml_collections.ConfigDict(dict(
        height=32, width=32, frames=9, steps=10, shift=7.0, guidance=config.flow.guidance, true_cfg_scale=1.0,
        negative_prompt="",
        videos_per_prompt=1, batch_size=0, seed=0, fps=8.0, use_ema=True, progress=True))
    # Low-rank adapters (hyvideo_jax/lora.py): rank 0 trains every parameter.
    config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=lora.DEFAULT_TARGETS, base_dtype="",
                                                 init_from=""))
    config.train = ml_collections.ConfigDict(dict(
        objective="flow", num_steps=20, learning_rate=1e-3, lr_schedule="constant", warmup_steps=0,
        final_lr_fraction=0.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
        grad_accum_steps=1, ema_decay=0.0, log_every_steps=1, checkpoint_every_steps=10, keep_checkpoints=3,
        async_checkpointing=True, profile_steps=0, peak_flops_per_device=0.0, initialize_distributed=False,
        init_from="", eval_every_steps=0, max_consecutive_skips=10, compilation_cache_dir=""))
    # Evaluation (hyvideo_jax/evaluate.py): validation loss at 8 fixed σ with fixed noise; sample grid prompts.
    config.eval = ml_collections.ConfigDict(dict(
        num_sigmas=8, sigmas=(), seed=0, batch_size=0, max_clips=0, use_ema=True, prompts=(), sample_grid=False,
        sheet_columns=4))
    return config
