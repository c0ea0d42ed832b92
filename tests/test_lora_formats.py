"""LoRA files ↔ our adapters: what we write loads in diffusers with our output, and every format people exchange
(diffusers/PEFT, the original module names, kohya) gives diffusers' own adapted output."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hyvideo_jax import lora
from hyvideo_jax.convert import load_torch_dit
from hyvideo_jax.convert.dit import params_to_official
from hyvideo_jax.convert.lora import load_lora, save_diffusers_lora
from hyvideo_jax.models.dit import HunyuanVideoDiT
from tests.dit_reference import TINY, diffusers_dit, diffusers_forward, dit_inputs, jax_inputs, relative_error

INPUTS = dit_inputs(TINY)
RANK = 4


@pytest.fixture(scope="module")
def base():
    """(config, params, jitted forward, diffusers' base output) of the tiny transformer."""
    model = diffusers_dit(seed=0)
    cfg, params = load_torch_dit(model.state_dict(), config=dict(rope_axes_dim=(4, 6, 6)), progress=False)
    return cfg, params, jax.jit(HunyuanVideoDiT(cfg).apply), diffusers_forward(model, INPUTS)


def ours(forward, params) -> np.ndarray:
    return np.asarray(forward({"params": params}, *jax_inputs(INPUTS)))


def random_adapters(params, seed=0):
    """Adapters on the default targets with a and b both random (b starts at zero in training)."""
    lora_config = lora.LoRAConfig(rank=RANK, alpha=8.0)
    adapters = lora.init_adapters(params, lora_config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.1 * rng.standard_normal(x.shape).astype(np.float32) if path[-1].key == "b"
        else np.asarray(x), adapters), lora_config


def original_lora(cfg, params, seed=0) -> dict[str, torch.Tensor]:
    """A random LoRA in the original module names (no prefix) on what the community trainers target."""
    shapes = {name: a.shape for name, a in params_to_official(cfg, params, progress=False)}
    modules = [f"double_blocks.{i}.{s}_{m}" for i in range(cfg.depth_double) for s in ("img", "txt")
               for m in ("attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2")]
    modules += [f"single_blocks.{i}.{m}" for i in range(cfg.depth_single) for m in ("linear1", "linear2")]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        out, n_in = shapes[f"{m}.weight"]
        state[f"{m}.lora_A.weight"] = torch.randn(RANK, n_in, generator=g) / n_in ** 0.5
        state[f"{m}.lora_B.weight"] = 0.1 * torch.randn(out, RANK, generator=g)
    return state


@pytest.fixture
def tiny_linear1_split(monkeypatch):
    """diffusers' converter splits single-block linear1 at the 13B hidden size (3072) written in; scale that split to
    the tiny hidden size, as tests/test_dit_convert.py does, so the rest of its conversion runs as it is."""
    hidden, split = TINY["num_attention_heads"] * TINY["attention_head_dim"], torch.split
    monkeypatch.setattr(torch, "split", lambda t, sizes, dim=0: split(
        t, [hidden if s == 3072 else s + 3 * (3072 - hidden) for s in sizes]
        if isinstance(sizes, (list, tuple)) and sizes[0] == 3072 else sizes, dim))


def diffusers_pipeline(model):
    from diffusers import HunyuanVideoPipeline
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=model, vae=None, scheduler=None,
                                text_encoder_2=None, tokenizer_2=None)


def test_saved_adapters_load_in_diffusers_with_our_output(base, tmp_path):
    cfg, params, forward, base_out = base
    adapters, lora_config = random_adapters(params)
    path = save_diffusers_lora(cfg, adapters, lora_config, tmp_path / "ours.safetensors")
    expected = ours(forward, lora.merge(params, adapters, lora_config))

    model = diffusers_dit(seed=0)
    model.load_lora_adapter(path, adapter_name="x")
    err, change = relative_error(expected, diffusers_forward(model, INPUTS)), relative_error(expected, base_out)
    pipe = diffusers_pipeline(diffusers_dit(seed=0))
    pipe.load_lora_weights(path, adapter_name="y")
    err_pipe = relative_error(expected, diffusers_forward(pipe.transformer, INPUTS))
    print(f"ours saved → diffusers: error {err:.2e} (pipeline {err_pipe:.2e}); the LoRA changes the output by "
          f"{change:.2e}")
    assert err <= 1e-4 and err_pipe <= 1e-4 and change > 1e-2
    # proj_out holds linear2_attn and linear2_mlp: rank 2r; every other module keeps r
    from safetensors.numpy import load_file
    saved = load_file(path)
    assert saved["transformer.single_transformer_blocks.1.proj_out.lora_A.weight"].shape == (2 * RANK, 5 * 64)
    assert saved["transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight"].shape == (64, RANK)


def test_original_names_and_kohya_give_diffusers_output(base, tmp_path, tiny_linear1_split):
    cfg, params, forward, base_out = base
    original = original_lora(cfg, params, seed=1)
    pipe = diffusers_pipeline(diffusers_dit(seed=0))
    pipe.load_lora_weights({f"diffusion_model.{k}": v for k, v in original.items()}, adapter_name="orig")
    ref = diffusers_forward(pipe.transformer, INPUTS)

    alpha = 2.0  # kohya / PEFT-config files: B · alpha / r is the update, so store B · r / alpha
    kohya = {}
    for key, value in original.items():
        module, part = key.split(".lora_")
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = (
            value if part.startswith("A") else value * RANK / alpha)
        kohya[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(kohya, tmp_path / "kohya.safetensors")
    peft_folder = tmp_path / "diffusion_pipe"   # original names + a PEFT adapter_config.json, as diffusion-pipe writes
    peft_folder.mkdir()
    save_file({f"transformer.{k}": v * (RANK / alpha if ".lora_B." in k else 1.0) for k, v in original.items()},
              peft_folder / "adapter_model.safetensors")
    (peft_folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))

    sources = {"transformer. prefix": {f"transformer.{k}": v for k, v in original.items()},
               "diffusion_model. prefix": {f"diffusion_model.{k}": v for k, v in original.items()},
               "kohya": tmp_path / "kohya.safetensors", "PEFT folder": peft_folder}
    for what, source in sources.items():
        adapters, lora_config = load_lora(source, cfg)
        err = relative_error(ours(forward, lora.merge(params, adapters, lora_config)), ref)
        print(f"{what}: ours vs diffusers' own loading of the original-name file {err:.2e}")
        assert err <= 1e-4
    assert relative_error(ref, base_out) > 1e-2
    # a fused original q|k|v LoRA is our q|k|v adapter as it is; linear1 gives linear1_qkv and linear1_mlp sharing a
    single = adapters["single_blocks"]
    assert adapters["double_blocks"]["img_attn_qkv"]["kernel"]["a"].shape == (2, 64, RANK)
    np.testing.assert_array_equal(single["linear1_qkv"]["kernel"]["a"], single["linear1_mlp"]["kernel"]["a"])


def test_peft_file_written_by_diffusers_gives_its_output(base, tmp_path):
    """A LoRA made by PEFT inside diffusers (different A per q, k, v; rank and alpha patterns in the file's
    metadata; the refiner and final layer too), saved with diffusers' save_lora_weights."""
    from diffusers import HunyuanVideoPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    cfg, params, forward, base_out = base
    model = diffusers_dit(seed=0)
    model.add_adapter(LoraConfig(
        r=RANK, lora_alpha=8, init_lora_weights=False, rank_pattern={"to_out.0": 2}, alpha_pattern={"proj_mlp": 3},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                        "proj_out", "norm1.linear"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    ref = diffusers_forward(model, INPUTS)
    HunyuanVideoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                           transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    adapters, lora_config = load_lora(path, cfg)
    err = relative_error(ours(forward, lora.merge(params, adapters, lora_config)), ref)
    # the pipeline reads alpha from the file's metadata (the model's load_lora_adapter(path) does so only with
    # use_safetensors=True, else it loads the weights with scale 1)
    pipe = diffusers_pipeline(diffusers_dit(seed=0))
    pipe.load_lora_weights(path, adapter_name="x")
    err_diffusers = relative_error(diffusers_forward(pipe.transformer, INPUTS), ref)
    print(f"PEFT file: ours vs diffusers {err:.2e} (diffusers reloading its own file {err_diffusers:.2e})")
    assert err <= 1e-4 and err_diffusers <= 1e-4 and relative_error(ref, base_out) > 1e-2
    # separate q, k, v LoRAs: one adapter of rank 3r
    assert adapters["double_blocks"]["img_attn_qkv"]["kernel"]["a"].shape == (2, 64, 3 * RANK)
    assert "final_layer" in adapters and "blocks" in adapters["txt_in"]


def test_save_then_load_is_the_same_merge(base, tmp_path):
    cfg, params, _, _ = base
    adapters, lora_config = random_adapters(params, seed=3)
    back, back_config = load_lora(save_diffusers_lora(cfg, adapters, lora_config, tmp_path / "x.safetensors"), cfg)
    assert jax.tree.map(np.shape, back) == jax.tree.map(np.shape, adapters)   # ranks come back as they were
    want, got = lora.merge(params, adapters, lora_config), lora.merge(params, back, back_config)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), want, got))
    print(f"round trip: max |ΔW| = {max(diffs):.2e}")
    assert max(diffs) <= 1e-6


def test_bad_files_are_errors_that_name_the_keys(base):
    cfg, params, _, _ = base
    good = {k: v for k, v in original_lora(cfg, params).items() if k.startswith("double_blocks.0.img_attn_qkv")}
    bad = {"transformer.transformer_blocks.0.attn.to_zz.lora_A.weight": torch.zeros(RANK, 64),
           "transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(RANK, 64),
           "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 32)}
    with pytest.raises(ValueError) as e:
        load_lora({**good, **bad}, cfg)
    print(e.value)
    assert all(k in str(e.value) for k in bad) and "img_attn_qkv" not in str(e.value)
    wrong = dict(good, **{"double_blocks.0.img_attn_qkv.lora_B.weight": torch.zeros(100, RANK)})
    with pytest.raises(ValueError, match=r"double_blocks.0.img_attn_qkv has A \(4, 64\) and B \(100, 4\), the model "
                                         r"expects \[r, 64\] and \[192, r\]"):
        load_lora(wrong, cfg)
