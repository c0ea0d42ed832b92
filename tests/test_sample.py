"""The sampler against diffusers' HunyuanVideoPipeline (same converted tiny transformer, embeddings and noise), the
decode against diffusers' VAE, and the sharded sampler against one device."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

from hyvideo_jax import sample
from hyvideo_jax.convert import load_torch_dit
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
    out = sample.denoise(model, params, noise.permute(0, 2, 3, 4, 1).numpy(), *map(np_, cond), progress=False,
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
        sample.denoise(model, params, x, *cond, steps=2, shift=7.0, guidance=6.0, true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="embeds a guidance scale"):
        sample.denoise(model, params, x, *cond, steps=2, shift=7.0, guidance=None)
    no_guidance = HunyuanVideoDiT(dataclasses.replace(model.config, guidance_embed=False))
    with pytest.raises(ValueError, match="has no guidance embedding"):
        sample.denoise(no_guidance, params, x, *cond, steps=2, shift=7.0, guidance=6.0)
    with pytest.raises(ValueError, match="channel-last"):
        sample.denoise(model, params, noise.numpy(), *cond, steps=2, shift=7.0, guidance=6.0)
