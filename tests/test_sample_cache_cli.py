"""Cached sampling the way a user runs it: the sampling command line (`hyvideo_jax.sample`'s main on parsed flags, in
this process so that it shares compiled programs) on a converted checkpoint of the tiny model. `--calibrate_mag`
writes the ratios JSON, `--cache=mag --mag_ratios_file` reads it, `--cache=first_block`; the steps computed it
prints and the latents it saves equal `denoise_cached` called directly on the same noise and text, and threshold 0
equals the uncached sampler exactly."""

import json
import os
import re

import jax
import numpy as np
import pytest

from configs import tiny
from hyvideo_jax import sample, sample_cache
from hyvideo_jax.convert.flax_io import save_flax_model
from hyvideo_jax.denoise import latent_shape
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red square moves left"
FRAMES = 1   # one latent frame (the image template): the VAE decodes one tile, quick to compile
FIRST_BLOCK_THRESHOLD = 0.9   # the random tiny model's first-block changes: some steps computed, some cached
MAG_THRESHOLD = 0.5


def random_params(cfg: DiTConfig, seed: int = 0):
    """Random parameters drawn with NumPy at the model's shapes (no per-leaf compilation): N(0, 0.2²), scales
    around 1."""
    import flax.linen as nn

    from tests.test_dit_model import example_inputs
    shapes = jax.eval_shape(lambda: HunyuanVideoDiT(cfg).init(jax.random.PRNGKey(0), *example_inputs(cfg)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes["params"]))
    rng = np.random.default_rng(seed)
    draw = lambda path, x: (rng.standard_normal(x.shape) * 0.2 + (path[-1].key == "scale")).astype(x.dtype)  # noqa
    return jax.tree_util.tree_unflatten(tree, [draw(path, x) for path, x in leaves])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_cache_cli")
    cfg = DiTConfig.from_config(tiny.get_config().model)
    return root, save_flax_model(str(root / "dit"), "dit", cfg.to_dict(), random_params(cfg))


@pytest.fixture(scope="module")
def cli():
    """`main` of the sampling command on a command line: (exit code, stderr). Its flags are defined for this module
    and removed after. The random text encoders and VAE of configs/tiny.py (the same weights for the same config
    and seed) are built once for all runs: building them dominated the test's time."""
    from absl import flags

    from tests.cli_runs import encoders_built_once
    before = set(flags.FLAGS)
    sample.define_flags()
    patch = encoders_built_once()

    def run(args, capsys):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["sample", f"--config={ROOT}/configs/tiny.py", *args])
        capsys.readouterr()
        code = sample.main(["sample"])
        return code, capsys.readouterr().err
    yield run
    patch.undo()
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)


def computed_line(stderr: str) -> str:
    return re.search(r"cache \w+: steps computed per batch (.*)", stderr).group(1)


def test_calibrate_then_sample_with_each_cache(checkpoint, cli, capsys):
    root, folder = checkpoint
    ratios_file = str(root / "dit" / sample_cache.RATIOS_FILE)
    config = tiny.get_config()
    config.sample.update(frames=FRAMES, progress=False)
    sc = sample.SampleConfig.from_config(config.sample)
    # 1. what `--calibrate_mag=FILE` runs: every step computed, the JSON written for this size and step count
    _, calibrated, sampler = sample.run(config, prompts=[PROMPT], checkpoint=folder, out=f"{root}/calibrate.mp4",
                                        calibrate_mag=ratios_file)
    key = sample_cache.ratios_key(sc.height, sc.width, sc.frames, sc.steps)
    written = json.loads(open(ratios_file).read())
    assert list(written["ratios"]) == [key] and written["model"].startswith("converted")
    ratios = written["ratios"][key]["mag_ratios"]
    assert calibrated.computed.all() and np.array_equal(np.float32(ratios), calibrated.mag_ratios[0])
    # the same inputs directly: the sampler's noise and text embeddings, on its mesh
    latent = latent_shape(sc.frames, sc.height, sc.width, sampler.dit_config, sampler.vae_config)
    inputs = (sampler.model, sampler.params, sampler.noise([sc.seed], latent),
              *sampler.text.encode_prompts([PROMPT], mode="video" if FRAMES > 1 else "image"))
    kw = dict(steps=sc.steps, shift=sc.shift, guidance=sc.guidance, mesh=sampler.mesh, rules=sampler.rules)
    direct = sample_cache.calibrate_mag_ratios(*inputs, **kw)
    assert np.array_equal(np.float32(ratios), direct.ratios[0]) and np.abs(direct.ratios - 1).max() > 0.05

    # 2. the command line with --cache=mag --mag_ratios_file: the steps it prints and the latents it saves
    code, err = cli([f"--checkpoint={folder}", f"--prompt={PROMPT}", f"--frames={FRAMES}", "--cache=mag",
                     f"--mag_ratios_file={ratios_file}", f"--cache_threshold={MAG_THRESHOLD}", "--mag_max_skip_steps=2",
                     "--save_latents", f"--out={root}/mag.mp4"], capsys)
    assert code == 0, err
    mag = sample_cache.CacheConfig(kind="mag", threshold=MAG_THRESHOLD, mag_max_skip_steps=2, mag_ratios=ratios)
    want = sample_cache.denoise_cached(*inputs, cache=mag, **kw)
    n = int(want.computed.sum())
    line = re.search(r"cache mag: steps computed per batch (.*)", err).group(1)
    assert line == f"prompt {n}/{sc.steps}" and 2 < n < sc.steps
    np.testing.assert_array_equal(np.load(f"{root}/mag.npy"), np.asarray(want.latents)[0])

    # 3. Sampler.generate with the first-block cache: its pattern and latents as directly
    got = sampler.generate([PROMPT], cache="first_block", cache_threshold=FIRST_BLOCK_THRESHOLD)
    want_fb = sample_cache.denoise_cached(
        *inputs, cache=sample_cache.CacheConfig(kind="first_block", threshold=FIRST_BLOCK_THRESHOLD), **kw)
    assert got.computed.shape == (1, 1, sc.steps) and np.array_equal(got.computed[0], want_fb.computed)
    assert 2 < want_fb.computed.sum() < sc.steps
    np.testing.assert_array_equal(got.latents, np.asarray(want_fb.latents))
    # threshold 0: every step computed, exactly the uncached sampler
    plain = sampler.generate([PROMPT])
    zero = sampler.generate([PROMPT], cache="first_block", cache_threshold=0.0)
    assert plain.computed is None and zero.computed.all()
    np.testing.assert_array_equal(zero.latents, plain.latents)
    print(f"MagCache ratios {np.round(ratios, 3).tolist()}; --cache=mag: {line} ({want.summary()} directly); "
          f"first_block {FIRST_BLOCK_THRESHOLD}: {got.computed.sum()}/{sc.steps} ({want_fb.summary()} directly)")
