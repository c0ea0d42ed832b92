"""Evaluation: the validation loss against a direct computation, bitwise repeatable and the same on 1 and 8 devices;
the training loop's evaluations (lower after training, the same numbers after a resume); the held-out split."""

import json
import os

import jax
import numpy as np
import pytest

from hyvideo_jax import evaluate, flow, objectives, train
from hyvideo_jax.data import pipeline
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from tests.demo_data import demo_config
from tests.test_dit_model import example_inputs, random_init


def eval_config(clips, **train_overrides):
    config = demo_config(clips)
    config.data.eval_fraction = 0.25          # 4 of the 16 clips, never trained on
    config.mesh.ici = (2, 2, 2, 1)            # data, fsdp and sequence parallel over the 8 devices
    config.train.update(train_overrides)
    return config


def test_held_out_records_are_never_trained_on(demo_clips):
    config = eval_config(demo_clips)
    trained, held = pipeline.held_out(16, 0.25, config.seed)
    assert len(held) == 4 and not set(trained) & set(held) and sorted([*trained, *held]) == list(range(16))
    data = pipeline.DataConfig.from_config(config.data)
    evaluation = pipeline.eval_source(data, config.seed)
    training = pipeline.training_source(data, config.seed)
    names = lambda s: {s.where(i) for i in range(len(s))}  # noqa: E731
    assert len(names(evaluation)) == 4 and len(names(training)) == 12 and not names(evaluation) & names(training)
    seen = set()
    for batch in pipeline.make_dataset(dict(config.data.to_dict(), num_epochs=1), 0, 1, seed=config.seed):
        seen |= {training.where(int(i)) for i in batch["record_index"] if i >= 0}
    assert seen == names(training)
    with pytest.raises(ValueError, match="data.eval_fraction: .* not both"):
        pipeline.DataConfig.from_config(dict(config.data.to_dict(), eval_path="elsewhere"))


def test_validation_loss_is_exact_repeatable_and_mesh_independent(demo_clips):
    config = eval_config(demo_clips)
    cfg = DiTConfig.from_config(config.model)
    params = jax.tree.map(lambda p: 0.5 * p, random_init(cfg, example_inputs(cfg)))
    one = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
    first = evaluate.LossEvaluator(config, one)(params)
    again = evaluate.LossEvaluator(config, one)(params)
    assert first == again                                                   # bitwise
    config.eval.batch_size = 2                                              # other batches, 8 devices
    eight = evaluate.LossEvaluator(config, create_mesh(MeshConfig(ici=(2, 2, 2, 1))))(params)
    for key in first:
        np.testing.assert_allclose(eight[key], first[key], rtol=2e-6, err_msg=key)

    # The reference: clip by clip and σ by σ, the MSE of the velocity with the noise of (seed, clip, σ index).
    source = pipeline.eval_source(pipeline.DataConfig.from_config(config.data), config.seed)
    model, fc = HunyuanVideoDiT(cfg), flow.FlowConfig.from_config(config.flow)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    grid = (np.arange(8) + 0.5) / 8
    want = np.zeros(8)
    for i in range(len(source)):
        clip = source[i]
        x = np.asarray(clip.latents, np.float32)[None]
        for k, sigma in enumerate(grid.astype(np.float32)):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), i), k)
            noise = np.asarray(jax.random.normal(key, x.shape[1:]))[None]
            v = apply(params, (1 - sigma) * x + sigma * noise, np.array([1000.0 * sigma], np.float32),
                      np.asarray(clip.text_states, np.float32)[None], np.asarray(clip.text_mask)[None],
                      np.asarray(clip.pooled_text, np.float32)[None], np.asarray(flow.guidance_input(None, 1, fc)))
            want[k] += np.mean((np.asarray(v) - (noise - x)) ** 2) / len(source)
    print(f"validation loss {first['eval/loss']:.6f} (direct {want.mean():.6f}); per σ "
          + ", ".join(f"{first[evaluate.sigma_name(s)]:.4f}" for s in grid.astype(np.float32)))
    np.testing.assert_allclose([first[evaluate.sigma_name(s)] for s in grid.astype(np.float32)], want, rtol=1e-5)
    assert first["eval/clips"] == 4 and abs(first["eval/loss"] - want.mean()) < 1e-5 * want.mean()


def eval_lines(workdir):
    """{step: eval scalars} of WORKDIR/metrics.jsonl, checking that each step was evaluated once."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, train.METRICS_FILE))]
    evals = [r for r in rows if "eval/loss" in r]
    assert len({r["step"] for r in evals}) == len(evals)
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/") and k != "eval/seconds"} for r in evals}


def test_training_evaluates_and_a_resumed_run_writes_the_same_numbers(demo_clips, tmp_path):
    config = eval_config(demo_clips, num_steps=6, eval_every_steps=2, checkpoint_every_steps=2, learning_rate=2e-3)
    train.train_and_evaluate(config, str(tmp_path / "whole"))
    whole = eval_lines(tmp_path / "whole")
    assert sorted(whole) == [2, 4, 6]

    # Preempted after step 4's checkpoint (and its evaluation): the same workdir without step 6, resumed.
    import shutil
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    metrics = tmp_path / "resumed" / train.METRICS_FILE
    lines = [line for line in open(metrics) if json.loads(line)["step"] <= 4]
    metrics.write_text("".join(lines))
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert eval_lines(tmp_path / "resumed") == whole

    # Lower than the initial model's.
    mesh = create_mesh(config.mesh)
    tc = train.TrainConfig.from_config(config.train)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    initial = train.create_train_state(objectives.flow_task(config), train.make_optimizer(tc), tc, mesh, init_rng)
    at_zero = evaluate.LossEvaluator(config, mesh)(initial.params)["eval/loss"]
    print(f"demo validation loss: step 0 {at_zero:.4f}, " + ", ".join(f"step {s} {whole[s]['eval/loss']:.4f}"
                                                                     for s in sorted(whole)))
    assert whole[6]["eval/loss"] < 0.9 * at_zero


def test_contact_sheet_shows_the_frames_of_the_mp4s(demo_clips, tmp_path):
    import av

    from hyvideo_jax.sample import Sampler
    config = demo_config(demo_clips)
    config.sample.update(frames=17, steps=3)
    cfg = DiTConfig.from_config(config.model)
    params = jax.tree.map(lambda p: 0.5 * p, random_init(cfg, example_inputs(cfg)))
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
    sampler = Sampler.from_config(config, dit=(cfg, params, "random"), mesh=mesh)
    prompts = ["a small red circle moving left quickly on a black background",
               "a large blue square moving up slowly on a gray background"]
    sheet, paths = evaluate.write_sample_grid(sampler, prompts, str(tmp_path / "grid"), seed=3, columns=4)
    assert [os.path.basename(p) for p in paths] == ["sample_000.mp4", "sample_001.mp4"]
    frames = evaluate.sheet_frames(17, 4)
    assert frames.tolist() == [0, 5, 11, 16] and sheet.shape == (2 * 32, 4 * 32, 3)
    import mediapy
    np.testing.assert_array_equal(mediapy.read_image(str(tmp_path / "grid" / evaluate.SHEET)), sheet)
    # Against a second generation with the same seeds (the sheet is made of exactly those frames), and against the
    # mp4s decoded again (H.264, yuv420p: chroma at half resolution, hence the codec's error).
    again = sampler.generate(prompts, seeds=[3, 4], videos_per_prompt=1).videos
    np.testing.assert_array_equal(sheet, evaluate.contact_sheet(again, 4))
    luma = lambda rgb: rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])   # noqa: E731
    right, wrong = [], []
    for row, path in enumerate(paths):
        with av.open(path) as f:
            decoded = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
        assert decoded.shape == (17, 32, 32, 3)
        tiles = sheet[row * 32:(row + 1) * 32].reshape(32, 4, 32, 3).transpose(1, 0, 2, 3)
        right.append(np.abs(luma(tiles) - luma(decoded[frames])))
        wrong.append(np.abs(luma(tiles) - luma(decoded[frames + np.array([1, 1, 1, -1])])))   # the next frames
    right, wrong = np.stack(right), np.stack(wrong)
    psnr = 10 * np.log10(255.0 ** 2 / np.mean(right ** 2))
    print(f"contact sheet vs decoded mp4 frames (luma): mean abs error {right.mean():.2f} levels, PSNR {psnr:.1f} dB;"
          f" against the neighbouring frames {wrong.mean():.2f} levels")
    # Sheet tiles taken from the neighbouring frames would miss both the first and the last bound.
    assert right.mean() < 3.0 and psnr > 35.0 and wrong.mean() > 2 * right.mean()
