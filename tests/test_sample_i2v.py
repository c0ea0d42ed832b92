"""Image-to-video sampling against diffusers' HunyuanVideoImageToVideoPipeline: the same tiny token-replace and
latent-concat transformers, VAE, noise and image; from prompt embeddings and from the full prompt path (LLaVA with
the image, CLIP, tokenizers built in the test), with and without true CFG (negative prompt with a black image)."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline

from hyvideo_jax import sample
from hyvideo_jax.convert import load_torch_dit
from hyvideo_jax.convert.vae import load_torch_vae
from hyvideo_jax.denoise import denoise
from hyvideo_jax.image_prompts import IMAGE_INTERLEAVE
from hyvideo_jax.models.dit import HunyuanVideoDiT
from hyvideo_jax.models.vae import VAEConfig
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from tests.dit_reference import TINY, diffusers_dit, relative_error
from tests.test_image_prompts import TEXT_LEN, build_parts, reference_template
from tests.test_sample import VAE_TINY, jax_devices

FRAMES, HEIGHT, WIDTH = 5, 32, 48          # 2 latent frames of 4 × 6: 2 × 2 × 3 = 12 image tokens, 6 on frame 0
LATENT = (2, 4, 6, TINY["out_channels"])
GUIDANCE = 6.016   # diffusers multiplies in fp32; 6.016 × 1000 is the bf16-rounded 6.0 × 1000 ours uses


def picture(seed: int, size=(40, 56)) -> PIL.Image.Image:
    """A smooth random image (the VAE's round trip is then small enough to see the image in the first frame)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize((size[1], size[0]), PIL.Image.BILINEAR)


def torch_noise(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, TINY["out_channels"], *LATENT[:3], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    """Both I2V transformers (ours imported from diffusers'), the tiny VAE both ways, and the text parts."""
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**VAE_TINY).eval()
    vae_config, vae_params = load_torch_vae(vae.state_dict(), config=VAEConfig(**VAE_TINY, tiling="none"))
    out = {"vae": vae}
    for kind, overrides in (("token_replace", {}),
                            ("latent_concat", dict(in_channels=2 * TINY["out_channels"] + 1, guidance_embeds=False))):
        transformer = diffusers_dit(seed=5, image_condition_type=kind, **overrides)
        cfg, params = load_torch_dit(transformer.state_dict(), progress=False, config=dict(
            rope_axes_dim=TINY["rope_axes_dim"], image_condition_type=kind))
        assert cfg.image_condition_type == kind
        out[kind] = (transformer, HunyuanVideoDiT(cfg), params)
    out["text"] = build_parts(clip_dim=TINY["pooled_projection_dim"], seed=21)
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax_devices()[:1])
    out["sampler"] = {}
    for kind in ("token_replace", "latent_concat"):
        text = copy.copy(out["text"]["ours"])   # the kept image tokens are the transformer's: every 4th / 2nd
        text.image_interleave = IMAGE_INTERLEAVE[kind]
        config = sample.SampleConfig(height=HEIGHT, width=WIDTH, frames=FRAMES, image_resize="stretch",
                                     progress=False)
        out["sampler"][kind] = sample.Sampler(config, out[kind][1].config, out[kind][2], vae_config, vae_params, text,
                                              mesh)
    return out


def pipeline(models, kind: str, *, with_text: bool, shift: float) -> HunyuanVideoImageToVideoPipeline:
    text = models["text"] if with_text else {}
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=text.get("llava"), tokenizer=text.get("llm_tok"), transformer=models[kind][0],
        vae=models["vae"], scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=text.get("clip"),
        tokenizer_2=text.get("clip_tok"), image_processor=text.get("processor"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(seed: int, batch: int, valid):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, 9, TINY["text_embed_dim"], generator=g)
    mask = torch.zeros(batch, 9, dtype=torch.int64)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    return states, mask, torch.randn(batch, TINY["pooled_projection_dim"], generator=g)


def channel_last(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("kind", ["token_replace", "latent_concat"])
@pytest.mark.parametrize("steps,shift,true_cfg", [(2, 7.0, 1.0), (5, 17.0, 1.0), (2, 7.0, 3.0), (5, 7.0, 1.5)])
def test_from_prompt_embeddings_equals_the_pipeline(models, kind, steps, shift, true_cfg):
    """Two prompts with two images of another size (stretched to the video, as diffusers does), the sampler's image
    latents and our loop against the pipeline's latents (for latent_concat it returns frames 1 onward)."""
    _, model, params = models[kind]
    sampler = models["sampler"][kind]
    images = [picture(1), picture(2, size=(30, 30))]
    cond, noise = embeddings(3, 2, (6, 2)), torch_noise(4, 2)
    negative = embeddings(5, 2, (3, 9)) if true_cfg > 1 else None
    guidance = GUIDANCE if model.config.guidance_embed else None
    kw = {}
    if negative is not None:
        kw = dict(negative_prompt_embeds=negative[0], negative_prompt_attention_mask=negative[1],
                  negative_pooled_prompt_embeds=negative[2])
    with torch.no_grad():
        ref = pipeline(models, kind, with_text=False, shift=shift)(
            image=images, prompt_embeds=cond[0], prompt_attention_mask=cond[1], pooled_prompt_embeds=cond[2],
            latents=noise.clone(), height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=steps,
            guidance_scale=guidance or 1.0, true_cfg_scale=true_cfg, output_type="latent", return_dict=False, **kw)[0]
    image_latents = sampler.image_latents(images, HEIGHT, WIDTH, "stretch")
    got = np.asarray(denoise(model, params, channel_last(noise), *(t.numpy() for t in cond), steps=steps,
                             shift=shift, guidance=None if guidance is None else 6.0, true_cfg_scale=true_cfg,
                             negative=None if negative is None else tuple(t.numpy() for t in negative),
                             image_latent=image_latents, progress=False))
    ref = channel_last(ref)
    if kind == "latent_concat":
        got = got[:, 1:]
    err = relative_error(got, ref)
    print(f"{kind}, {steps} steps, shift {shift}, true CFG {true_cfg}: relative max error {err:.2e}")
    assert err <= 1e-4
    if kind == "token_replace":   # frame 0 is the image latent exactly, and the rest moved away from the noise
        np.testing.assert_array_equal(got[:, :1], image_latents)
    assert relative_error(channel_last(noise)[:, -1:], ref[:, -1:]) > 0.1


@pytest.mark.parametrize("kind,true_cfg", [("token_replace", 1.0), ("token_replace", 2.5), ("latent_concat", 1.0),
                                           ("latent_concat", 2.0)])
def test_full_prompt_path_equals_the_pipeline(models, kind, true_cfg):
    """Prompt + image through our LLaVA/CLIP encoders and the sampler's `generate`, against the pipeline with the
    same tokenizers and encoders (negative prompt with a black image, its image tokens every 2nd as diffusers).
    Under true CFG the pipeline takes one prompt only (it encodes one black image for the negative prompt)."""
    sampler = models["sampler"][kind]
    n = 1 if true_cfg > 1 else 2
    images, prompts, seeds = [picture(6), picture(7)][:n], ["a red ball", "blue"][:n], [11, 12][:n]
    noise = np.asarray(sampler.noise(seeds, LATENT))
    interleave = 4 if kind == "token_replace" else 2
    guidance = GUIDANCE if sampler.dit_config.guidance_embed else 1.0
    with torch.no_grad():
        ref = pipeline(models, kind, with_text=True, shift=7.0)(
            image=images, prompt=prompts, negative_prompt="blurry" if true_cfg > 1 else None,
            prompt_template=reference_template(sampler.text), max_sequence_length=TEXT_LEN,
            latents=torch.from_numpy(noise.copy()).permute(0, 4, 1, 2, 3).contiguous(), height=HEIGHT, width=WIDTH,
            num_frames=FRAMES, num_inference_steps=3, guidance_scale=guidance, true_cfg_scale=true_cfg,
            image_embed_interleave=interleave, output_type="latent", return_dict=False)[0]
    result = sampler.generate(prompts, images=images, seeds=seeds, steps=3, shift=7.0, true_cfg_scale=true_cfg,
                              negative_prompt="blurry" if true_cfg > 1 else None, negative_image_interleave=2,
                              guidance=6.0 if sampler.dit_config.guidance_embed else 0.0)
    got, ref = result.latents, channel_last(ref)
    if kind == "latent_concat":
        got = got[:, 1:]
    err = relative_error(got, ref)
    print(f"{kind} full prompt path, true CFG {true_cfg}: relative max error {err:.2e}")
    assert err <= 1e-4
    expected_frames = FRAMES - (4 if kind == "latent_concat" else 0)
    assert result.videos.shape == (n, expected_frames, HEIGHT, WIDTH, 3)


def test_image_to_video_requests_are_checked(models):
    sampler = models["sampler"]["token_replace"]
    with pytest.raises(ValueError, match="image-to-video .*give images"):
        sampler.generate(["a"], steps=1)
    with pytest.raises(ValueError, match="2 prompts need one image each"):
        sampler.generate(["a", "b"], images=[picture(1)] * 3, steps=1)
    with pytest.raises(ValueError, match="cached sampling is for text-to-video"):
        sampler.generate(["a"], images=[picture(1)], steps=2, cache="first_block")
    _, model, params = models["token_replace"]
    with pytest.raises(ValueError, match="give the image latent"):
        denoise(model, params, np.zeros((1, *LATENT), np.float32), np.zeros((1, 3, 32), np.float32),
                np.ones((1, 3), np.int32), np.zeros((1, 24), np.float32), steps=1, shift=7.0, guidance=6.0)
    with pytest.raises(ValueError, match=r"image latent must be \[B, 1, 4, 6, 4\]"):
        denoise(model, params, np.zeros((1, *LATENT), np.float32), np.zeros((1, 3, 32), np.float32),
                np.ones((1, 3), np.int32), np.zeros((1, 24), np.float32), steps=1, shift=7.0, guidance=6.0,
                image_latent=np.zeros((1, 2, 4, 6, 4), np.float32))
    with pytest.raises(ValueError, match="sample.image_resize"):
        sample.SampleConfig(image_resize="pad")


def test_reference_frame_crop_and_stretch():
    """"stretch" is diffusers' LANCZOS resize; "crop" keeps the aspect ratio: a 2:1 image cropped to a square
    keeps its middle, which a stretch would squeeze."""
    rng = np.random.default_rng(0)
    wide = PIL.Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    stretched = sample.reference_frame(wide, 20, 20, "stretch")
    expected = np.asarray(wide.resize((20, 20), PIL.Image.LANCZOS), np.float32) / 127.5 - 1
    np.testing.assert_allclose(stretched, expected, atol=1e-6)
    cropped = sample.reference_frame(wide, 20, 20, "crop")
    np.testing.assert_allclose(cropped, np.asarray(wide, np.float32)[:, 10:30] / 127.5 - 1, atol=1e-6)
    assert np.abs(cropped - stretched).max() > 0.5


CLI_CONFIG = '''
from configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.image_condition_type = "token_replace"
    config.text.update(image_size=16, patch_size=4, vision_dim=32, vision_layers=3, vision_heads=2)
    config.sample.update(height=32, width=48, frames=5, steps=3, progress=False)
    return config
'''


def test_cli_makes_a_video_from_an_image_file(tmp_path):
    """`python -m hyvideo_jax.sample --image=first_frame.png --prompt=...` on a tiny token-replace checkpoint (a
    diffusers folder): an mp4 of the requested size whose latent frame 0 is the image's latent (the image cropped to
    the video's 2:3 and encoded); without --image the request is refused with a sentence."""
    import os
    import subprocess
    import sys

    from configs import tiny
    from hyvideo_jax.convert.vae import load_vae
    from hyvideo_jax.models.vae import HunyuanVideoVAE
    from hyvideo_jax.models.vae_tiling import encode_video
    from tests.test_sample_cli import ROOT, read_mp4

    weights = tmp_path / "transformer"   # a random diffusers transformer of configs/tiny.py's sizes
    diffusers_dit(seed=9, image_condition_type="token_replace").save_pretrained(weights)
    config_file = tmp_path / "tiny_i2v.py"
    config_file.write_text(CLI_CONFIG)
    image_file = tmp_path / "first_frame.png"
    picture(8, size=(60, 80)).save(image_file)   # 3:4, cropped to the video's 2:3
    out = tmp_path / "out" / "clip.mp4"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "hyvideo_jax.sample", f"--config={config_file}", f"--torch_weights={weights}",
               "--prompt=a red ball", f"--out={out}", "--save_latents"]
    proc = subprocess.run(command + [f"--image={image_file}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames, _ = read_mp4(str(out))
    assert frames.shape == (5, 32, 48, 3)
    latents = np.load(str(out)[:-4] + ".npy")

    # Latent frame 0 of the written video is the image's latent: the cropped frame through the VAE's encoder.
    # (How close the decoded first frame comes to the image is the VAE's business: tests/test_demo.py measures it
    # with the demo's trained VAE; this one is random.)
    from ml_collections import config_dict
    run_config = config_dict.ConfigDict(tiny.get_config())
    vae_config, vae_params = load_vae("", run_config.vae.model, run_config.data.prepare.vae_seed)
    frame = sample.reference_frame(PIL.Image.open(image_file), 32, 48, "crop")
    image_latent = np.asarray(encode_video(HunyuanVideoVAE(vae_config), vae_params, frame[None, None]))
    np.testing.assert_allclose(latents[:1], image_latent[0], rtol=0, atol=1e-5)
    assert np.abs(latents[1:] - image_latent[0]).max() > 0.5

    # Without --image (what the command's main runs, in this process): a sentence, before any denoising.
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_i2v_cli", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax_devices()[:1])
    with pytest.raises(ValueError, match=r"image-to-video \(token_replace\): give images \(--image\)"):
        sample.run(module.get_config(), prompts=["a red ball"], torch_weights=str(weights),
                   out=str(tmp_path / "no_image.mp4"), mesh=mesh)


def test_i2v_preset_is_the_released_token_replace_model():
    """configs/hunyuan_video_i2v.py: the 13B transformer as token_replace, its records' text length the released
    I2V text states (144 image + 252 text tokens), and the LLaVA folder asked for by name when missing."""
    from configs import hunyuan_video_i2v
    from hyvideo_jax.image_prompts import ImagePromptEncoders
    from hyvideo_jax.models.dit import DiTConfig
    config = hunyuan_video_i2v.get_config()
    dit = DiTConfig.from_config(config.model)
    assert (dit.image_condition_type, dit.in_channels, dit.depth_double, dit.guidance_embed) == (
        "token_replace", 16, 20, True)
    assert config.data.text_len == 576 // IMAGE_INTERLEAVE["token_replace"] + 256 - 4
    assert config.data.with_image_latent
    assert sample.SampleConfig.from_config(config.sample).image_resize == "crop"
    with pytest.raises(ValueError, match="text.llava_path is empty"):
        ImagePromptEncoders.from_config(config.text)
