"""Image-to-video training (model.image_condition_type): synthetic videos prepared with the I2V config hold each
clip's first frame encoded alone and image-conditioned text states; the flow objective keeps frame 0 clean (the
image latent) and out of the loss, equals a computation written here from the model and jnp, trains (the loss
falls), resumes exactly, and gives the same step sharded over 8 devices as on one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny_i2v
from hyvideo_jax import train
from hyvideo_jax.data import pipeline, prepare, synthetic
from hyvideo_jax.data.pipeline import ArrayRecordClipSource
from hyvideo_jax.models.dit import DiTConfig
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from tests.test_dit_model import example_inputs, random_init

LATENT_SHAPE = (2, 4, 4)   # 5 frames at 32x32 pixels: 16 image tokens, 8 of them after frame 0
STEPS = 20


def i2v_config(clips: str, kind: str = "token_replace"):
    """configs/tiny_i2v.py reading the prepared `clips`: 8 synthetic 5-frame 32x32 clips, the captions' words as
    whole tokens (a caption fits the 20 text tokens left after the image tokens and the assistant header)."""
    config = tiny_i2v.get_config(kind)
    config.text.words = synthetic.vocabulary()
    config.data.update(source="arrayrecord", path=clips, global_batch_size=8)
    config.data.prepare.update(buckets=((5, 32, 32),), vae_batch_size=8, records_per_shard=8)
    config.data.synthetic.update(num_videos=8, sizes=((32, 32),), frames=(5,), fps=8.0)
    config.flow.logit_std = 0.5   # σ away from 0 and 1: the model's prediction matters in every sample
    config.train.learning_rate = 3e-3
    return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(config, ClipEncoder, videos folder) after preparing the synthetic videos through the I2V path."""
    folder = tmp_path_factory.mktemp("i2v")
    clips = str(folder / "clips")
    config = i2v_config(clips)
    captions = synthetic.write_dataset(str(folder / "videos"), config.data.synthetic)
    encoder = prepare.ClipEncoder(config)
    summary = prepare.prepare_videos(os.path.dirname(captions), captions, clips, config, progress=False,
                                     encoder=encoder)
    assert summary["written"] == 8 and not summary["skipped"]
    return config, encoder, os.path.dirname(captions)


@pytest.fixture(scope="module")
def model_and_batch(prepared):
    """(config, task, random parameters (no zero-initialized layers), the first batch as host arrays)."""
    config = prepared[0]
    task = train.OBJECTIVES["flow"](config)
    cfg = DiTConfig.from_config(config.model)
    params = jax.device_get(random_init(cfg, example_inputs(cfg)))
    batch = next(pipeline.make_train_pipeline(config.data, 0, 1, seed=0))
    return config, task, params, {k: batch[k] for k in task.batch_keys}


def test_prepare_stores_first_frame_latents_and_image_conditioned_text(prepared):
    config, encoder, videos = prepared
    source = ArrayRecordClipSource(config.data.path)
    clip = source[0]
    video, _ = prepare.decode_clip(os.path.join(videos, clip.source_id),
                                   prepare.PrepareConfig.from_config(config.data.prepare))
    # The VAE on the clip and on its first frame alone (batches of 8, the shapes prepare compiled).
    batch = np.stack([video] * 8)
    whole = np.asarray(encoder._encode_video(encoder.vae_params, batch))[0]
    alone = np.asarray(encoder._encode_video(encoder.vae_params, batch[:, :1]))[0]
    stored = clip.image_latent.astype(np.float32)
    # The causal VAE's latent frame 0 of the clip is not the first frame's own latent: GroupNorm statistics span all
    # frames. So the records keep the first frame encoded alone, what the sampler conditions on.
    gap = float(np.abs(whole[:1] - alone).max())
    print(f"first frame: own latent vs the clip's latent frame 0, max |difference| {gap:.4f} (mean |latent| "
          f"{np.abs(alone).mean():.4f}); stored vs own latent {np.abs(stored - alone).max():.2e} (bf16)")
    assert gap > 0.1 * np.abs(alone).mean()
    np.testing.assert_allclose(stored, alone, atol=2e-2 * np.abs(alone).max())
    np.testing.assert_allclose(clip.latents.astype(np.float32), whole, atol=2e-2 * np.abs(whole).max())
    assert clip.image_latent.shape == (1, *LATENT_SHAPE[1:], 4) and clip.latent_shape == LATENT_SHAPE

    # Text states: the caption with the first frame as the image, through ImagePromptEncoders; records of its length.
    states, mask, pooled = encoder.text.encode_prompts([clip.caption] * 8, [prepare.first_frame_image(video)] * 8)
    assert clip.text_states.shape == (encoder.text.states_len, 32) == (config.data.text_len, 32)
    np.testing.assert_array_equal(clip.text_states, np.asarray(states)[0])
    np.testing.assert_array_equal(clip.text_mask, np.asarray(mask)[0])
    np.testing.assert_array_equal(clip.pooled_text, np.asarray(pooled)[0])
    assert clip.text_mask[:encoder.text.image_len()].all() and clip.text_mask.sum() < len(clip.text_mask)
    # The empty prompt for caption dropout: with a black image, as the sampler's negative prompt.
    null = pipeline.read_null_text(config.data.path)
    black = encoder.text.encode_negative([""], 16, 16)
    for key, want in zip(("text_states", "text_mask", "pooled_text"), black):
        np.testing.assert_array_equal(null[key], np.asarray(want)[0])
    assert not np.array_equal(null["text_states"], clip.text_states)

    # Mismatches are named: another text length, records without first-frame latents, a text-to-video model on them.
    with pytest.raises(ValueError, match=r"data.text_len 25 differs .* set data.text_len=24"):
        prepare.ClipEncoder(dict_update(config, data=dict(text_len=25)))
    with pytest.raises(ValueError, match="data.with_image_latent is False, model.image_condition_type 'token_repl"):
        train.validate_config(dict_update(config, data=dict(with_image_latent=False)))
    with pytest.raises(ValueError, match="data.with_image_latent is True, model.image_condition_type None"):
        train.validate_config(dict_update(config, model=dict(image_condition_type=None)))
    with pytest.raises(ValueError, match="data.latent_channels 9 differs from model.out_channels 4"):
        train.validate_config(dict_update(tiny_i2v.get_config("latent_concat"), data=dict(latent_channels=9)))


def dict_update(config, **sections):
    config = config.copy_and_resolve_references()
    for name, values in sections.items():
        config[name].update(values)
    return config


def reference_errors(model, params, batch, rngs, flow_config):
    """Per-sample, per-frame squared errors [B, T] and the model input, written out from the model: logit-normal
    σ (shift 1), ε from the sample's key, x_σ = (1 − σ)·x + σ·ε, the input [image latent, x_σ frames 1..]
    (token_replace) or [x_σ | image latent on frame 0, zeros after | mask 1 on frame 0] (latent_concat), the mean
    squared error to ε − x per frame."""
    x = jnp.asarray(batch["latents"], jnp.float32)
    image = jnp.asarray(batch["image_latent"], jnp.float32)
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(rngs)
    u = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(keys[:, 0])
    sigma = jax.nn.sigmoid(flow_config.logit_mean + flow_config.logit_std * u)
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys[:, 1])
    s = sigma[:, None, None, None, None]
    noisy = (1 - s) * x + s * noise
    if model.config.image_condition_type == "token_replace":
        inputs = jnp.concatenate([image, noisy[:, 1:]], axis=1)
    else:
        condition = jnp.zeros_like(x).at[:, :1].set(image)
        mask = jnp.zeros(x.shape[:4] + (1,)).at[:, :1].set(1.0)
        inputs = jnp.concatenate([noisy, condition, mask], axis=-1)
    guidance = jnp.full((x.shape[0],), 1000.0) if model.config.guidance_embed else None
    prediction = model.apply({"params": params}, inputs, 1000.0 * sigma, batch["text_states"], batch["text_mask"],
                             batch["pooled_text"], guidance)
    error = jnp.square(prediction - (noise - x))
    return jnp.mean(error.reshape(*x.shape[:2], -1), axis=-1), inputs


def test_objective_keeps_frame_0_clean_and_out_of_the_loss(model_and_batch):
    config, task, params, batch = model_and_batch
    rngs = jax.random.split(jax.random.PRNGKey(3), 8)
    flow_config = train.flow.FlowConfig.from_config(config.flow)
    model = task.model
    inputs_seen = []

    class Recorder:   # the model, keeping what it reads
        config = model.config

        def apply(self, variables, latents, *args):
            inputs_seen.append(latents)
            return model.apply(variables, latents, *args)
    objective = train.flow.flow_matching_objective(Recorder(), flow_config)

    def with_input(p, b, r):
        loss, sums = objective(p, b, r)
        return loss, (sums, inputs_seen[-1])
    value_and_grad = jax.jit(jax.value_and_grad(with_input, has_aux=True))
    (loss, (_, model_input)), grads = value_and_grad(params, batch, rngs)

    # (c) the objective equals the computation written out here, with the same keys.
    errors, inputs = jax.jit(lambda p, b, r: reference_errors(model, p, b, r, flow_config))(params, batch, rngs)
    written, with_frame_0 = float(errors[:, 1:].mean(-1).sum()), float(errors.mean(-1).sum())
    print(f"loss sum {float(loss):.6f}, written out {written:.6f}; with frame 0 in the mean it would be "
          f"{with_frame_0:.6f}")
    np.testing.assert_allclose(float(loss), written, rtol=2e-6)
    assert abs(with_frame_0 - float(loss)) > 0.02 * float(loss)
    # The model reads the clean image latent on frame 0 (token_replace), not the clip's latent frame 0.
    np.testing.assert_array_equal(model_input[:, :1], batch["image_latent"].astype(np.float32))
    np.testing.assert_allclose(model_input, inputs, rtol=1e-6, atol=1e-6)
    assert not np.allclose(model_input[:, :1], batch["latents"][:, :1].astype(np.float32), atol=1e-2)

    # (b) frame 0's target out of the loss: other latents on frame 0 (another target ε − x there; with token_replace
    # the same model input) leave the loss and every gradient exactly as they were ...
    changed = dict(batch, latents=batch["latents"].copy())
    changed["latents"][:, 0] = np.random.default_rng(0).standard_normal(changed["latents"][:, 0].shape)
    (loss2, _), grads2 = value_and_grad(params, changed, rngs)
    assert float(loss2) == float(loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(a, b)
    # ... while the same change on frame 1 moves both.
    later = dict(batch, latents=batch["latents"].copy())
    later["latents"][:, 1] = changed["latents"][:, 0]
    (loss3, _), grads3 = value_and_grad(params, later, rngs)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads3)))
    print(f"frame 0 changed: loss {float(loss2):.6f} (bitwise the same, and the gradients); frame 1 changed: loss "
          f"{float(loss3):.6f}, largest gradient change {moved:.3e}")
    assert abs(float(loss3) - float(loss)) > 1e-3 * float(loss) and moved > 1e-3
    # The prediction's frame 0 gets no gradient from the loss.
    frames = train.flow.loss_frames("token_replace", 2)
    target = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 4, 4, 4)), jnp.float32)
    d_prediction = jax.grad(lambda p: train.flow.framed_mse(p, target, frames).sum())(jnp.zeros_like(target))
    assert float(jnp.abs(d_prediction[:, 0]).max()) == 0.0 and float(jnp.abs(d_prediction[:, 1]).min()) > 0.0
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        train.flow.loss_frames("token_replace", 1)


def compiled_step(config, task, mesh):
    """(CompiledStep of the train step on `mesh`, optimizer, TrainConfig, state shardings)."""
    train_config = train.TrainConfig.from_config(config.train)
    tx = train.make_optimizer(train_config)
    shardings = train.state_shardings(task, tx, train_config, mesh)[1]
    return train.CompiledStep(train.make_train_step(task, tx, train_config), mesh, shardings), tx, shardings


@pytest.fixture(scope="module")
def one_device(model_and_batch):
    config, task, _, _ = model_and_batch
    return compiled_step(config, task, create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1]))


def test_loss_falls_on_prepared_clips(model_and_batch, one_device):
    config, task, _, _ = model_and_batch
    step, tx, _ = one_device
    state = train.create_train_state(task, tx, train.TrainConfig.from_config(config.train), step.mesh,
                                     jax.random.PRNGKey(0))
    it = pipeline.make_train_pipeline(config.data, 0, 1, seed=0)
    losses = []
    for _ in range(STEPS):
        local = next(it)
        (state, metrics), _ = step(state, step.global_batch({k: local[k] for k in task.batch_keys}),
                                   jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"I2V token_replace on 8 prepared clips, lr {config.train.learning_rate}: loss first 5 steps {first:.4f}, "
          f"last 5 {last:.4f} (ratio {last / first:.3f}); every 5th: {[round(x, 3) for x in losses[::5]]}")
    assert last < 0.5 * first


def random_state(params, tx, shardings):
    """A TrainState around `params` (host arrays) placed by `shardings`."""
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             ema_params=None, skipped=jnp.zeros((), jnp.int32))
    return jax.tree.map(lambda x, s: jax.device_put(x, s), jax.device_get(state), shardings)


def test_sharded_step_equals_one_device(model_and_batch, one_device):
    """data 2 x fsdp 2 x sequence 2 (8 image tokens of frames 1.., 16 in all, split over 'sequence')."""
    config, task, params, batch = model_and_batch
    results = {}
    for name, (step, tx, shardings) in {
            "one device": one_device,
            "2x2x2": compiled_step(config, task, create_mesh(MeshConfig(ici=(2, 2, 2, 1))))}.items():
        state = random_state(params, tx, shardings)
        (state, m1), _ = step(state, step.global_batch(batch), jax.random.PRNGKey(5))
        (state, m2), _ = step(state, step.global_batch(batch), jax.random.PRNGKey(5))
        results[name] = (jax.device_get((m1, m2)), jax.device_get(state.params))
    (one, p_one), (sharded, p_sharded) = results["one device"], results["2x2x2"]
    # Global norms: Adam's normalized first steps make single near-zero-gradient entries noisy on any two programs.
    gap = float(optax.tree.norm(jax.tree.map(np.subtract, p_sharded, p_one)))
    moved = float(optax.tree.norm(jax.tree.map(np.subtract, p_one, params)))
    print(f"step 1 loss {one[0]['loss']:.6f} vs {sharded[0]['loss']:.6f}, grad norm {one[0]['grad_norm']:.4f} vs "
          f"{sharded[0]['grad_norm']:.4f}; step 2 loss {one[1]['loss']:.6f} vs {sharded[1]['loss']:.6f}; params "
          f"after 2 steps: |sharded - one device| / |one device - initial| = {gap / moved:.2e}")
    for a, b in zip(one, sharded):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    assert gap < 1e-3 * moved


def test_resume_equals_an_uninterrupted_run(model_and_batch, tmp_path):
    """train_and_evaluate on 8 devices: 4 steps at once, or 2 steps, then resumed from that checkpoint for 2 more."""
    config = model_and_batch[0].copy_and_resolve_references()
    config.mesh.ici = (2, 2, 2, 1)
    config.train.update(checkpoint_every_steps=2, compilation_cache_dir=str(tmp_path / "cache"))

    def run(workdir, steps):
        config.train.num_steps = steps
        return jax.device_get(train.train_and_evaluate(config, str(tmp_path / workdir)))
    whole = run("whole", 4)
    run("parts", 2)
    resumed = run("parts", 4)
    losses = [[train.read_metrics(str(tmp_path / w))[s]["loss"] for s in range(1, 5)] for w in ("whole", "parts")]
    print("per-step losses, uninterrupted:", [f"{x:.6f}" for x in losses[0]], "stopped at 2 and resumed: equal"
          if losses[0] == losses[1] else losses[1])
    assert losses[0] == losses[1]
    leaves, ref = jax.tree.leaves(resumed), jax.tree.leaves(whole)
    assert len(leaves) == len(ref) and all(np.array_equal(a, b) for a, b in zip(leaves, ref))
    assert int(resumed.step) == 4


def test_latent_concat_trains_one_step_and_matches_the_written_out_loss():
    """The 33-channel variant on random clips: [noisy latents | image latent | mask] in, frames 1.. in the loss."""
    config = tiny_i2v.get_config("latent_concat")
    config.data.update(random_latent_shapes=(LATENT_SHAPE,), random_records=8, global_batch_size=8)
    task = train.OBJECTIVES["flow"](config)
    cfg = DiTConfig.from_config(config.model)
    assert (cfg.in_channels, task.batch_keys[-1]) == (9, "image_latent")
    params = jax.device_get(random_init(cfg, example_inputs(cfg)[:-1] + (None,)))
    batch = next(pipeline.make_train_pipeline(config.data, 0, 1, seed=0))
    batch = {k: batch[k] for k in task.batch_keys}
    step, tx, shardings = compiled_step(config, task, create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1]))
    (state, metrics), _ = step(random_state(params, tx, shardings), step.global_batch(batch), jax.random.PRNGKey(2))
    rngs = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(2), 0), 8)   # what the step drew at step 0
    errors, inputs = jax.jit(lambda p, b, r: reference_errors(task.model, p, b, r,
                                                                train.flow.FlowConfig.from_config(config.flow)))(
        params, batch, rngs)
    written = float(errors[:, 1:].mean())
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                           jax.tree.leaves(params)))
    print(f"latent_concat: step loss {float(metrics['loss']):.6f}, written out {written:.6f} (with frame 0: "
          f"{float(errors.mean()):.6f}); largest parameter change {moved:.2e}")
    np.testing.assert_allclose(float(metrics["loss"]), written, rtol=2e-6)
    assert np.isfinite(float(metrics["grad_norm"])) and int(metrics["skipped_steps"]) == 0 and moved > 1e-4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    np.testing.assert_array_equal(inputs[:, 0, ..., 4:8], batch["image_latent"][:, 0].astype(np.float32))
    assert float(np.abs(inputs[:, 1:, ..., 4:]).max()) == 0.0 and np.all(inputs[:, 0, ..., 8] == 1.0)
