"""The sampler against diffusers' HunyuanVideoPipeline (same converted tiny transformer, embeddings and noise), the
decode against diffusers' VAE, and the sharded sampler against one device."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

from hyvideo_jax import sample
from hyvideo_jax.convert import load_torch_dit
from hyvideo_jax.denoise import check_sequence_split, denoise
from hyvideo_jax.models.dit import HunyuanVideoDiT
from tests.dit_reference import TINY, diffusers_dit, relative_error

LATENT = (2, 4, 6)   # latent frames, height, width: 2 × 2 × 3 = 12 image tokens
TEXT_LEN = 7


def conditioning(seed: int, valid: tuple[int, ...]):
    """(text_states, text_mask, pooled) as torch tensors for a batch of len(valid) prompts."""
    g = torch.Generator().manual_seed(seed)
    b = len(valid)
    states = torch.randn(b, TEXT_LEN, TINY["text_embed_dim"], generator=g)
    mask = torch.zeros(b, TEXT_LEN, dtype=torch.int64)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    return states, mask, torch.randn(b, TINY["pooled_projection_dim"], generator=g)


@pytest.fixture(scope="module")
def reference():
    transformer = diffusers_dit(seed=3)
    cfg, params = load_torch_dit(transformer.state_dict(), config=dict(rope_axes_dim=TINY["rope_axes_dim"]),
                                 progress=False)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, TINY["in_channels"], *LATENT, generator=g)
    return transformer, HunyuanVideoDiT(cfg), params, noise


def pipeline_latents(transformer, noise, cond, *, steps, shift, guidance, negative=None, true_cfg_scale=1.0):
    """diffusers' pipeline on prompt embeddings, latents out (channel-last NumPy)."""
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    kw = {}
    if negative is not None:
        kw = dict(negative_prompt_embeds=negative[0], negative_prompt_attention_mask=negative[1],
                  negative_pooled_prompt_embeds=negative[2])
    # diffusers forms the guidance input as torch.tensor([g], dtype=transformer dtype) * 1000: in fp32 that is
    # 6000 for 6.0, while the released (bf16) pipelines and ours round it to bf16 (6016). Passing g = 6.016 makes
    # diffusers' fp32 product exactly the released value.
    released = float(torch.tensor([guidance], dtype=torch.bfloat16) * 1000.0) / 1000.0
    assert float(torch.tensor([released]) * 1000.0) == float(torch.tensor([guidance], dtype=torch.bfloat16) * 1000)
    with torch.no_grad():
        out = pipe(prompt_embeds=cond[0], prompt_attention_mask=cond[1], pooled_prompt_embeds=cond[2],
                   latents=noise.clone(), num_inference_steps=steps, guidance_scale=released,
                   true_cfg_scale=true_cfg_scale, output_type="latent", return_dict=False, **kw)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def ours(model, params, noise, cond, **kw):
    np_ = lambda t: t.numpy()  # noqa: E731
    out = denoise(model, params, noise.permute(0, 2, 3, 4, 1).numpy(), *map(np_, cond), progress=False,
                  **dict(kw, negative=None if kw.get("negative") is None else tuple(map(np_, kw["negative"]))))
    return np.asarray(out)


@pytest.mark.parametrize("steps,shift", [(2, 7.0), (5, 17.0), (5, 7.0)])
def test_denoise_equals_diffusers_pipeline(reference, steps, shift):
    transformer, model, params, noise = reference
    cond = conditioning(4, valid=(5, 2))
    ref = pipeline_latents(transformer, noise, cond, steps=steps, shift=shift, guidance=6.0)
    got = ours(model, params, noise, cond, steps=steps, shift=shift, guidance=6.0)
    err = relative_error(got, ref)
    print(f"{steps} steps, shift {shift}: relative max error {err:.2e}")
    assert err <= 1e-4
    assert relative_error(noise.permute(0, 2, 3, 4, 1).numpy(), ref) > 0.1   # the loop really moved the latents


@pytest.mark.parametrize("steps,shift,scale", [(2, 7.0, 3.0), (5, 17.0, 1.5)])
def test_true_cfg_with_negative_prompt_equals_diffusers(reference, steps, shift, scale):
    """The negative prompt has a different valid length and its own pooled vector; both branches get the
    embedded guidance, and the two run as one batch here but as two calls in diffusers."""
    transformer, model, params, noise = reference
    cond, negative = conditioning(4, valid=(5, 2)), conditioning(5, valid=(3, 3))
    ref = pipeline_latents(transformer, noise, cond, steps=steps, shift=shift, guidance=6.0, negative=negative,
                           true_cfg_scale=scale)
    got = ours(model, params, noise, cond, steps=steps, shift=shift, guidance=6.0, negative=negative,
               true_cfg_scale=scale)
    err = relative_error(got, ref)
    print(f"true CFG {scale}, {steps} steps, shift {shift}: relative max error {err:.2e}")
    assert err <= 1e-4
    plain = ours(model, params, noise, cond, steps=steps, shift=shift, guidance=6.0)
    assert relative_error(plain, ref) > 1e-3      # CFG changed the result: the negative branch was used


def test_denoise_input_errors(reference):
    _, model, params, noise = reference
    x = noise.permute(0, 2, 3, 4, 1).numpy()
    cond = tuple(t.numpy() for t in conditioning(4, valid=(5, 2)))
    with pytest.raises(ValueError, match="needs a negative prompt"):
        denoise(model, params, x, *cond, steps=2, shift=7.0, guidance=6.0, true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="embeds a guidance scale"):
        denoise(model, params, x, *cond, steps=2, shift=7.0, guidance=None)
    no_guidance = HunyuanVideoDiT(dataclasses.replace(model.config, guidance_embed=False))
    with pytest.raises(ValueError, match="has no guidance embedding"):
        denoise(no_guidance, params, x, *cond, steps=2, shift=7.0, guidance=6.0)
    with pytest.raises(ValueError, match="channel-last"):
        denoise(model, params, noise.numpy(), *cond, steps=2, shift=7.0, guidance=6.0)


# ---------------------------------------------------------------------------------------------- decode (acceptance 2)
VAE_TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4)
VAE_TILES = dict(tile_sample_min_size=32, tile_sample_stride=24, tile_sample_min_frames=8, tile_sample_stride_frames=4)


@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled"])
def test_decoded_video_equals_diffusers_pipeline(reference, tiled):
    """The pipeline's frames (output_type="np", its VAE untiled or tiled with the same tile numbers) against ours:
    denoise, then the sampler's decode. 9 frames at 32×48 px: two temporal windows and two tile columns."""
    from diffusers import AutoencoderKLHunyuanVideo

    from hyvideo_jax.convert.vae import load_torch_vae
    from hyvideo_jax.models import vae_tiling
    from hyvideo_jax.models.vae import HunyuanVideoVAE, VAEConfig
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    transformer, model, params, _ = reference
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**VAE_TINY).eval()
    if tiled:
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_num_frames=8,
                          tile_sample_stride_height=24, tile_sample_stride_width=24, tile_sample_stride_num_frames=4)
    else:
        vae.use_framewise_decoding = False
    vae_config, vae_params = load_torch_vae(vae.state_dict(), config=VAEConfig(
        **VAE_TINY, **(VAE_TILES if tiled else {}), tiling="official" if tiled else "none"))
    noise = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(7))
    cond = conditioning(4, valid=(5,))
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond[0], prompt_attention_mask=cond[1], pooled_prompt_embeds=cond[2],
                   latents=noise.clone(), num_inference_steps=3, guidance_scale=6.016, output_type="np",
                   return_dict=False)[0]
    latents = ours(model, params, noise, cond, steps=3, shift=7.0, guidance=6.0)
    decoder = HunyuanVideoVAE(vae_config)
    decoded = np.asarray(vae_tiling.decode_latents(decoder, vae_params, latents))
    assert vae_tiling.plan_tiles(latents.shape, vae_config.tile_params(), "decode", 8, 4) is not None or not tiled
    err = float(np.abs(np.clip(decoded / 2 + 0.5, 0, 1) - ref).max())
    print(f"{'tiled' if tiled else 'untiled'} decode: max error {err:.2e} of the [0, 1] range")
    assert ref.shape == (1, 9, 32, 48, 3) and err <= 1e-4
    sampler = sample.Sampler(sample.SampleConfig(), model.config, params, vae_config, vae_params, None,
                             create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax_devices()[:1]))
    frames = sampler.decode(latents)
    assert frames.dtype == np.uint8 and frames.shape == ref.shape
    assert np.abs(frames.astype(np.int32) - np.round(ref * 255).astype(np.int32)).max() <= 1


def jax_devices():
    import jax
    return jax.devices()


# --------------------------------------------------------------------------------------- sharding (acceptance 3)
SHARDED_LATENT = (2, 4, 8)   # 16 image tokens: split over sequence axes of 2, 4 and 8


@pytest.fixture(scope="module")
def sharded_reference():
    """A tiny model with random weights, two prompts with a negative one, and the one-device latents (with and
    without true CFG)."""
    import jax

    from tests.test_dit_model import example_inputs, random_init, tiny_config
    cfg = tiny_config(depth_double=1, depth_single=1, depth_refiner=1)
    params = jax.tree.map(np.asarray, random_init(cfg, example_inputs(cfg)))
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((2, *SHARDED_LATENT, cfg.in_channels)).astype(np.float32)
    cond = (rng.standard_normal((2, 5, cfg.text_states_dim)).astype(np.float32),
            np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
            rng.standard_normal((2, cfg.pooled_text_dim)).astype(np.float32))
    negative = (rng.standard_normal((1, 5, cfg.text_states_dim)).astype(np.float32), np.array([[1, 1, 0, 0, 0]]),
                rng.standard_normal((1, cfg.pooled_text_dim)).astype(np.float32))
    run = lambda m, p, mesh=None, **kw: np.asarray(denoise(  # noqa: E731
        m, p, noise, *cond, steps=3, shift=7.0, guidance=6.0, progress=False, mesh=mesh, **kw))
    model = HunyuanVideoDiT(cfg)
    return cfg, params, run, negative, run(model, params), run(model, params, negative=negative, true_cfg_scale=2.5)


@pytest.mark.parametrize("shape,method", [
    ((1, 2, 4, 1), "ulysses"), ((1, 2, 4, 1), "ring"), ((2, 2, 2, 1), "ulysses"), ((1, 2, 2, 2), "auto")],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_sharded_denoise_equals_one_device(sharded_reference, shape, method):
    from jax.sharding import PartitionSpec as P

    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    from hyvideo_jax.models.dit import example_inputs
    from hyvideo_jax.parallel.sharding import param_targets, place_params
    cfg, params, run, negative, ref, ref_cfg = sharded_reference
    cfg = dataclasses.replace(cfg, sequence_parallel=method)
    mesh = create_mesh(MeshConfig(ici=shape))
    _, shardings = param_targets(HunyuanVideoDiT(cfg), example_inputs(cfg), mesh)
    placed = place_params(params, shardings)
    fc1 = placed["double_blocks"]["img_mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P(None, "fsdp", "tensor")
    if shape[1] > 1:   # FSDP really splits the parameters
        assert fc1.addressable_shards[0].data.size < fc1.size // (shape[1] - 1)
    model = HunyuanVideoDiT(cfg)
    for got, want, kw in ((run(model, placed, mesh), ref, {}),
                          (run(model, placed, mesh, negative=negative, true_cfg_scale=2.5), ref_cfg, {"cfg": 1})):
        err = relative_error(got, want)
        print(f"mesh {shape} {method} {'true CFG' if kw else ''}: relative max error {err:.2e}")
        assert err <= 1e-5


def test_sequence_axis_that_does_not_divide_the_tokens_is_named(sharded_reference):
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    cfg = sharded_reference[0]
    mesh = create_mesh(MeshConfig(ici=(1, 1, 8, 1)))
    with pytest.raises(ValueError, match=r"12 image tokens .* sequence axis of size 8; sequence sizes that divide "
                                         r"them: \[1, 2, 3, 4, 6, 12\]"):
        check_sequence_split(cfg, (3, 4, 4), mesh)
