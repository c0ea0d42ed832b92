"""The released HunyuanVideo transformer, "HYVideo-T/2-cfgdistill" (12,821,012,544 parameters)."""

import ml_collections

from hyvideo_jax import lora


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
        param_dtype="float32",        # fp32 master parameters for training; sampling keeps the released bf16
        dtype="bfloat16",             # compute (norms, RoPE, softmax and the timestep sinusoid stay fp32)
        remat_policy="dots_no_batch",
        attention_backend="splash",   # TPU; "cudnn" on GPU, "chunked" on CPU
        sequence_parallel="auto",
        # Splash kernels: query / key-value / key-value compute blocks (configs/slices.py has per-chip sizes). The
        # fused backward keeps a [L / kv block, heads, L, head dim] partial dq per device, quadratic in tokens.
        splash_block_q=512,
        splash_block_kv=512,
        splash_block_kv_compute=512,
        splash_fused_backward=False,
    ))
    # Text encoders (reference section 3): folders in transformers layout with their tokenizers, downloaded by the user.
    config.text = ml_collections.ConfigDict(dict(
        demo=False,
        llm_path="",                  # the extracted llava-llama-3-8b text model (LlamaForCausalLM or LlamaModel)
        clip_path="",                 # clip-vit-large-patch14 (CLIPTextModel or the full CLIPModel)
        llm_tokenizer_path="",        # empty: the tokenizer lives in llm_path
        clip_tokenizer_path="",       # empty: the tokenizer lives in clip_path
        text_len=256,                 # kept LLM tokens after the template crop
        clip_len=77,
        crop_start_video=95,          # BOS + template tokens before the prompt, as the official code sets them
        crop_start_image=36,
        hidden_state_skip_layer=2,    # hidden_states[-3], no final norm
        dtype="bfloat16",
        param_dtype="bfloat16",
    ))
    config.vae = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(  # the released 884-16c-hy VAE (246,478,803 parameters)
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            scaling_factor=0.476986,
            param_dtype="float32",
            dtype="bfloat16",
            attention_block_size=4096,
            tiling="official",            # 256 px tiles (stride 192), 64-frame windows (stride 48)
        )),
        loss=ml_collections.ConfigDict(dict(l1_weight=1.0, kl_weight=1e-6, temporal_weight=0.0,
                                            sample_posterior=True)),
    ))
    # Tokenized clips written by `python -m hyvideo_jax.data.prepare` (set data.path to its output folder).
    config.data = ml_collections.ConfigDict(dict(
        source="arrayrecord",
        path="",
        global_batch_size=32,
        num_epochs=0,                 # 0: repeat forever
        shuffle=True,
        drop_remainder=False,         # False: the last batch of a bucket is padded (valid=False), no clip dropped
        worker_count=4,               # a 720p x 129 record is ~15 MB of bf16 latents + 2 MB of text states
        worker_buffer_size=2,
        read_threads=4,
        prefetch_buffer_size=2,
        latent_channels=config.model.in_channels,
        text_len=config.text.text_len,
        text_dim=config.model.text_states_dim,
        pooled_dim=config.model.pooled_text_dim,
        latent_dtype="bfloat16",
        text_dtype="bfloat16",
        video_index="",               # source "videos": a JSON file keeping probed shapes across restarts
        caption_dropout=0.0,          # chance a sample trains on the empty prompt (for CFG later)
        eval_path="",                 # evaluation clips (a prepared folder; a split name for tfds), or
        eval_fraction=0.0,            # a share of the training records held out (never trained on)
        prepare=ml_collections.ConfigDict(dict(
            fps=24.0,
            # (frames, height, width): 720p and 544p landscape, portrait and square, 129 and 65 frames.
            buckets=((129, 720, 1280), (129, 1280, 720), (129, 960, 960),
                     (129, 544, 960), (129, 960, 544), (129, 720, 720),
                     (65, 544, 960), (65, 960, 544), (65, 720, 720)),
            records_per_shard=64,
            vae_batch_size=1,
            vae_checkpoint="",            # a folder from `python -m hyvideo_jax.convert to-flax` of the released VAE
            vae_seed=0,
        )),
    ))
    # Device mesh (data, fsdp, sequence, tensor) within a slice (ici) and across slices (dcn): FSDP over the slice,
    # data parallel across slices. Set sequence > 1 for 720p x 129 (118,800 image tokens per sample).
    config.mesh = ml_collections.ConfigDict(dict(ici=(1, -1, 1, 1), dcn=(1, 1, 1, 1)))
    # Flow matching in the released convention (reference section 4): logit-normal σ as diffusion-pipe and FastVideo
    # train it. Fine-tuning the cfg-distilled model feeds a constant embedded guidance, 1.0 as the community trainers
    # do (a per-sample range would need a CFG teacher's target).
    config.flow = ml_collections.ConfigDict(dict(
        sigma_density="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, shift=1.0,
        shift_base_tokens=0, loss_weighting="none", guidance=1.0, guidance_range=()))
    # Sampling as the released pipelines (reference section 4.3): 720p x 129 frames at 24 fps, 50 steps, shift 7
    # (17 below 20 steps), embedded guidance 6.0, no true CFG.
    config.sample = ml_collections.ConfigDict(dict(
        height=720, width=1280, frames=129, steps=50, shift=7.0, guidance=6.0, true_cfg_scale=1.0,
        negative_prompt="Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad "
                        "hands, bad teeth, bad eyes, bad limbs, distortion",
        videos_per_prompt=1, batch_size=0, seed=0, fps=24.0, use_ema=True, progress=True))
    # Low-rank adapters (hyvideo_jax/lora.py): rank 0 trains every parameter.
    config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=lora.DEFAULT_TARGETS, base_dtype="",
                                                 init_from=""))
    config.train = ml_collections.ConfigDict(dict(
        objective="flow", num_steps=10_000, learning_rate=1e-5, lr_schedule="cosine", warmup_steps=500,
        final_lr_fraction=0.1, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0,
        grad_accum_steps=1, ema_decay=0.9999, log_every_steps=50, checkpoint_every_steps=500, keep_checkpoints=3,
        async_checkpointing=True, profile_steps=0, peak_flops_per_device=0.0, initialize_distributed=True,
        init_from="",    # pretrained: a `convert to-flax` folder, mp_rank_00_model_states.pt, a diffusers folder
        eval_every_steps=0,    # e.g. 1000, with data.eval_path or data.eval_fraction (the final step always)
        max_consecutive_skips=10, compilation_cache_dir=""))   # "": WORKDIR/compilation_cache
    # Evaluation (hyvideo_jax/evaluate.py): validation loss at 8 fixed σ with fixed noise on the first 64 clips;
    # the sample grid (eval.prompts, sizes from config.sample) by `python -m hyvideo_jax.evaluate` beside the run.
    config.eval = ml_collections.ConfigDict(dict(
        num_sigmas=8, sigmas=(), seed=0, batch_size=0, max_clips=64, use_ema=True, prompts=(), sample_grid=False,
        sheet_columns=4))
    return config
