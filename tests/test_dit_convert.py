"""Acceptance 2 of the DiT: official ↔ ours ↔ diffusers conversions are bit-exact, exports load in diffusers."""

import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from hyvideo_jax.convert import load_torch_dit, save_torch_dit
from hyvideo_jax.convert.dit import conversion_groups, param_shapes, params_to_official
from hyvideo_jax.convert.dit_layouts import official_to_diffusers
from hyvideo_jax.convert.torch_io import to_numpy, to_torch
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT
from tests.dit_reference import TINY, dit_inputs, diffusers_forward, jax_inputs, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TSV = os.path.join(ROOT, "..", "shared", "reference", "dit_official_to_diffusers.tsv")
CFG = DiTConfig(in_channels=4, out_channels=4, hidden_size=64, num_heads=4, depth_double=2, depth_single=2,
                text_states_dim=32, pooled_text_dim=24, rope_axes_dim=(4, 6, 6))


def random_params(cfg: DiTConfig, dtype=np.float32, seed=0):
    """Random values for every leaf of our tree (scales near 1), so that no conversion can hide behind zeros."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)

    def leaf(path, s):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(s.shape)).astype(dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def assert_trees_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


@pytest.fixture(scope="module")
def official_bf16(tmp_path_factory):
    """A random bf16 checkpoint in the official layout, as the released `mp_rank_00_model_states.pt` is stored."""
    params = random_params(CFG, ml_dtypes.bfloat16)
    state = {name: to_torch(a) for name, a in params_to_official(CFG, params, progress=False)}
    path = tmp_path_factory.mktemp("official") / "mp_rank_00_model_states.pt"
    torch.save({"module": state}, path)
    return params, state, path


def test_official_to_ours_and_back_is_bit_exact(official_bf16, tmp_path):
    params, state, path = official_bf16
    cfg, loaded = load_torch_dit(path, config=dict(rope_axes_dim=(4, 6, 6)), progress=False)
    assert cfg.param_dtype == "bfloat16" and cfg.depth_double == 2 and cfg.num_heads == 4
    assert_trees_bitwise_equal(loaded, params)
    out = save_torch_dit(cfg, loaded, tmp_path / "again.pt", layout="official", progress=False)
    again = torch.load(out, weights_only=True)["module"]
    assert sorted(again) == sorted(state)
    for name in state:
        assert torch.equal(again[name].view(torch.int16), state[name].view(torch.int16)), name


def test_official_to_diffusers_matches_diffusers_own_converter(official_bf16, tmp_path, monkeypatch):
    """Our official → diffusers export equals diffusers' single-file converter, tensor by tensor, bit for bit."""
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
    from safetensors.torch import load_file
    params, state, path = official_bf16
    # diffusers' converter splits single-block linear1 with the 13B hidden size (3072) written in; scale that split
    # to the tiny hidden size so the rest of its mapping can be compared as it is.
    split = torch.split
    monkeypatch.setattr(torch, "split", lambda t, sizes, dim=0: split(
        t, [CFG.hidden_size if s == 3072 else s + 3 * (3072 - CFG.hidden_size) for s in sizes]
        if isinstance(sizes, (list, tuple)) and sizes[0] == 3072 else sizes, dim))
    cfg, loaded = load_torch_dit(path, config=dict(rope_axes_dim=(4, 6, 6)), progress=False)
    folder = save_torch_dit(cfg, loaded, tmp_path / "diffusers", progress=False)
    ours = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    theirs = convert_hunyuan_video_transformer_to_diffusers({k: v.clone() for k, v in state.items()})
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.bfloat16
        assert torch.equal(ours[name].view(torch.int16), theirs[name].view(torch.int16)), name
    # ... and back: diffusers folder → ours → official is the original checkpoint.
    cfg2, from_diffusers = load_torch_dit(folder, progress=False)
    assert cfg2 == cfg
    assert_trees_bitwise_equal(from_diffusers, params)


def test_exported_folder_loads_in_diffusers_and_gives_our_output(tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel
    params = random_params(CFG, np.float32, seed=3)
    folder = save_torch_dit(CFG, params, tmp_path / "export", progress=False)
    model = HunyuanVideoTransformer3DModel.from_pretrained(folder).eval()
    inputs = dit_inputs(TINY, valid=(6, 2))
    ref = diffusers_forward(model, inputs)
    ours = HunyuanVideoDiT(CFG).apply({"params": params}, *jax_inputs(inputs))
    err = relative_error(ours, ref)
    print(f"exported folder: diffusers vs ours max abs error / scale = {err:.2e}")
    assert err <= 1e-4


def test_sharded_diffusers_export_roundtrip(tmp_path):
    params = random_params(CFG, np.float32, seed=4)
    folder = save_torch_dit(CFG, params, tmp_path / "sharded", max_shard_bytes=200_000, progress=False)
    shards = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    cfg, loaded = load_torch_dit(folder, progress=False)
    assert_trees_bitwise_equal(loaded, params)


def test_fp8_checkpoint_dequantizes_like_the_original(tmp_path):
    """Official fp8 weights with a per-layer scale map: W = W_fp8.to(bf16) * scale, for every block linear."""
    params = random_params(CFG, ml_dtypes.bfloat16, seed=5)
    state = {name: to_torch(a) for name, a in params_to_official(CFG, params, progress=False)}
    scales, expected = {}, dict(state)
    for name, w in state.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and name.startswith(("double_blocks", "single_blocks")) and w.ndim == 2:
            scale = w.float().abs().max() / 448.0
            fp8 = (w.float() / scale).to(torch.float8_e4m3fn)
            state[name], scales[module] = fp8, scale
            expected[name] = fp8.to(torch.bfloat16) * scale
    assert len(scales) == 2 * 10 + 2 * 3
    torch.save({"module": state}, tmp_path / "mp_rank_00_model_states_fp8.pt")
    torch.save(scales, tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    cfg, loaded = load_torch_dit(tmp_path / "mp_rank_00_model_states_fp8.pt", config=dict(rope_axes_dim=(4, 6, 6)),
                                 progress=False)
    assert cfg.param_dtype == "bfloat16"
    back = dict(params_to_official(cfg, loaded, progress=False))
    for name, want in expected.items():
        assert back[name].tobytes() == to_numpy(want).tobytes(), name


def test_names_and_shapes_match_the_reference_table_for_13b():
    """Every one of the 856 official tensors of the 13B model and its 1264 diffusers tensors, names and shapes."""
    with open(TSV) as f:
        rows = [line.rstrip("\n").split("\t") for line in list(f)[1:]]
    cfg = DiTConfig()
    official = {n for g in conversion_groups(cfg) for n in g.official}
    table_official = {r[0]: eval(r[1]) for r in rows}  # noqa: S307 - shapes like [3072, 16]
    assert official == set(table_official) and len(official) == 856
    mapped = {}
    for name, shape in table_official.items():
        # Only the leading axis is ever split or joined: convert a 1-D stand-in of that length.
        for d_name, part in official_to_diffusers(name, np.zeros(shape[0], np.int8), cfg.hidden_size):
            mapped[d_name] = (part.shape[0],) + tuple(shape[1:])
    with open(TSV) as f:  # columns: official, shape, diffusers, shape, transform
        table_diffusers = {cols[2]: tuple(eval(cols[3])) for cols in (line.rstrip("\n").split("\t")  # noqa: S307
                                                                       for line in list(f)[1:])}
    assert mapped == table_diffusers and len(mapped) == 1264


def test_13b_param_tree_matches_official_shapes_without_allocating():
    cfg = DiTConfig()
    shapes = param_shapes(cfg)
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert n == 12_821_012_544


def test_errors_name_missing_unexpected_and_mismatched_tensors(official_bf16):
    _, state, _ = official_bf16
    broken = dict(state)
    del broken["double_blocks.1.img_mlp.fc2.weight"]
    broken["double_blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(KeyError) as e:
        load_torch_dit(broken, config=dict(rope_axes_dim=(4, 6, 6)), progress=False)
    assert "double_blocks.1.img_mlp.fc2.weight" in str(e.value) and "double_blocks.0.extra.weight" in str(e.value)
    bad = dict(state)
    bad["double_blocks.1.img_mlp.fc1.weight"] = torch.zeros(250, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"double_blocks.1.img_mlp.fc1.weight is \(250, 64\) in the checkpoint, "
                                         r"the config expects \(256, 64\)"):
        load_torch_dit(bad, config=dict(rope_axes_dim=(4, 6, 6)), progress=False)
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        load_torch_dit({"foo.weight": torch.zeros(2)}, progress=False)
    with pytest.raises(ValueError, match="head dim 16 differs"):
        load_torch_dit(state, progress=False)


def test_cli_roundtrip_official_to_flax_to_diffusers(official_bf16, tmp_path):
    params, state, path = official_bf16
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(str(path) + ".config.json", "w") as f:  # supplies the RoPE split the weights cannot tell
        import json
        json.dump(CFG.to_dict() | {"param_dtype": "bfloat16"}, f)
    run = lambda *a: subprocess.run([sys.executable, "-m", "hyvideo_jax.convert", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True)
    r = run("to-flax", f"--src={path}", f"--out={tmp_path / 'flax'}")
    assert r.returncode == 0, r.stderr
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    assert "converting to Flax" in r.stderr and f"{n_params:,}" in r.stdout
    r = run("to-torch", f"--src={tmp_path / 'flax'}", f"--out={tmp_path / 'diffusers'}", "--layout=diffusers")
    assert r.returncode == 0, r.stderr
    _, loaded = load_torch_dit(tmp_path / "diffusers", progress=False)
    assert_trees_bitwise_equal(loaded, params)
    r = run("to-flax", f"--src={tmp_path / 'missing.pt'}", f"--out={tmp_path / 'x'}")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr
