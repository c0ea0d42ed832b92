"""Cached sampling (`hyvideo_jax.sample_cache`) against diffusers' FirstBlockCache and MagCache hooks on
HunyuanVideoPipeline: the same tiny transformer, embeddings, noise and thresholds give the same per-step
computed/cached pattern in each branch (prompt, negative prompt) and the same final latents; our MagCache
calibration equals the hook's calibration mode; the cached sampler on 8 simulated devices equals one device.

Kept cheap: one tiny pipeline and its converted parameters for the whole file, 10 steps (enough for three different
patterns per cache), one compiled cached loop per (cache kind, branch count) reused across thresholds and settings
(and by the sharded test's one-device runs), MagCache checked under true CFG only (which runs both branches)."""

import contextlib
import copy
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

STEPS, SHIFT, SCALE = 10, 7.0, 2.0
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
    """The tiny pipeline's parts; torch on one thread meanwhile: these models are too small to gain from a second,
    and on a busy 2-core machine torch's threads waiting for XLA's made a 10-step run take 1-15 s instead of 0.2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_setup()
    torch.set_num_threads(threads)


def diffusers_run(setup, hook, true_cfg: bool):
    """diffusers' pipeline with a cache hook applied to a fresh copy of the transformer: (latents channel-last,
    computed [branches, steps] bool, stdout). A step computed = the tail block (last single block) ran."""
    transformer, _, _, noise, cond, negative = setup
    fresh = copy.deepcopy(transformer)
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


FIRST_BLOCK_THRESHOLDS = (0.35, 0.4, 0.45)   # 10 steps: three patterns; under true CFG the branches differ at 0.4
MAG_SETTINGS = ((0.1, 2), (0.2, 2), (0.3, 4))   # (threshold, K): three patterns with the calibrated ratios


@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true_cfg"])
def test_first_block_cache_equals_diffusers(setup, true_cfg):
    """Three thresholds, three different patterns (some steps cached in each), equal to the hook's step by step and
    branch by branch, latents within 1e-4; every threshold runs the same compiled program."""
    seen, compiled = set(), None
    for threshold in FIRST_BLOCK_THRESHOLDS:
        hook = lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold))  # noqa: E731
        ref, want, _ = diffusers_run(setup, hook, true_cfg)
        got = ours(setup, sample_cache.CacheConfig(kind="first_block", threshold=threshold), true_cfg)
        err = relative_error(got.latents, ref)
        print(f"first_block {threshold} {'true CFG' if true_cfg else ''}: {pattern(got.computed)} "
              f"(diffusers {pattern(want)}), relative max error {err:.2e}")
        assert got.computed.shape == want.shape and (got.computed == want).all()
        assert err <= 1e-4
        seen.add(pattern(want))
        compiled = compiled or sample_cache._cached_loop._cache_size()
        assert sample_cache._cached_loop._cache_size() == compiled   # no recompilation for another threshold
    assert len(seen) == 3 and all("." in p for p in seen)
    if true_cfg:
        assert any(len(set(p.split(" | "))) == 2 for p in seen)   # the two branches decided differently


def test_first_block_threshold_zero_is_the_uncached_sampler(setup):
    from hyvideo_jax.denoise import denoise
    _, model, params, noise, cond, _ = setup
    x = noise.permute(0, 2, 3, 4, 1).numpy()
    plain = denoise(model, params, x, *(t.numpy() for t in cond), steps=STEPS, shift=SHIFT, guidance=6.0,
                    progress=False)
    got = ours(setup, sample_cache.CacheConfig(kind="first_block", threshold=0.0), False)
    assert got.computed.all() and np.array_equal(np.asarray(got.latents), np.asarray(plain))


def test_mag_cache_calibration_and_skips_equal_diffusers(setup):
    """Under true CFG (both cache contexts): calibration, the hook's printed ratios per context against ours. Then
    the hook with the prompt's ratios at three (threshold, K) settings against ours with the same ratios: same
    patterns and latents."""
    hook = lambda m: apply_mag_cache(m, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))  # noqa: E731
    _, computed, stdout = diffusers_run(setup, hook, True)
    want = calibration_lists(stdout)
    got = ours(setup, sample_cache.CacheConfig(kind="mag"), True, calibrate=True)
    err = float(np.abs(got.ratios - want).max())
    print(f"MagCache calibration: max |ours − diffusers| {err:.2e} (ratios {np.round(got.ratios, 3).tolist()})")
    assert computed.all() and got.computed.all() and want.shape == got.ratios.shape == (2, STEPS) and err <= 1e-4
    assert (want[:, 0] == 1.0).all() and np.abs(want - 1).max() > 0.05 and np.abs(want[0] - want[1]).max() > 1e-3
    ratios = [float(r) for r in want[0]]
    seen = set()
    for threshold, k in MAG_SETTINGS:
        hook = lambda m: apply_mag_cache(m, MagCacheConfig(  # noqa: E731
            threshold=threshold, max_skip_steps=k, num_inference_steps=STEPS, mag_ratios=ratios))
        ref, want_computed, _ = diffusers_run(setup, hook, True)
        got = ours(setup, sample_cache.CacheConfig(kind="mag", threshold=threshold, mag_max_skip_steps=k,
                                                   mag_ratios=ratios), True)
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
SHARDED_MESH = (1, 2, 4, 1)   # fsdp 2 (one sample per device pair) × sequence 4 (Ulysses: 4 heads, 12 image tokens)


def test_sharded_cached_sampler_equals_one_device(setup):
    """Both caches under true CFG on 8 simulated devices (the batch over fsdp, image tokens over a Ulysses sequence
    axis: the decision's mean and the calibration norms reduce across devices) against one device (the programs of
    the tests above): the same patterns, with steps cached and the branches deciding differently, and latents."""
    import dataclasses

    from hyvideo_jax.models.dit import example_inputs
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    from hyvideo_jax.parallel.sharding import param_targets, place_params
    _, model, params, _, _, _ = setup
    sharded = HunyuanVideoDiT(dataclasses.replace(model.config, sequence_parallel="ulysses"))
    mesh = create_mesh(MeshConfig(ici=SHARDED_MESH))
    assert mesh.devices.size == 8
    placed = place_params(params, param_targets(sharded, example_inputs(model.config), mesh)[1])
    sharded_setup = (None, sharded, placed, *setup[3:])
    calibration = ours(setup, sample_cache.CacheConfig(kind="mag"), True, calibrate=True)
    caches = (sample_cache.CacheConfig(kind="first_block", threshold=FIRST_BLOCK_THRESHOLDS[1]),
              sample_cache.CacheConfig(kind="mag", threshold=MAG_SETTINGS[0][0], mag_max_skip_steps=MAG_SETTINGS[0][1],
                                       mag_ratios=calibration.ratios[0]))
    for cache in caches:
        want, got = ours(setup, cache, True), ours(sharded_setup, cache, True, mesh=mesh)
        err = relative_error(got.latents, np.asarray(want.latents))
        print(f"mesh {SHARDED_MESH} ulysses {cache.kind}: {pattern(got.computed)} (one device "
              f"{pattern(want.computed)}), relative max error {err:.2e}")
        assert (got.computed == want.computed).all() and "." in pattern(want.computed)
        assert err <= 1e-5
    got = ours(sharded_setup, sample_cache.CacheConfig(kind="mag"), True, calibrate=True, mesh=mesh)
    assert np.abs(got.ratios - calibration.ratios).max() <= 1e-5
