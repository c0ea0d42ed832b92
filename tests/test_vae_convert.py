"""VAE conversion: bit-exact round trips in both layouts and dtypes; exported folders load in diffusers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from flax import traverse_util

from hyvideo_jax.convert import load_torch_vae, save_torch_vae
from hyvideo_jax.models.vae import HunyuanVideoVAE, VAEConfig, init_params

TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(**TINY).eval()


def assert_trees_bit_equal(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(flat_a) == set(flat_b)
    for path in flat_a:
        x, y = np.ascontiguousarray(flat_a[path]), np.ascontiguousarray(flat_b[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_folder_round_trip_is_bit_exact_and_loads_in_diffusers(reference, tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    config, params = load_torch_vae(state, config=VAEConfig(**TINY))
    folder = save_torch_vae(config, params, str(tmp_path / "vae"), layout="diffusers")
    reloaded = AutoencoderKLHunyuanVideo.from_pretrained(folder, torch_dtype=dtype)
    exported = reloaded.state_dict()
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert exported[name].dtype == dtype and torch.equal(exported[name], tensor), name
    config_again, params_again = load_torch_vae(folder)  # config.json (4 groups) read back from the folder
    assert config_again.norm_num_groups == 4 and config_again.block_out_channels == (8, 16, 16, 16)
    assert_trees_bit_equal(params, params_again)


def test_exported_folder_reproduces_our_output(reference, tmp_path):
    """Our fp32 params → diffusers folder → diffusers decode equals our decode (to float rounding)."""
    config = VAEConfig(**TINY)
    model = HunyuanVideoVAE(config)
    # Fresh random Flax params (not the reference's), so the export is what carries them.
    params = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(3)))
    folder = save_torch_vae(config, params, str(tmp_path / "vae"))
    reloaded = AutoencoderKLHunyuanVideo.from_pretrained(folder).eval()
    reloaded.use_framewise_decoding = False
    latents = np.random.default_rng(0).normal(size=(1, 2, 2, 3, 4)).astype(np.float32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(latents), method=model.decode_unscaled))
    with torch.no_grad():
        theirs = reloaded.decode(torch.from_numpy(latents.transpose(0, 4, 1, 2, 3))).sample.numpy()
    error = np.abs(ours.transpose(0, 4, 1, 2, 3) - theirs).max() / np.abs(theirs).max()
    print(f"exported folder: diffusers decode vs ours, relative max error {error:.2e}")
    assert error <= 1e-4


def test_official_layout_round_trip_is_bit_exact(reference, tmp_path):
    state = reference.state_dict()
    config, params = load_torch_vae(state, config=VAEConfig(**TINY))
    folder = save_torch_vae(config, params, str(tmp_path / "official"), layout="official")
    saved = torch.load(os.path.join(folder, "pytorch_model.pt"), weights_only=True)
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in state)
    config_again, params_again = load_torch_vae(folder)
    assert config_again.tile_params().min_frames == config.tile_params().min_frames
    assert_trees_bit_equal(params, params_again)
    # The official loader's `vae.` prefix is accepted too.
    _, prefixed = load_torch_vae({f"vae.{k}": v for k, v in state.items()}, config=VAEConfig(**TINY))
    assert_trees_bit_equal(params, prefixed)


def test_key_and_shape_errors_are_listed_by_name(reference):
    state = dict(reference.state_dict())
    config = VAEConfig(**TINY)
    missing = dict(state)
    del missing["decoder.conv_out.conv.bias"]
    missing["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['decoder.conv_out.conv.bias'\], "
                                       r"unexpected \['encoder.extra.weight'\]"):
        load_torch_vae(missing, config=config)
    wrong = dict(state)
    wrong["quant_conv.weight"] = torch.zeros(8, 8, 1, 1, 2)
    with pytest.raises(ValueError, match=r"quant_conv.weight: checkpoint shape \(8, 8, 1, 1, 2\).*expected Flax shape "
                                         r"\(1, 1, 1, 8, 8\)"):
        load_torch_vae(wrong, config=config)
    with pytest.raises(ValueError, match="layout must be 'diffusers' or 'official', got 'onnx'"):
        save_torch_vae(config, load_torch_vae(state, config=config)[1], "unused", layout="onnx")
