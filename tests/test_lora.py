"""LoRA training: adapters on the default targets, the base frozen and outside the optimizer, the loss falls, the
checkpoints hold the adapters only and a resumed run gets the same frozen base back."""

import jax
import numpy as np
import pytest

from hyvideo_jax import lora, objectives, train
from tests.test_dit_model import example_inputs, random_init, tiny_config
from tests.test_train import one_device_step, small_config


def lora_config(**train_overrides):
    config = small_config(**train_overrides)
    config.lora.rank = 4
    config.lora.alpha = 8.0
    return config


def test_merge_adds_the_scaled_low_rank_product():
    cfg = tiny_config()
    params = random_init(cfg, example_inputs(cfg))
    config = lora.LoRAConfig(rank=3, alpha=6.0)
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init_adapters(params, config, jax.random.PRNGKey(0)))
    merged = lora.merge(params, adapters, config)
    for name in lora.target_names(params, config):
        keys = name.split("/")
        w, m, ad = params, merged, adapters
        for k in keys:
            w, m, ad = w[k], m[k], ad[k]
        a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
        lead, r = a.shape[0], a.shape[-1]
        want = np.asarray(w) + 2.0 * np.einsum("lir,lro->lio", a.reshape(lead, -1, r),
                                               b.reshape(lead, r, -1)).reshape(w.shape)
        np.testing.assert_allclose(np.asarray(m), want, rtol=1e-5, atol=1e-6, err_msg=name)
    untouched = merged["single_blocks"]["modulation"]["linear"]["kernel"]
    np.testing.assert_array_equal(untouched, params["single_blocks"]["modulation"]["linear"]["kernel"])
    assert len(lora.target_names(params, config)) == 12
    with pytest.raises(ValueError, match=r"lora.targets: 'nothing/here' matches no parameter"):
        lora.target_names(params, lora.LoRAConfig(rank=2, targets=("nothing/here",)))


def pretrained_state(config):
    """A LoRA TrainState on one device whose frozen base is fully random, standing in for pretrained weights (the
    real init zeroes the output layer, through which no adapter could change anything)."""
    from hyvideo_jax.models.dit import DiTConfig
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    cfg = DiTConfig.from_config(config.model)
    train_config = train.TrainConfig.from_config(config.train)
    base = jax.tree.map(lambda p: 0.3 * p, random_init(cfg, example_inputs(cfg)))
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
    return train.state_from_params(objectives.flow_task(config), train.make_optimizer(train_config), train_config, mesh,
                                   base, jax.random.PRNGKey(0))


def test_only_adapters_train_and_the_loss_falls():
    config = lora_config(learning_rate=1e-2, weight_decay=0.1, ema_decay=0.5)
    step, state, batch = one_device_step(config, pretrained_state(config))
    frozen, initial = jax.device_get(state.frozen), jax.device_get(state.params)
    # The optimizer state holds the adapters' moments only: its arrays are as many as the adapters', twice.
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in opt_arrays) == 2 * sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.params)) < 0.2 * sum(x.size for x in jax.tree.leaves(frozen))
    task = objectives.flow_task(config)
    adapted = task.lora
    host_batch = jax.device_get(batch)

    @jax.jit
    def held_loss(adapters, frozen):   # the same σ and noise draws every time: a loss that can only move by training
        total = 0.0
        for seed in range(4):
            rngs = jax.random.split(jax.random.PRNGKey(100 + seed), host_batch["latents"].shape[0])
            loss_sum, sums = task.objective(lora.merge(frozen, adapters, adapted), host_batch, rngs)
            total += loss_sum / sums["count"]
        return total / 4
    before = float(held_loss(initial, frozen))
    for _ in range(25):
        (state, metrics), _ = step(state, batch, jax.random.PRNGKey(1))
    after = float(held_loss(jax.device_get(state.params), frozen))
    print(f"LoRA rank 4, 25 steps on one batch: loss at fixed σ and noise {before:.4f} → {after:.4f}")
    assert after < 0.9 * before
    for a, b in zip(jax.tree.leaves(jax.device_get(state.frozen)), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)                      # the base, bitwise
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                        jax.tree.leaves(initial))]
    assert min(moved) > 0                                       # every adapter trained


def test_checkpoints_hold_adapters_and_resume_restores_the_base(tmp_path):
    config = lora_config(num_steps=2, checkpoint_every_steps=2, learning_rate=1e-2)
    first = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
    config = lora_config(num_steps=3, checkpoint_every_steps=2, learning_rate=1e-2)
    resumed = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
    assert int(resumed.step) == 3
    for a, b in zip(jax.tree.leaves(resumed.frozen), jax.tree.leaves(first.frozen)):
        np.testing.assert_array_equal(a, b)
    import orbax.checkpoint as ocp
    stored = ocp.PyTreeCheckpointer().metadata(str(tmp_path / "checkpoints" / "2" / "state"))
    stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
    assert not stored.get("frozen")                              # the base is not written
    assert set(stored["params"]) == {"double_blocks", "single_blocks"}


def test_sampler_merges_a_lora_runs_adapters_into_its_base(tmp_path):
    """A LoRA run started from a converted folder: the sampler (and `convert to-torch --src=WORKDIR`) read base +
    (EMA) adapters merged, the same weights as merging them by hand; its exported LoRA file starts a new run."""
    from hyvideo_jax import sample
    from hyvideo_jax.convert.__main__ import main as convert_main
    from hyvideo_jax.convert.flax_io import save_flax_model
    from hyvideo_jax.convert.lora import load_lora
    from hyvideo_jax.models.dit import DiTConfig
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    config = lora_config(num_steps=2, checkpoint_every_steps=2, learning_rate=5e-2, ema_decay=0.5)
    cfg = DiTConfig.from_config(config.model)
    base = jax.tree.map(lambda p: 0.3 * np.asarray(p), random_init(cfg, example_inputs(cfg)))
    config.train.init_from = save_flax_model(str(tmp_path / "base"), "dit", cfg.to_dict(), base)
    state = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "run")))
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
    _, params, description = sample.load_dit(config, workdir=str(tmp_path / "run"), mesh=mesh)
    assert "LoRA rank 4 merged" in description and "EMA" in description
    want = lora.merge(base, state.ema_params, lora.LoRAConfig(rank=4, alpha=8.0))
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(base)))
    assert moved > 1e-4
    # The adapters as a diffusers LoRA file, merged back by the sampler into the same base: the same weights.
    lora_file = str(tmp_path / "adapters.safetensors")
    assert convert_main(["lora-to-torch", f"--src={tmp_path / 'run'}", f"--out={lora_file}", "--ema"]) == 0
    _, plain, _ = sample.load_dit(small_config(), checkpoint=config.train.init_from, mesh=mesh)
    merged_back = sample.with_lora(plain, cfg, lora_file, mesh)
    for a, b in zip(jax.tree.leaves(jax.device_get(merged_back)), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The same file as the start of a new LoRA run, at a higher rank and another alpha: before any update (lr 0),
    # base + adapters (and their EMA) are the weights the file describes.
    config = lora_config(num_steps=1, checkpoint_every_steps=1, learning_rate=0.0, ema_decay=0.5)
    config.train.init_from = str(tmp_path / "base")
    config.lora.update(rank=6, alpha=3.0, init_from=lora_file)
    continued = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "continued")))
    six = lora.LoRAConfig(rank=6, alpha=3.0)
    for adapters in (continued.params, continued.ema_params):
        for a, b in zip(jax.tree.leaves(lora.merge(base, adapters, six)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    spare = continued.params["double_blocks"]["img_attn_qkv"]["kernel"]
    assert np.abs(spare["a"][..., 4:]).min() > 0 and not spare["b"][:, 4:].any()   # new slots: fresh a, b = 0
    loaded, loaded_config = load_lora(lora_file, cfg)
    with pytest.raises(ValueError, match=r"rank 4 in the LoRA, above lora.rank 2: set lora.rank >= 4"):
        lora.start_from(continued.params, loaded, loaded_config, lora.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"the LoRA adapts single_blocks/linear1_mlp/kernel.*leaves out"):
        doubles = lora.LoRAConfig(rank=6, targets=lora.DEFAULT_TARGETS[:2])
        lora.start_from(lora.init_adapters(base, doubles, jax.random.PRNGKey(0)), loaded, loaded_config, doubles)
    out = str(tmp_path / "merged_diffusers")
    assert convert_main(["to-torch", f"--src={tmp_path / 'run'}", f"--out={out}", "--ema"]) == 0
    from hyvideo_jax.convert import load_torch_dit
    _, exported = load_torch_dit(out, progress=False)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_lora_on_the_demo_data_lowers_the_held_out_loss(demo_clips, tmp_path):
    """Adapters trained on the demo clips (a quarter held out) by the real loop, over a frozen base saved as a
    converted folder: the validation loss of the held-out clips falls below the base's."""
    from hyvideo_jax import evaluate
    from hyvideo_jax.convert.flax_io import save_flax_model
    from hyvideo_jax.models.dit import DiTConfig
    from hyvideo_jax.parallel.mesh import create_mesh
    from tests.demo_data import demo_config
    config = demo_config(demo_clips)
    config.data.eval_fraction = 0.25
    config.mesh.ici = (2, 2, 2, 1)
    config.lora.update(rank=4, alpha=4.0)
    config.train.update(num_steps=12, learning_rate=1e-2, checkpoint_every_steps=12, eval_every_steps=6)
    cfg = DiTConfig.from_config(config.model)
    base = jax.tree.map(lambda p: 0.3 * np.asarray(p), random_init(cfg, example_inputs(cfg)))
    config.train.init_from = save_flax_model(str(tmp_path / "base"), "dit", cfg.to_dict(), base)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    before = evaluate.LossEvaluator(config, create_mesh(config.mesh))(base)["eval/loss"]
    after = {s: r["eval/loss"] for s, r in train.read_metrics(str(tmp_path / "run")).items() if "eval/loss" in r}
    print(f"LoRA rank 4 on the demo clips, held-out validation loss: base {before:.4f}, "
          + ", ".join(f"step {s} {v:.4f}" for s, v in sorted(after.items())))
    assert sorted(after) == [6, 12] and after[12] < after[6] < before and after[12] < 0.9 * before
