"""Training numerics: fp32 master parameters with bf16 compute track an all-fp32 run, optimizer moments, gradient
accumulators and the EMA are fp32, weight decay reaches kernels only, and the presets train the way the released
model should be fine-tuned."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import hunyuan_video_13b, tiny
from hyvideo_jax import train
from hyvideo_jax.models.vae import VAEConfig, init_params as vae_init
from hyvideo_jax.text import TextEncoders
from tests.test_dit_model import example_inputs, random_init, tiny_config
from tests.test_train import one_device_step, small_config


def random_state(config):
    """A fresh TrainState whose parameters are all random (the real init zeroes the modulation and output layers,
    which leaves most kernels without gradient at first)."""
    from hyvideo_jax.models.dit import DiTConfig
    train_config = train.TrainConfig.from_config(config.train)
    cfg = DiTConfig.from_config(config.model)
    params = jax.tree.map(lambda p: 0.2 * p, random_init(cfg, example_inputs(cfg)))
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=train.make_optimizer(train_config).init(params),
                            ema_params=jax.tree.map(jnp.array, params) if train_config.ema_decay > 0 else None,
                            skipped=jnp.zeros((), jnp.int32))


def run_steps(config, steps: int, state=None):
    """(losses, final state, initial state as host arrays) of `steps` train steps on one device, same batch, from
    `state` (default: all parameters random)."""
    step, state, batch = one_device_step(config, random_state(config) if state is None else state)
    initial = jax.device_get(state)
    losses = []
    for _ in range(steps):
        (state, metrics), _ = step(state, batch, jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state), initial


def float_dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_mixed_precision_tracks_fp32_and_keeps_fp32_state():
    """The 13B preset's dtypes (fp32 parameters, bf16 compute) on the tiny model: 20 AdamW steps follow an all-fp32
    run from the same start; moments and EMA are fp32."""
    preset = hunyuan_video_13b.get_config().model
    assert (preset.param_dtype, preset.dtype) == ("float32", "bfloat16")
    kw = dict(learning_rate=1e-3, ema_decay=0.9999, weight_decay=0.01)
    mixed_config = small_config(**kw)
    mixed_config.model.update(param_dtype=preset.param_dtype, dtype=preset.dtype)
    fp32, fp32_state, initial = run_steps(small_config(**kw), 20)
    mixed, mixed_state, _ = run_steps(mixed_config, 20, initial)
    loss_gap = max(abs(a - b) / b for a, b in zip(mixed, fp32))
    # How far the mixed run's parameters are from the fp32 run's, relative to how far training moved them (global
    # norms: Adam's normalised steps make single near-zero-gradient entries noisy either way).
    gap = optax.tree.norm(jax.tree.map(np.subtract, mixed_state.params, fp32_state.params))
    moved = optax.tree.norm(jax.tree.map(np.subtract, fp32_state.params, initial.params))
    print(f"20 steps: fp32 loss {fp32[0]:.4f} → {fp32[-1]:.4f}, bf16 compute {mixed[0]:.4f} → {mixed[-1]:.4f}; "
          f"max relative loss gap {loss_gap:.2e}; parameters: |mixed − fp32| / |fp32 − initial| = "
          f"{float(gap / moved):.2e}")
    assert loss_gap < 1e-2 and gap < 0.1 * moved and fp32[-1] < fp32[0]
    assert mixed != fp32                     # the mixed run really computed in bf16
    for state in (fp32_state, mixed_state):
        assert float_dtypes(state.params) == float_dtypes(state.opt_state) == float_dtypes(state.ema_params) \
            == {"float32"}
    # An EMA at 0.9999 moves in fp32 (in bf16 an increment of 1e-4 × the update is rounded away).
    ema_moved = [float(np.abs(e - p).max()) for e, p in
                 zip(jax.tree.leaves(mixed_state.ema_params), jax.tree.leaves(initial.params))]
    assert np.mean([m > 0 for m in ema_moved]) > 0.9


def test_a_small_update_changes_the_weights():
    """lr 1e-5: one AdamW step moves nearly every kernel entry (bf16 storage would round most updates away)."""
    config = small_config(learning_rate=1e-5)
    _, state, initial = run_steps(config, 1)
    kernels = [(a, b) for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                               jax.tree.leaves(initial.params)) if path[-1].key == "kernel"]
    changed = np.mean(np.concatenate([(a != b).ravel() for a, b in kernels]))
    in_bf16 = np.mean(np.concatenate([(a.astype(jnp.bfloat16) != b.astype(jnp.bfloat16)).ravel()
                                      for a, b in kernels]))
    print(f"lr 1e-5, one step: {100 * changed:.1f}% of kernel entries changed in fp32, {100 * in_bf16:.1f}% would "
          f"in bf16")
    assert changed > 0.95 and in_bf16 < 0.5


def test_gradient_accumulators_are_fp32():
    """With bf16 compute and 4 micro-batches, the carry of the accumulation scan is fp32."""
    config = small_config(grad_accum_steps=4)
    config.model.dtype = "bfloat16"
    step, state, batch = one_device_step(config)
    jaxpr = jax.make_jaxpr(step.jitted)(state, batch, jax.random.PRNGKey(0))

    def scans(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan" and eqn.params["length"] == 4:
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from scans(sub)
    (accumulate,) = [eqn for eqn in scans(jaxpr.jaxpr) if eqn.params["num_carry"] > 10]
    start = accumulate.params["num_consts"]
    carry = [v.aval.dtype for v in accumulate.invars[start:start + accumulate.params["num_carry"]]]
    assert len(carry) >= len(jax.tree.leaves(state.params)) and set(map(str, carry)) == {"float32"}


def test_weight_decay_reaches_kernels_only():
    """Zero gradients and weight decay: every kernel shrinks by (1 − lr·wd); no bias, norm scale or embedding
    moves, leaf by leaf over the scanned DiT, the VAE and a text encoder."""
    cfg = tiny_config()
    vae_config = VAEConfig.from_config(tiny.get_config().vae.model)
    text = TextEncoders.demo(32, 24)
    params = {"dit": random_init(cfg, example_inputs(cfg)), "vae": vae_init(vae_config, jax.random.PRNGKey(0)),
              "llm": text.llm_params, "clip": text.clip_params}
    lr, wd = 0.1, 0.5
    tx = train.make_optimizer(train.TrainConfig(learning_rate=lr, weight_decay=wd, grad_clip_norm=0.0))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    names = set()
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new)):
        name = path[-1].key
        names.add(name)
        if name == "kernel":
            np.testing.assert_allclose(after, before * (1 - lr * wd), rtol=1e-6, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
    assert {"kernel", "bias", "scale"} <= names and any("embedding" in name for name in names)
    # stacked (scanned) biases and norm scales have rank >= 2, the case a rank rule gets wrong
    assert params["dit"]["double_blocks"]["img_attn_qkv"]["bias"].ndim >= 2


def test_presets_fine_tune_the_distilled_model_correctly():
    """The 13B preset validates (constant guidance 1.0, fp32 masters); a guidance range without a CFG teacher and
    bf16-stored parameters for training are refused with a sentence."""
    config = hunyuan_video_13b.get_config()
    config.data.path = "gs://bucket/clips"   # the one field a user must fill in
    sections = train.validate_config(config)
    assert sections["flow"].guidance == 1.0 and sections["flow"].guidance_range == ()
    config.flow.guidance_range = (1.0, 8.0)
    with pytest.raises(ValueError, match=r"flow.guidance_range .* needs a distillation objective whose target comes "
                                         r"from a CFG teacher"):
        train.validate_config(config)
    config = small_config()
    config.model.param_dtype = "bfloat16"
    with pytest.raises(ValueError, match=r"model.param_dtype: training keeps fp32 master parameters"):
        train.validate_config(config)
