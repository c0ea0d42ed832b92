"""The VAE objective in the training loop: videos decoded from files by the Grain pipeline (padding slots masked
out of the loss), sharded over 8 simulated devices, checkpointed and resumed exactly."""

import os
import shutil

import jax
import numpy as np
import pytest

from configs import demo
from hyvideo_jax import train
from hyvideo_jax.config_fields import to_plain_dict
from hyvideo_jax.convert.flax_io import save_flax_model
from hyvideo_jax.data import pipeline
from hyvideo_jax.data.prepare import PrepareConfig, decode_clip
from hyvideo_jax.data.synthetic import write_dataset
from hyvideo_jax.models.vae import HunyuanVideoVAE, VAEConfig
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from hyvideo_jax.vae_objective import VAELossConfig, vae_loss


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Six 32×32 synthetic videos of 12 frames at 8 fps (the 5-frame bucket) and a corrupt file."""
    folder = str(tmp_path_factory.mktemp("videos"))
    write_dataset(folder, dict(num_videos=6, sizes=((32, 32),), frames=(12,), fps=8.0))
    with open(os.path.join(folder, "broken.mp4"), "wb") as f:
        f.write(b"not a video")
    return folder


def vae_config(folder, **train_overrides):
    config = demo.get_config()
    config.train.update(dict(objective="vae", learning_rate=3e-3, log_every_steps=1, async_checkpointing=False),
                        **train_overrides)
    config.vae.loss.sample_posterior = False
    config.data.update(source="videos", path=folder, global_batch_size=8,   # 6 videos: 2 padding slots per batch
                       eval_fraction=0.0, caption_dropout=0.0)
    config.data.prepare.buckets = ((5, 32, 32),)
    config.mesh.ici = (8, 1, 1, 1)
    return config


def test_video_source_batches_decoded_clips_and_leaves_out_broken_files(videos):
    config = vae_config(videos)
    it = pipeline.make_train_pipeline(config.data, 0, 1, seed=0)
    batch = next(it)
    assert sorted(batch) == sorted(pipeline.VIDEO_BATCH_KEYS)
    assert batch["video"].shape == (8, 5, 32, 32, 3) and batch["valid"].sum() == 6
    prepare = PrepareConfig.from_config(config.data.prepare)
    names = sorted(f for f in os.listdir(videos) if f.startswith("video-"))
    for slot in np.flatnonzero(batch["valid"]):
        expected, _ = decode_clip(os.path.join(videos, names[batch["record_index"][slot]]), prepare)
        np.testing.assert_array_equal(batch["video"][slot], expected)
    assert not batch["video"][~batch["valid"]].any()
    # The epoch covers each video once; the next epoch reshuffles.
    assert sorted(batch["record_index"][batch["valid"]].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="data.source: the 'vae' objective trains on pixels"):
        bad = vae_config(videos)
        bad.data.source = "random"
        train.validate_config(bad)


def test_video_index_keeps_probed_shapes_across_restarts(videos, tmp_path, monkeypatch):
    from hyvideo_jax.data import video

    config = vae_config(videos)
    config.data.video_index = str(tmp_path / "run" / "video_index.json")
    data, prepare = pipeline.DataConfig.from_config(config.data), PrepareConfig.from_config(config.data.prepare)
    probed = []
    real_probe = video.probe_clip
    monkeypatch.setattr(video, "probe_clip", lambda path, cfg: probed.append(path) or real_probe(path, cfg))

    def build(prepare=prepare, process_index=0):
        probed.clear()
        source = pipeline.make_source(data, 0, prepare, process_index)
        return (source.names, source.video_shapes().tolist(), source.skipped), len(probed)

    first, count = build()
    assert count == 7 and os.path.exists(config.data.video_index)   # six videos and the broken file
    again, count = build()
    assert again == first and count == 0   # all seven outcomes, the skip reason too, come from the index
    name = first[0][2]
    stat = os.stat(os.path.join(videos, name))
    os.utime(os.path.join(videos, name), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))   # a changed file
    assert build(process_index=1) == (first, 1)   # re-probed, but process 1 leaves the index as it is
    assert build() == (first, 1)
    assert build() == (first, 0)
    other = PrepareConfig.from_config(dict(config.data.prepare.to_dict(), fps=12.0))
    assert build(other)[1] == 7   # other prepare settings: the index does not apply
    with open(config.data.video_index, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="data.video_index: .* is not a readable index"):
        build()


def test_vae_loop_masks_padding_and_resumes_exactly(videos, tmp_path):
    config = vae_config(videos, num_steps=4, checkpoint_every_steps=2)
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(config, workdir)
    metrics = train.read_metrics(workdir)
    losses = [metrics[s]["loss"] for s in range(1, 5)]
    print("VAE loop losses:", [round(x, 5) for x in losses])
    assert all(metrics[s]["valid_samples"] == 6 for s in range(1, 5))

    # Step 1's loss is the loss of the initial parameters on the six decoded videos alone (padding left out).
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
    train_config = train.TrainConfig.from_config(config.train)
    task = train.OBJECTIVES["vae"](config)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    state = train.create_train_state(task, train.make_optimizer(train_config), train_config, mesh, init_rng)
    prepare = PrepareConfig.from_config(config.data.prepare)
    names = sorted(f for f in os.listdir(videos) if f.startswith("video-"))
    clips = np.stack([decode_clip(os.path.join(videos, n), prepare)[0] for n in names])
    model = HunyuanVideoVAE(VAEConfig.from_config(config.vae.model))
    loss_config = VAELossConfig.from_config(config.vae.loss)
    loss_of = jax.jit(lambda params, video: vae_loss(model, loss_config, params, {"video": video}, None)[0])
    expected = loss_of(state.params, clips)
    print(f"step 1 loss {losses[0]:.6f}, recomputed on the valid videos {float(expected):.6f}")
    np.testing.assert_allclose(losses[0], float(expected), rtol=1e-5)
    assert losses[-1] < losses[0]

    # Resume from step 2's checkpoint in a fresh folder: the same losses and parameters bit for bit.
    resumed_dir = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed_dir, "checkpoints"))
    shutil.copytree(os.path.join(workdir, "checkpoints", "2"), os.path.join(resumed_dir, "checkpoints", "2"))
    resumed = train.train_and_evaluate(config, resumed_dir)
    resumed_metrics = train.read_metrics(resumed_dir)
    assert [resumed_metrics[s]["loss"] for s in (3, 4)] == losses[2:]
    for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # New runs from this run's weights (train.init_from: its workdir (EMA parameters if it kept them), or a converted
    # folder of its raw parameters): step 1's loss is the loss of those weights.
    weights = {workdir: jax.device_get(final.ema_params if final.ema_params is not None else final.params),
               save_flax_model(str(tmp_path / "vae_folder"), "vae", to_plain_dict(VAEConfig.from_config(
                   config.vae.model)), jax.device_get(final.params)): jax.device_get(final.params)}
    for i, (source, params) in enumerate(weights.items()):
        started = vae_config(videos, num_steps=1, init_from=source,
                             compilation_cache_dir=str(tmp_path / "compilation_cache"))
        train.train_and_evaluate(started, str(tmp_path / f"started_{i}"))
        expected = loss_of(params, clips)
        first = train.read_metrics(str(tmp_path / f"started_{i}"))[1]["loss"]
        print(f"init_from {source}: step 1 loss {first:.6f}, recomputed {float(expected):.6f}")
        np.testing.assert_allclose(first, float(expected), rtol=1e-5)
        assert abs(first - losses[0]) > 1e-3 * losses[0]   # not the seed's initial parameters
    other = vae_config(videos, num_steps=1, init_from=workdir)
    other.vae.model.latent_channels = 8
    with pytest.raises(ValueError, match=r"train.init_from: .* another VAE architecture than vae.model: "
                                         r"latent_channels 4 \(config: 8\)"):
        train.train_and_evaluate(other, str(tmp_path / "other"))
