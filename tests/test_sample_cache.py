"""Cached sampling (`hyvideo_jax.sample_cache`) against diffusers' FirstBlockCache and MagCache hooks on
HunyuanVideoPipeline: the same tiny transformer, embeddings, noise and thresholds give the same per-step
computed/cached pattern in each branch (prompt, negative prompt) and the same final latents; our MagCache
calibration equals the hook's calibration mode; the cached sampler on 8 simulated devices equals one device."""

import contextlib
import io

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, apply_first_block_cache, apply_mag_cache

from hyvideo_jax import sample_cache
from hyvideo_jax.convert import load_torch_dit
from hyvideo_jax.models.dit import HunyuanVideoDiT
from tests.dit_reference import TINY, diffusers_dit, relative_error
from tests.test_sample import LATENT, conditioning

STEPS, SHIFT, SCALE = 20, 7.0, 2.0
GUIDANCE = 6.016   # diffusers' fp32 guidance × 1000 is then the bf16-rounded 6016 that ours feeds (test_sample.py)


def make_setup():
    """(diffusers transformer, our model, converted params, noise, prompt triple, negative triple), torch inputs."""
    transformer = diffusers_dit(seed=3)
    cfg, params = load_torch_dit(transformer.state_dict(), config=dict(rope_axes_dim=TINY["rope_axes_dim"]),
                                 progress=False)
    noise = torch.randn(2, TINY["in_channels"], *LATENT, generator=torch.Generator().manual_seed(2))
    return transformer, HunyuanVideoDiT(cfg), params, noise, conditioning(4, valid=(5, 2)), conditioning(5, (3, 3))


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def diffusers_run(setup, hook, true_cfg: bool):
    """diffusers' pipeline with a cache hook applied to a fresh copy of the transformer: (latents channel-last,
    computed [branches, steps] bool, stdout). A step computed = the tail block (last single block) ran."""
    transformer, _, _, noise, cond, negative = setup
    fresh = diffusers_dit(seed=3)
    fresh.load_state_dict(transformer.state_dict())
    hook(fresh)
    calls = []
    fresh.register_forward_pre_hook(lambda *_: calls.append(False))
    fresh.single_transformer_blocks[-1].attn.register_forward_hook(lambda *_: calls.__setitem__(-1, True))
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=fresh, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    kw = {}
    if true_cfg:
        kw = dict(negative_prompt_embeds=negative[0], negative_prompt_attention_mask=negative[1],
                  negative_pooled_prompt_embeds=negative[2], true_cfg_scale=SCALE)
    out = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(out):
        latents = pipe(prompt_embeds=cond[0], prompt_attention_mask=cond[1], pooled_prompt_embeds=cond[2],
                       latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       output_type="latent", return_dict=False, **kw)[0]
    branches = 2 if true_cfg else 1
    computed = np.array(calls).reshape(STEPS, branches).T
    return latents.permute(0, 2, 3, 4, 1).numpy(), computed, out.getvalue()


def ours(setup, cache, true_cfg: bool, **kw):
    _, model, params, noise, cond, negative = setup
    np_ = lambda ts: tuple(t.numpy() for t in ts)  # noqa: E731
    return sample_cache.denoise_cached(
        model, params, noise.permute(0, 2, 3, 4, 1).numpy(), *np_(cond), steps=STEPS, shift=SHIFT, guidance=6.0,
        cache=cache, negative=np_(negative) if true_cfg else None, true_cfg_scale=SCALE if true_cfg else 1.0, **kw)


def pattern(computed) -> str:
    return " | ".join("".join("x" if c else "." for c in row) for row in computed)


def calibration_lists(stdout: str) -> np.ndarray:
    """The ratio lists MagCache's calibration mode prints (one per cache context), [contexts, steps]."""
    import ast
    return np.array([ast.literal_eval(line) for line in stdout.splitlines()
                     if line.startswith("[") and not line.startswith("[MagCache]")])


@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true_cfg"])
def test_first_block_cache_equals_diffusers(setup, true_cfg):
    """Thresholds 0.3 / 0.4 / 0.5 give three different patterns; under true CFG the two branches differ at 0.4."""
    seen = set()
    for threshold in (0.3, 0.4, 0.5):
        hook = lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold))  # noqa: E731
        ref, want, _ = diffusers_run(setup, hook, true_cfg)
        got = ours(setup, sample_cache.CacheConfig(kind="first_block", threshold=threshold), true_cfg)
        err = relative_error(got.latents, ref)
        print(f"first_block {threshold} {'true CFG' if true_cfg else ''}: {pattern(got.computed)} "
              f"(diffusers {pattern(want)}), relative max error {err:.2e}")
        assert got.computed.shape == want.shape and (got.computed == want).all()
        assert err <= 1e-4
        seen.add(pattern(want))
    assert len(seen) == 3 and all("." in p for p in seen)


def test_first_block_threshold_zero_is_the_uncached_sampler(setup):
    from hyvideo_jax import sample
    _, model, params, noise, cond, _ = setup
    x = noise.permute(0, 2, 3, 4, 1).numpy()
    plain = sample.denoise(model, params, x, *(t.numpy() for t in cond), steps=STEPS, shift=SHIFT, guidance=6.0,
                           progress=False)
    got = ours(setup, sample_cache.CacheConfig(kind="first_block", threshold=0.0), False)
    assert got.computed.all() and np.array_equal(np.asarray(got.latents), np.asarray(plain))


@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true_cfg"])
def test_mag_cache_calibration_and_skips_equal_diffusers(setup, true_cfg):
    """Calibration: the hook's printed ratios (per context) against ours. Then the hook with those ratios at three
    (threshold, K) settings against ours with the same ratios: same patterns and latents."""
    hook = lambda m: apply_mag_cache(m, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))  # noqa: E731
    _, computed, stdout = diffusers_run(setup, hook, true_cfg)
    want = calibration_lists(stdout)
    got = ours(setup, sample_cache.CacheConfig(kind="mag"), true_cfg, calibrate=True)
    err = float(np.abs(got.ratios - want).max())
    print(f"MagCache calibration {'true CFG' if true_cfg else ''}: max |ours − diffusers| {err:.2e} "
          f"(ratios {np.round(got.ratios[0], 3).tolist()})")
    assert computed.all() and got.computed.all() and want.shape == got.ratios.shape and err <= 1e-4
    assert want[0, 0] == 1.0 and np.abs(want - 1).max() > 0.05
    ratios = [float(r) for r in want[0]]
    seen = set()
    for threshold, k in ((0.06, 3), (0.1, 2), (0.3, 4)):
        hook = lambda m: apply_mag_cache(m, MagCacheConfig(  # noqa: E731
            threshold=threshold, max_skip_steps=k, num_inference_steps=STEPS, mag_ratios=ratios))
        ref, want_computed, _ = diffusers_run(setup, hook, true_cfg)
        got = ours(setup, sample_cache.CacheConfig(kind="mag", threshold=threshold, mag_max_skip_steps=k,
                                                   mag_ratios=ratios), true_cfg)
        err = relative_error(got.latents, ref)
        print(f"mag {threshold} K={k}: {pattern(got.computed)} (diffusers {pattern(want_computed)}), "
              f"relative max error {err:.2e}")
        assert (got.computed == want_computed).all() and err <= 1e-4
        seen.add(pattern(want_computed))
    assert len(seen) == 3


def test_mag_ratios_interpolation_and_file(tmp_path, setup):
    from diffusers.hooks.mag_cache import nearest_interp
    src = [1.0, 1.2, 0.9, 1.05, 0.97, 1.1, 0.8]
    for n in (1, 4, 7, 12, 20):
        assert np.array_equal(sample_cache.nearest_interp(src, n), nearest_interp(torch.tensor(src), n).numpy())
    got = ours(setup, sample_cache.CacheConfig(kind="mag"), True, calibrate=True)
    path = tmp_path / "ckpt" / sample_cache.RATIOS_FILE
    sample_cache.write_mag_ratios(path, got, height=32, width=48, frames=5, steps=STEPS, model="tiny")
    read = sample_cache.read_mag_ratios(path, height=32, width=48, frames=5, steps=STEPS)
    assert np.array_equal(np.float32(read), got.ratios[0])
    assert sample_cache.read_mag_ratios(path, height=32, width=48, frames=5, steps=30) == read   # nearest step count
    with pytest.raises(ValueError, match="none for 64x48x5"):
        sample_cache.read_mag_ratios(path, height=64, width=48, frames=5, steps=STEPS)


# --------------------------------------------------------------------------------------- sharded (acceptance 5)
SHARDED_LATENT = (2, 4, 8)   # 16 image tokens: split over sequence axes of 4 and 8


@pytest.mark.parametrize("shape,method", [((1, 1, 8, 1), "ring"), ((1, 2, 4, 1), "ulysses")],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_sharded_cached_sampler_equals_one_device(shape, method):
    import dataclasses

    import jax

    from hyvideo_jax.models.dit import example_inputs
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    from hyvideo_jax.parallel.sharding import param_targets, place_params
    from tests.test_dit_model import random_init, tiny_config
    cfg = tiny_config(depth_double=2, depth_single=2, depth_refiner=1)
    params = jax.tree.map(np.asarray, random_init(cfg, example_inputs(cfg)))
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((2, *SHARDED_LATENT, cfg.in_channels)).astype(np.float32)
    cond = (rng.standard_normal((2, 5, cfg.text_states_dim)).astype(np.float32),
            np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
            rng.standard_normal((2, cfg.pooled_text_dim)).astype(np.float32))
    negative = (rng.standard_normal((1, 5, cfg.text_states_dim)).astype(np.float32), np.array([[1, 1, 0, 0, 0]]),
                rng.standard_normal((1, cfg.pooled_text_dim)).astype(np.float32))
    sharded_cfg = dataclasses.replace(cfg, sequence_parallel=method)
    mesh = create_mesh(MeshConfig(ici=shape))
    placed = place_params(params, param_targets(HunyuanVideoDiT(sharded_cfg), example_inputs(cfg), mesh)[1])
    caches = (sample_cache.CacheConfig(kind="first_block", threshold=FIRST_BLOCK_SHARDED),
              sample_cache.CacheConfig(kind="mag", threshold=0.2, mag_ratios=MAG_SHARDED))
    for cache in caches:
        run = lambda m, p, mesh=None: sample_cache.denoise_cached(  # noqa: E731
            m, p, noise, *cond, steps=8, shift=7.0, guidance=6.0, cache=cache, negative=negative,
            true_cfg_scale=2.5, mesh=mesh)
        want, got = run(HunyuanVideoDiT(cfg), params), run(HunyuanVideoDiT(sharded_cfg), placed, mesh)
        err = relative_error(got.latents, np.asarray(want.latents))
        print(f"mesh {shape} {method} {cache.kind}: {pattern(got.computed)} (one device {pattern(want.computed)}), "
              f"relative max error {err:.2e}")
        assert (got.computed == want.computed).all() and "." in pattern(want.computed)
        assert err <= 1e-5


FIRST_BLOCK_SHARDED = 1.0   # the random tiny model: the two branches decide differently
MAG_SHARDED = (1.0, 1.05, 0.98, 1.02, 1.01, 0.99, 1.03, 0.97)
