"""The sampling CLI end to end on checkpoints the tests make (a training workdir with EMA, a converted folder), and
its sentences for bad input."""

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from configs import tiny
from hyvideo_jax import sample
from hyvideo_jax.denoise import denoise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red square moves left", "a blue circle moves up"]


def sample_config(**sample_fields):
    config = tiny.get_config()
    config.sample.steps = 2
    config.sample.progress = False
    config.sample.update(sample_fields)
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_run):
    """A folder for this module's outputs; the session's 2-step training run of the tiny model that keeps an EMA
    (learning rate 0.05: EMA and raw parameters differ clearly), and a converted folder of its raw parameters."""
    return tmp_path_factory.mktemp("sample_cli"), tiny_run["workdir"], tiny_run["converted"]


@pytest.fixture(scope="module", autouse=True)
def built_once():
    """The random text encoders and VAE of configs/tiny.py (the same weights for the same config and seed) built
    once for this module's samplers, as tests/test_sample_cache_cli.py does: building them took much of each
    sampler's time. Weights from a file (--vae_weights) are keyed by their path."""
    from tests.cli_runs import encoders_built_once
    patch = encoders_built_once()
    yield
    patch.undo()


def read_mp4(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def test_cli_writes_videos_from_a_training_workdir(checkpoints):
    """The real command line: two prompts × two videos, mp4s that read back with the right frames, size and fps,
    latents and an index; each video reproducible on its own (seed per video, whatever else is in the batch)."""
    root, workdir, _ = checkpoints
    out = root / "cli" / "clip.mp4"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "hyvideo_jax.sample", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}", "--videos_per_prompt=2", "--steps=2", "--fps=12",
         "--seed=5", f"--out={out}", "--save_latents"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EMA parameters" in proc.stderr
    paths = proc.stdout.split()
    assert paths == [str(root / "cli" / f"clip_{i:03d}.mp4") for i in range(4)]
    index = [json.loads(line) for line in (root / "cli" / "clip.jsonl").read_text().splitlines()]
    assert [(row["prompt"], row["seed"]) for row in index] == [(PROMPTS[0], 5), (PROMPTS[0], 6), (PROMPTS[1], 7),
                                                               (PROMPTS[1], 8)]
    for path in paths:
        frames, fps = read_mp4(path)
        assert frames.shape == (9, 32, 32, 3) and fps == 12.0
    # Video 2 (prompt 1, seed 7) alone, in this process, with the same EMA parameters: the same latents.
    sampler = sample.Sampler.from_config(sample_config(), workdir=workdir)
    alone = sampler.generate([PROMPTS[1]], seeds=[7])
    np.testing.assert_allclose(alone.latents[0], np.load(paths[2][:-4] + ".npy"), atol=1e-5)
    # and the mp4 holds that video: H.264 (yuv420) is lossy on the random VAE's noisy frames, so compare its error
    # to the one against another video of the call
    frames = read_mp4(paths[2])[0].astype(np.float32)
    own, other = (np.abs(frames - v).mean() for v in (alone.videos[0], read_mp4(paths[3])[0]))
    print(f"mp4 against its video: mean error {own:.1f} levels; against another video {other:.1f}")
    assert own < 0.5 * other


def test_a_workdir_given_relative_to_the_current_folder(checkpoints, monkeypatch):
    root, workdir, _ = checkpoints
    monkeypatch.chdir(os.path.dirname(workdir))
    relative = sample.Sampler.from_config(sample_config(), workdir=os.path.basename(workdir)).generate(PROMPTS[:1])
    absolute = sample.Sampler.from_config(sample_config(), workdir=workdir).generate(PROMPTS[:1])
    np.testing.assert_array_equal(relative.latents, absolute.latents)


def test_converted_folder_equals_the_workdirs_raw_parameters(checkpoints):
    root, workdir, folder = checkpoints
    config = sample_config()
    paths, from_folder, _ = sample.run(config, prompts=PROMPTS[:1], checkpoint=folder, out=str(root / "f.mp4"))
    assert paths == [str(root / "f.mp4")] and os.path.getsize(paths[0]) > 0
    raw = sample.Sampler.from_config(sample_config(use_ema=False), workdir=workdir).generate(PROMPTS[:1])
    ema = sample.Sampler.from_config(config, workdir=workdir).generate(PROMPTS[:1])
    np.testing.assert_allclose(from_folder.latents, raw.latents, atol=1e-6)
    assert np.abs(ema.latents - raw.latents).max() > 1e-3      # the EMA really is another set of parameters


@pytest.mark.parametrize("fields,kwargs,message", [
    (dict(frames=30), {}, r"frames must be 4k\+1 \(1, 5, 9, ...\), got 30; the nearest are 29 and 33"),
    (dict(height=40), {}, r"height must be a multiple of 16 \(VAE ×8, patch 2\), got 40; the nearest are 32 and 48"),
    (dict(colour="red"), {}, r"unknown sample config field\(s\) \['colour'\]"),
    ({}, dict(model=dict(guidance_embed=False)), r"this model has no guidance embedding .* --guidance=0"),
    ({}, dict(mesh=dict(ici=(1, 1, 8, 1))), r"12 image tokens .* sequence axis of size 8; sequence sizes that divide"),
    ({}, dict(out="clip.avi"), r"--out must name an \.mp4 file"),
    ({}, dict(prompts=[]), r"no prompt"),
    ({}, dict(checkpoint="elsewhere"), r"exactly one of --workdir, --checkpoint, --torch_weights"),
], ids=["frames", "height", "unknown-field", "guidance", "sequence-axis", "out", "no-prompt", "two-sources"])
def test_bad_requests_are_named_before_loading(checkpoints, fields, kwargs, message):
    _, workdir, _ = checkpoints
    config = sample_config()
    with config.unlocked():
        config.sample.update(fields)
        for section in ("model", "mesh"):
            config[section].update(kwargs.pop(section, {}))
    args = dict(dict(prompts=PROMPTS[:1], workdir=workdir, out="clip.mp4"), **kwargs)
    with pytest.raises(ValueError, match=message):
        sample.run(config, **args)


def test_long_prompt_warns_how_much_was_cut(checkpoints):
    root, workdir, _ = checkpoints
    long = "a red square moves left " * 3     # 72 bytes; the tiny text encoder keeps 32 tokens
    with pytest.warns(UserWarning, match=r"prompt 0 has 73 tokens with its template end; the text encoder keeps 32, "
                                         r"so this end was cut"):
        sample.run(sample_config(), prompts=[long], workdir=workdir, out=str(root / "long.mp4"))


def test_cli_exit_code_and_sentence_for_a_bad_size(checkpoints):
    _, workdir, _ = checkpoints
    # Without --config: the run's own config.json.
    proc = subprocess.run([sys.executable, "-m", "hyvideo_jax.sample", f"--workdir={workdir}", "--prompt=x",
                           "--frames=30"], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: frames must be 4k+1 (1, 5, 9, ...), got 30" in proc.stderr


def test_pytorch_weights_directly(checkpoints):
    """--torch_weights (a diffusers transformer folder) and --vae_weights (a diffusers VAE folder): the sampler runs
    the converted transformer on the sampler's noise and text, and decodes with that VAE."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo

    from hyvideo_jax.convert import load_torch_dit
    from hyvideo_jax.models.dit import HunyuanVideoDiT
    from tests.dit_reference import diffusers_dit
    root, _, _ = checkpoints
    diffusers_dit(seed=5).save_pretrained(root / "torch_dit")
    torch.manual_seed(0)
    AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1,
                              latent_channels=4).save_pretrained(root / "torch_vae")
    config = sample_config()
    _, result, sampler = sample.run(config, prompts=PROMPTS[:1], torch_weights=str(root / "torch_dit"),
                                    vae_weights=str(root / "torch_vae"), out=str(root / "t.mp4"))
    assert sampler.description.startswith("PyTorch weights")
    cfg, params = load_torch_dit(str(root / "torch_dit"), progress=False)
    text = sampler.text.encode_prompts(PROMPTS[:1])
    want = denoise(HunyuanVideoDiT(cfg), params, sampler.noise([0], result.latents.shape[1:]), *text,
                   steps=2, shift=7.0, guidance=config.sample.guidance, progress=False)
    np.testing.assert_allclose(result.latents, np.asarray(want), atol=1e-5)
    assert os.path.getsize(root / "t.mp4") > 0


def test_batches_and_single_frames(checkpoints):
    """Videos split into padded batches (batch_size 3 for 4 videos) equal one batch of 4; a 1-frame request (an
    image, the image template) decodes to one frame."""
    _, workdir, _ = checkpoints
    sampler = sample.Sampler.from_config(sample_config(videos_per_prompt=2), workdir=workdir)
    whole = sampler.generate(PROMPTS)
    split = sampler.generate(PROMPTS, batch_size=3)
    np.testing.assert_allclose(split.latents, whole.latents, atol=1e-5)
    assert split.seeds == whole.seeds == [0, 1, 2, 3]
    image = sampler.generate(PROMPTS[:1], frames=1)
    assert image.videos.shape == (2, 1, 32, 32, 3) and image.latents.shape == (2, 1, 4, 4, 4)
    assert np.abs(image.latents - whole.latents[:2, :1]).max() > 1e-3   # another template, another noise shape
