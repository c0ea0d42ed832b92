"""Fine-tuning starts from pretrained weights (`train.init_from`): every source gives the same parameters, placed
sharded; the first step's loss is the loaded model's; another architecture is refused naming the fields; the
workdir's own checkpoints take precedence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hyvideo_jax import train
from hyvideo_jax.convert import load_torch_dit, save_torch_dit
from hyvideo_jax.convert.dit import load_dit_sharded, params_to_official
from hyvideo_jax.convert.flax_io import save_flax_model
from hyvideo_jax.convert.torch_io import to_torch
from hyvideo_jax.models.dit import DiTConfig
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from tests.dit_reference import diffusers_dit
from tests.test_train import one_device_step, small_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny transformer as a diffusers folder, an official .pt, a `convert to-flax` folder, and an fp8
    official checkpoint (with its map) of it; plus the host-loaded reference parameters of each."""
    root = tmp_path_factory.mktemp("init_from")
    diffusers_dit(seed=11).save_pretrained(root / "diffusers")
    cfg, params = load_torch_dit(str(root / "diffusers"), progress=False)
    official = save_torch_dit(cfg, params, root / "mp_rank_00_model_states.pt", layout="official", progress=False)
    folder = save_flax_model(str(root / "flax"), "dit", cfg.to_dict(), params)
    state, scales = {}, {}
    for name, array in params_to_official(cfg, params, progress=False):
        w, module = to_torch(array), name.rsplit(".", 1)[0]
        if name.endswith(".weight") and name.startswith(("double_blocks", "single_blocks")) and w.ndim == 2:
            scales[module] = w.float().abs().max() / 448.0
            w = (w.float() / scales[module]).to(torch.float8_e4m3fn)
        state[name] = w
    torch.save({"module": state}, root / "mp_rank_00_model_states_fp8.pt")
    torch.save(scales, root / "mp_rank_00_model_states_fp8_map.pt")
    fp8 = str(root / "mp_rank_00_model_states_fp8.pt")
    fp8_reference = load_torch_dit(fp8, config=dict(rope_axes_dim=cfg.rope_axes_dim), progress=False)[1]
    return dict(diffusers=str(root / "diffusers"), official=str(official), flax=folder, fp8=fp8), params, fp8_reference


def host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(tree))


def test_every_source_gives_the_same_sharded_parameters(sources):
    paths, reference, fp8_reference = sources
    like = DiTConfig.from_config(small_config().model)
    mesh = create_mesh(MeshConfig(ici=(1, 4, 2, 1)))
    for name, path in paths.items():
        cfg, params = load_dit_sharded(path, mesh, like=like, strict=True, progress=False)
        assert cfg == like
        want = fp8_reference if name == "fp8" else reference
        got = host(params)
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(host(want))):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {jax.tree_util.keystr(p)}")
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}    # fp32 masters
        fc1 = params["double_blocks"]["img_mlp"]["fc1"]["kernel"]
        assert fc1.sharding.spec[1] == "fsdp" and fc1.addressable_shards[0].data.shape[1] == fc1.shape[1] // 4
    assert np.abs(np.concatenate([x.ravel() for x in jax.tree.leaves(host(fp8_reference))])
                  - np.concatenate([x.ravel() for x in jax.tree.leaves(host(reference))])).max() > 0   # really fp8


def test_first_step_loss_is_the_loaded_models_on_one_and_eight_devices(sources):
    paths, reference, _ = sources
    config = small_config(init_from=paths["official"], ema_decay=0.5)
    losses = {}
    for shape in ((1, 1, 1, 1), (1, 2, 4, 1)):
        mesh = create_mesh(MeshConfig(ici=shape), jax.devices()[:int(np.prod(shape))])
        train_config = train.TrainConfig.from_config(config.train)
        task = train.OBJECTIVES["flow"](config)
        tx = train.make_optimizer(train_config)
        state = train.state_from_params(task, tx, train_config, mesh, train.pretrained_params(config, mesh))
        for a, b in zip(jax.tree.leaves(host(state.ema_params)), jax.tree.leaves(host(reference))):
            np.testing.assert_array_equal(a, b)                                   # EMA starts from the weights
        step = train.CompiledStep(train.make_train_step(task, tx, train_config), mesh,
                                  train.state_shardings(task, tx, train_config, mesh)[1])
        _, _, batch = one_device_step(config)
        batch = step.global_batch(jax.device_get(batch))
        rng = jax.random.PRNGKey(3)
        (_, metrics), _ = step(state, batch, rng)
        losses[shape] = float(metrics["loss"])
    # The loss of the loaded weights computed directly, with the step's per-sample keys.
    host_batch = jax.device_get(batch)
    rngs = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0), host_batch["latents"].shape[0])
    loss_sum, sums = jax.jit(task.objective)(reference, host_batch, rngs)
    direct = float(loss_sum / sums["count"])
    print(f"first step loss: one device {losses[(1, 1, 1, 1)]:.6f}, 8 devices {losses[(1, 2, 4, 1)]:.6f}, "
          f"computed directly {direct:.6f}")
    assert losses[(1, 1, 1, 1)] == pytest.approx(direct, rel=1e-5)
    assert losses[(1, 2, 4, 1)] == pytest.approx(direct, rel=1e-5)


def test_another_architecture_is_refused_naming_the_fields(sources):
    paths, _, _ = sources
    config = small_config(init_from=paths["diffusers"])
    config.model.depth_single = 3
    config.model.mlp_ratio = 2.0
    with pytest.raises(ValueError, match=r"is another model than config.model: mlp_ratio \(4.0 in the checkpoint vs "
                                         r"2.0\), depth_single \(2 in the checkpoint vs 3\)"):
        train.pretrained_params(config, create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1]))


def test_workdir_checkpoints_take_precedence(sources, tmp_path):
    paths, reference, _ = sources
    config = small_config(init_from=paths["flax"], num_steps=2, checkpoint_every_steps=2, learning_rate=1e-2)
    first = host(train.train_and_evaluate(config, str(tmp_path)).params)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(reference)))
    assert 0 < moved < 1.0                       # trained from the pretrained weights, not from a random init
    config = small_config(init_from=str(tmp_path / "no_such_weights"), num_steps=3, checkpoint_every_steps=2,
                          learning_rate=1e-2)
    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert int(resumed.step) == 3                # resumed at step 2; init_from was not even opened


def test_training_workdir_exports_to_diffusers(tiny_run, tmp_path):
    """`convert to-torch --src=WORKDIR [--ema]`: diffusers' from_pretrained loads the folder and gives our output
    with the run's EMA (or raw) parameters (the session's 2-step run of the tiny model, EMA decay 0.5, learning
    rate 0.05)."""
    from diffusers import HunyuanVideoTransformer3DModel

    from hyvideo_jax.convert.__main__ import main as convert_main
    from hyvideo_jax.convert.dit import param_shapes
    from hyvideo_jax.convert.flax_io import training_params
    from hyvideo_jax.models.dit import HunyuanVideoDiT
    from tests.dit_reference import TINY, diffusers_forward, dit_inputs, jax_inputs, relative_error
    workdir = tiny_run["workdir"]
    cfg = DiTConfig.from_config(small_config().model)
    inputs = dit_inputs(TINY, valid=(6, 2))
    outputs = {}
    for ema in (True, False):
        out = str(tmp_path / f"export_{ema}")
        assert convert_main(["to-torch", f"--src={workdir}", f"--out={out}"] + ["--ema"] * ema) == 0
        model = HunyuanVideoTransformer3DModel.from_pretrained(out).eval()
        params, _ = training_params(workdir, param_shapes(cfg), use_ema=ema, require_ema=ema)
        ours = np.asarray(HunyuanVideoDiT(cfg).apply({"params": params}, *jax_inputs(inputs)))
        err = relative_error(ours, diffusers_forward(model, inputs))
        print(f"workdir export ({'EMA' if ema else 'raw'}): diffusers vs ours {err:.2e}")
        assert err <= 1e-4
        outputs[ema] = ours
    assert np.abs(outputs[True] - outputs[False]).max() > 1e-4 * np.abs(outputs[False]).max()   # two exports
    assert convert_main(["to-torch", f"--src={workdir}", f"--out={tmp_path / 'x'}", "--step=7"]) == 2
