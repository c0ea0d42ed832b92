"""The train step (gradient accumulation, NaN guard, VAE objective) on one device, and the loop on 8 simulated
devices: the loss falls on a learnable problem, and a checkpoint written on mesh (8, 1, 1, 1) resumes on
(1, 2, 4, 1) with the same losses."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clu import metric_writers

from configs import tiny
from hyvideo_jax import train
from hyvideo_jax.data import pipeline
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh


def small_config(**train_overrides):
    """The tiny model on 8 random clips of one latent shape (16 image tokens: divisible by a sequence axis of 4)."""
    config = tiny.get_config()
    config.data.random_latent_shapes = ((2, 4, 8),)
    config.data.random_records = 8
    config.data.global_batch_size = 8
    config.train.update(train_overrides)
    return config


def one_device_step(config, state=None):
    """(train_step compiled on a one-device mesh, initial state (or `state` placed there), first batch)."""
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
    train_config = train.TrainConfig.from_config(config.train)
    task = train.OBJECTIVES[train_config.objective](config)
    tx = train.make_optimizer(train_config)
    if state is None:
        state = train.create_train_state(task, tx, train_config, mesh, jax.random.PRNGKey(0))
    else:
        state = jax.device_put(state, jax.devices()[0])
    step = train.CompiledStep(train.make_train_step(task, tx, train_config), mesh,
                              train.state_shardings(task, tx, train_config, mesh)[1])
    batch = next(pipeline.make_train_pipeline(config.data, 0, 1, seed=0))
    return step, state, step.global_batch({k: batch[k] for k in task.batch_keys})


def test_grad_accumulation_equals_large_batch_and_nan_is_skipped():
    config = small_config(grad_accum_steps=1, learning_rate=1e-2, ema_decay=0.5)
    step, state, batch = one_device_step(config)
    initial = jax.device_get(state)   # the step donates its input state
    rng = jax.random.PRNGKey(1)
    (one, m_one), _ = step(state, batch, rng)

    config4 = small_config(grad_accum_steps=4, learning_rate=1e-2, ema_decay=0.5)
    step4, state4, _ = one_device_step(config4, initial)
    (four, m_four), _ = step4(state4, batch, rng)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, four.params))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, initial.params))
    print(f"grad accumulation: loss {float(m_one['loss']):.7f} vs {float(m_four['loss']):.7f}, grad norm "
          f"{float(m_one['grad_norm']):.7f} vs {float(m_four['grad_norm']):.7f}, max param diff {max(diffs):.2e} "
          f"(update size {max(moved):.2e})")
    np.testing.assert_allclose(float(m_one["loss"]), float(m_four["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_one["grad_norm"]), float(m_four["grad_norm"]), rtol=1e-4)
    assert max(diffs) < 1e-5 and max(moved) > 1e-3
    np.testing.assert_allclose(jax.tree.leaves(four.ema_params)[0],
                               0.5 * jax.tree.leaves(initial.params)[0] + 0.5 * jax.tree.leaves(four.params)[0],
                               rtol=1e-6)

    # A NaN in one latent: the update is skipped (params, optimizer state and EMA unchanged), counted, and the
    # next finite batch trains as if the bad one had not been there, except for the step count.
    bad = dict(batch, latents=batch["latents"].at[3, 0, 0, 0, 0].set(jnp.nan))
    before = jax.device_get(one)
    (after_nan, m_nan), _ = step(one, bad, rng)
    assert not np.isfinite(float(m_nan["loss"])) and int(m_nan["skipped_steps"]) == 1
    assert int(after_nan.step) == 2 and int(after_nan.skipped) == 1
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.ema_params)),
                    jax.tree.leaves(jax.device_get((after_nan.params, after_nan.opt_state, after_nan.ema_params)))):
        np.testing.assert_array_equal(a, b)
    skipped_params = jax.device_get(after_nan.params)
    (after, m_after), _ = step(after_nan, batch, rng)
    print(f"NaN batch: skipped {int(m_nan['skipped_steps'])}, next loss {float(m_after['loss']):.5f}, "
          f"learning rate {float(m_after['learning_rate'])}")
    assert np.isfinite(float(m_after["loss"])) and int(after.skipped) == 1
    assert float(m_after["learning_rate"]) == pytest.approx(1e-2)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                            after.params, skipped_params))) > 1e-4


def test_vae_objective_trains_through_the_same_step():
    config = small_config(objective="vae", learning_rate=3e-3, grad_clip_norm=0.0)
    config.vae.loss.sample_posterior = False   # the posterior mean: a deterministic reconstruction to fit
    config.vae.loss.update(l1_weight=0.0, l2_weight=1.0)   # L1 stalls near 0.86 of its start: a thin margin
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
    train_config = train.TrainConfig.from_config(config.train)
    task = train.OBJECTIVES["vae"](config)
    tx = train.make_optimizer(train_config)
    state = train.create_train_state(task, tx, train_config, mesh, jax.random.PRNGKey(0))
    step = train.CompiledStep(train.make_train_step(task, tx, train_config), mesh,
                              train.state_shardings(task, tx, train_config, mesh)[1])
    # Smooth colour gradients: a signal a randomly initialized convolutional autoencoder can learn in a few steps.
    yy, xx = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    video = np.stack([np.stack([0.8 * xx, 0.8 * yy, 0.5 * xx * yy], -1), np.stack([0.8 * yy, -0.8 * xx, 0.3 + 0 * xx],
                                                                                    -1)])[:, None].astype(np.float32)
    losses = []
    for _ in range(15):
        (state, metrics), _ = step(state, step.global_batch({"video": video}), jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
    print("VAE losses through train_step:", [round(x, 4) for x in losses[::5]], "last", round(losses[-1], 4))
    assert np.mean(losses[-5:]) < 0.8 * losses[0]


def test_loss_falls_and_checkpoint_restores_on_another_mesh(tmp_path):
    config = small_config(num_steps=80, learning_rate=5e-3, checkpoint_every_steps=70, keep_checkpoints=2,
                          async_checkpointing=True)
    config.mesh.ici = (8, 1, 1, 1)
    workdir = str(tmp_path / "run")

    class Recorder(metric_writers.MetricWriter):   # a caller's writer (the demo's progress bar) gets the scalars
        def __init__(self):
            self.scalars = {}

        def write_scalars(self, step, scalars):
            self.scalars.setdefault(int(step), {}).update(scalars)

        write_summaries = write_images = write_videos = write_audios = write_texts = write_histograms = \
            write_hparams = flush = close = lambda self, *args, **kwargs: None
    recorder = Recorder()
    train.train_and_evaluate(config, workdir, writers=[recorder])
    metrics = train.read_metrics(workdir)
    losses = np.array([metrics[s]["loss"] for s in range(1, 81)])
    assert [s for s in sorted(recorder.scalars) if "loss" in recorder.scalars[s]] == \
        sorted(s for s in metrics if "loss" in metrics[s])
    np.testing.assert_allclose([recorder.scalars[s]["loss"] for s in range(1, 81)], losses, rtol=1e-6)
    ratio = losses[-10:].mean() / losses[:10].mean()
    print(f"loss: first 10 steps {losses[:10].mean():.4f}, last 10 {losses[-10:].mean():.4f}, ratio {ratio:.3f}; "
          f"step time {metrics[80]['step_time']:.3f} s, {metrics[80]['tokens_per_second']:.0f} tokens/s, "
          f"compile {metrics[80]['compile_seconds']:.1f} s")
    assert ratio < 0.8

    # Resume step 70's checkpoint on mesh (1, 2, 4, 1): batch over data x fsdp, image tokens over 'sequence'.
    moved = str(tmp_path / "reshaped")
    os.makedirs(os.path.join(moved, "checkpoints"))
    shutil.copytree(os.path.join(workdir, "checkpoints", "70"), os.path.join(moved, "checkpoints", "70"))
    config.mesh.ici = (1, 2, 4, 1)
    state = train.train_and_evaluate(config, moved)
    assert dict(jax.tree.leaves(state.params)[0].sharding.mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4,
                                                                          "tensor": 1}
    resumed = train.read_metrics(moved)
    assert sorted(resumed) == list(range(71, 81))
    reshaped = np.array([resumed[s]["loss"] for s in range(71, 81)])
    print("losses after step 70, mesh (8,1,1,1) vs (1,2,4,1): max relative difference "
          f"{np.max(np.abs(reshaped - losses[70:]) / losses[70:]):.2e}")
    np.testing.assert_allclose(reshaped, losses[70:], rtol=1e-4)


@pytest.mark.parametrize("section,field,value", [
    ("train", "grad_accum_steps", 3),          # does not divide the batch of 8
    ("train", "lr_schedule", "linear"),
    ("train", "objective", "gan"),
    ("mesh", "ici", (3, 1, 1, 1)),
    ("flow", "sigma_density", "beta"),
    ("data", "global_batch_size", 4),          # does not divide over 8 batch devices
])
def test_invalid_config_names_the_field(section, field, value):
    config = small_config()
    config[section][field] = value
    with pytest.raises(ValueError, match=f"{section}.{field}|{field}"):
        train.validate_config(config)
