"""The image-to-video transformers (HunyuanVideo-I2V): token_replace and latent_concat equal diffusers'
HunyuanVideoTransformer3DModel(image_condition_type=...), convert exactly both ways in both layouts, the first
frame's tokens really take the timestep-0 modulation, sequence parallelism changes nothing, and configs map
between diffusers, the official arguments and ours.

Kept cheap: one tiny diffusers model per case for the whole file, fp32, a few hundred image tokens at most."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from hyvideo_jax.convert import load_torch_dit, save_torch_dit
from hyvideo_jax.convert.dit import open_torch_dit, params_to_official
from hyvideo_jax.convert.dit_configs import (RELEASED, config_from_diffusers, config_from_official,
                                             config_to_diffusers, config_to_official, released_config)
from hyvideo_jax.convert.torch_io import to_torch
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT, TokenReplaceVec, run_layers
from hyvideo_jax.models.image_condition import (initial_latents, latent_concat_input, model_input,
                                                token_replace_input)
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
from hyvideo_jax.parallel.sharding import abstract_params, param_shardings, place_params
from tests.dit_reference import TINY, diffusers_dit, diffusers_forward, dit_inputs, jax_inputs, relative_error
from tests.test_dit_convert import assert_trees_bitwise_equal, random_params

LATENT_C = TINY["out_channels"]
CASES = {
    # name: (diffusers config overrides, input overrides). Frame 0 is 3×5 = 15 tokens of 45, 2×4 = 8 of 16, ...
    "token_replace": (dict(image_condition_type="token_replace"), dict(frames=3, height=6, width=10, valid=(5, 1))),
    "token_replace_no_guidance": (dict(image_condition_type="token_replace", guidance_embeds=False),
                                  dict(frames=2, height=4, width=8, valid=(7, 3))),
    "token_replace_temporal_patch": (dict(image_condition_type="token_replace", patch_size_t=2, num_single_layers=3),
                                     dict(frames=4, height=4, width=6, valid=(2, 4))),
    "latent_concat": (dict(image_condition_type="latent_concat", in_channels=2 * LATENT_C + 1, guidance_embeds=False),
                      dict(frames=3, height=6, width=10, valid=(5, 1))),
    "latent_concat_guidance": (dict(image_condition_type="latent_concat", in_channels=2 * LATENT_C + 1),
                               dict(frames=2, height=4, width=8, valid=(7, 3))),
}


def i2v_inputs(overrides: dict, input_kw: dict):
    """diffusers-layout inputs whose latents are what the pipeline feeds: for latent_concat the concatenation of
    (noisy latents, image latent on frame 0, mask) built as `HunyuanVideoImageToVideoPipeline` builds it, for
    token_replace latents with frame 0 = the image latent; plus (noisy latents, image latent) channel-last."""
    cfg = {**TINY, **overrides}
    x, *rest = dit_inputs(cfg, **input_kw)
    g = torch.Generator().manual_seed(7)
    noisy = torch.randn(x.shape[0], LATENT_C, *x.shape[2:], generator=g)
    image = torch.randn(x.shape[0], LATENT_C, 1, *x.shape[3:], generator=g)
    if cfg["image_condition_type"] == "latent_concat":   # the pipeline's own steps
        image_latents = image.repeat(1, 1, x.shape[2], 1, 1)
        image_latents[:, :, 1:] = 0
        mask = image_latents.new_ones(image_latents.shape[0], 1, *image_latents.shape[2:])
        mask[:, :, 1:] = 0
        x = torch.cat([noisy, image_latents, mask], dim=1)
    else:
        x = torch.cat([image, noisy[:, :, 1:]], dim=2)
    channel_last = lambda t: t.permute(0, 2, 3, 4, 1).numpy()  # noqa: E731
    return (x, *rest), (channel_last(noisy), channel_last(image))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, config, params loaded from the saved diffusers folder, torch inputs, (noisy, image), diffusers output)."""
    overrides, input_kw = CASES[request.param]
    model = diffusers_dit(seed=11, **overrides)
    folder = tmp_path_factory.mktemp(request.param.replace("_", ""))
    model.save_pretrained(folder)
    inputs, latents = i2v_inputs(overrides, input_kw)
    cfg, params = load_torch_dit(folder, progress=False)
    return request.param, cfg, params, inputs, latents, diffusers_forward(model, inputs)


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg: DiTConfig):
    return jax.jit(HunyuanVideoDiT(cfg).apply)


def test_fp32_parity_with_diffusers(case):
    name, cfg, params, inputs, (noisy, image), ref = case
    assert cfg.image_condition_type == CASES[name][0]["image_condition_type"]
    x, *rest = jax_inputs(inputs)
    ours_x = model_input(cfg.image_condition_type, noisy, image)   # our helper builds what the pipeline feeds
    np.testing.assert_array_equal(np.asarray(ours_x), x)
    out = jitted_apply(cfg)({"params": params}, ours_x, *rest)
    err = relative_error(out, ref)
    print(f"{name}: fp32 max abs error / output scale = {err:.2e} (max |ref| {np.abs(ref).max():.2f})")
    assert out.shape == ref.shape and out.shape[-1] == LATENT_C
    assert err <= 1e-4


@pytest.mark.parametrize("name", ["token_replace", "latent_concat"])
def test_roundtrip_through_both_torch_layouts_is_exact(name, tmp_path):
    """ours → official .pt and diffusers folder → ours, bit for bit, config included; the official file read without
    its side-car config needs the variant named (token_replace has the text-to-video tensors); diffusers loads our
    export as the same variant and gives our output."""
    from diffusers import HunyuanVideoTransformer3DModel
    cfg = config_from_diffusers({**TINY, **CASES[name][0]}, param_dtype="float32")
    inputs, _ = i2v_inputs(*CASES[name])
    params = random_params(cfg, seed=5)
    folder = save_torch_dit(cfg, params, tmp_path / "diffusers", progress=False)
    cfg_d, back_d = load_torch_dit(folder, progress=False)
    assert cfg_d == cfg
    assert_trees_bitwise_equal(back_d, params)
    pt = save_torch_dit(cfg, params, tmp_path / "mp_rank_00_model_states.pt", layout="official", progress=False)
    cfg_o, back_o = load_torch_dit(pt, progress=False)   # the side-car config says which variant
    assert cfg_o == cfg
    assert_trees_bitwise_equal(back_o, params)
    state = {n: to_torch(a) for n, a in params_to_official(cfg, params, progress=False)}
    bare_cfg, bare = load_torch_dit(state, config=dict(rope_axes_dim=cfg.rope_axes_dim), progress=False)
    want = "latent_concat" if cfg.image_condition_type == "latent_concat" else None   # what the tensors tell
    assert bare_cfg.image_condition_type == want and dataclasses.replace(bare_cfg, image_condition_type=None) == \
        dataclasses.replace(cfg, image_condition_type=None)
    named_cfg, _ = load_torch_dit(state, config=dict(rope_axes_dim=cfg.rope_axes_dim,
                                                     image_condition_type=cfg.image_condition_type), progress=False)
    assert named_cfg == cfg
    assert_trees_bitwise_equal(bare, params)
    model = HunyuanVideoTransformer3DModel.from_pretrained(folder).eval()
    assert model.config.image_condition_type == cfg.image_condition_type
    ref = diffusers_forward(model, inputs)
    err = relative_error(jitted_apply(cfg)({"params": params}, *jax_inputs(inputs)), ref)
    print(f"{name}: exported folder in diffusers vs ours, max abs error / scale = {err:.2e}")
    assert err <= 1e-4


@functools.lru_cache(maxsize=None)
def _jitted_stacks(cfg: DiTConfig):
    def apply(params, *inputs):
        def blocks(img, txt, vec, cos, sin, segments):
            run = functools.partial(run_layers, cfg, params, vec=vec, cos=cos, sin=sin, text_segments=segments)
            out = run("single_blocks", 0, cfg.depth_single, *run("double_blocks", 0, cfg.depth_double, img, txt))[0]
            return out, (out, vec)
        return HunyuanVideoDiT(cfg).apply({"params": params}, *inputs, blocks=blocks)
    return jax.jit(apply)


def _stack_outputs(cfg, params, inputs):
    """The image tokens after all blocks [B, N, D] through the `blocks=` hook (`run_layers`, as cached sampling runs
    them), the final output, and the hook's `vec`."""
    out, (tokens, vec) = _jitted_stacks(cfg)(params, *inputs)
    return np.asarray(tokens), np.asarray(out), vec


def test_first_frame_tokens_take_the_timestep_0_modulation():
    """With the attention output projections zeroed no token sees another, so after all blocks each image token of
    the token_replace model at timestep t must equal the text-to-video model's (same parameters) at timestep 0 on
    the first latent frame and at t on the others: a mask off by a token, a row or a frame fails. Also the `blocks=`
    hook (`run_layers`, cached sampling's path) gives the model's own output and carries the first-frame mask."""
    cfg = DiTConfig(in_channels=4, out_channels=4, hidden_size=64, num_heads=4, depth_double=2, depth_single=2,
                    text_states_dim=32, pooled_text_dim=24, rope_axes_dim=(4, 6, 6), guidance_embed=False,
                    image_condition_type="token_replace")
    t2v = dataclasses.replace(cfg, image_condition_type=None)
    params = random_params(cfg, seed=9)
    for path in (("double_blocks", "img_attn_proj"), ("double_blocks", "txt_attn_proj"),
                 ("single_blocks", "linear2_attn")):
        leaf = params[path[0]][path[1]]
        leaf["kernel"] = np.zeros_like(leaf["kernel"])
    x, t, text, mask, pooled, _ = jax_inputs(dit_inputs({**TINY, "guidance_embeds": False}, frames=3, height=6,
                                                        width=10))
    grid = (3, 3, 5)
    tr_tokens, tr_out, vec = _stack_outputs(cfg, params, (x, t, text, mask, pooled))
    at_t, _, plain_vec = _stack_outputs(t2v, params, (x, t, text, mask, pooled))
    at_0, _, _ = _stack_outputs(t2v, params, (x, np.zeros_like(t), text, mask, pooled))
    assert isinstance(vec, TokenReplaceVec) and not isinstance(plain_vec, TokenReplaceVec)
    frame0 = grid[1] * grid[2]
    np.testing.assert_array_equal(np.asarray(vec.first_frame), np.arange(np.prod(grid)) < frame0)
    scale = np.abs(at_t).max()
    np.testing.assert_allclose(tr_tokens[:, :frame0], at_0[:, :frame0], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(tr_tokens[:, frame0:], at_t[:, frame0:], rtol=0, atol=1e-6 * scale)
    gap = np.abs(at_0[:, :frame0] - at_t[:, :frame0]).max()
    print(f"frame-0 tokens: timestep 0 vs t differ by {gap / scale:.2f} of the scale; token_replace matches "
          f"within 1e-6")
    assert gap > 0.05 * scale   # so the two checks above tell the modulations apart
    plain = jitted_apply(cfg)({"params": params}, x, t, text, mask, pooled)
    np.testing.assert_allclose(tr_out, np.asarray(plain), rtol=0, atol=1e-6 * np.abs(plain).max())


@pytest.fixture(scope="module")
def token_replace_one_device():
    """A token_replace model whose 24 image tokens split evenly over 4 or 8 devices, the first frame's 8 tokens
    ending inside a shard; its output on one device (checked against diffusers')."""
    overrides = dict(image_condition_type="token_replace")
    model = diffusers_dit(seed=12, **overrides)
    inputs, _ = i2v_inputs(overrides, dict(frames=3, height=4, width=8, valid=(5, 2)))
    cfg, params = load_torch_dit(model.state_dict(), config=dict(rope_axes_dim=TINY["rope_axes_dim"],
                                                                 image_condition_type="token_replace"), progress=False)
    args = jax_inputs(inputs)
    ref = np.asarray(jitted_apply(cfg)({"params": params}, *args))
    assert relative_error(ref, diffusers_forward(model, inputs)) <= 1e-4
    return cfg, params, args, ref


@pytest.mark.parametrize("mesh_shape, method", [((2, 1, 4, 1), "auto"), ((1, 1, 8, 1), "ring")],
                         ids=["data2xseq4-ulysses", "seq8-ring"])
def test_sequence_sharded_token_replace_equals_one_device(token_replace_one_device, mesh_shape, method):
    """Image tokens split over the 'sequence' axis (Ulysses, ring) give the one-device output."""
    cfg, params, args, ref = token_replace_one_device
    cfg = dataclasses.replace(cfg, sequence_parallel=method)
    mesh = create_mesh(MeshConfig(ici=mesh_shape))
    sharded = place_params(params, param_shardings(abstract_params(HunyuanVideoDiT(cfg), *args), mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(HunyuanVideoDiT(cfg).apply)({"params": sharded}, *args)
    err = relative_error(out, ref)
    print(f"{method} on mesh {mesh_shape}: max abs difference / scale against one device = {err:.1e}")
    assert err <= 2e-5


def test_input_helpers():
    """latent_concat and token_replace inputs in channel-last layout, and the pipelines' starting latents."""
    rng = np.random.default_rng(0)
    noisy = rng.standard_normal((2, 3, 4, 6, 5), np.float32)
    image = rng.standard_normal((2, 1, 4, 6, 5), np.float32)
    x = np.asarray(latent_concat_input(noisy, image))
    assert x.shape == (2, 3, 4, 6, 11)
    np.testing.assert_array_equal(x[..., :5], noisy)
    np.testing.assert_array_equal(x[:, :1, ..., 5:10], image)
    assert not x[:, 1:, ..., 5:].any() and (x[:, 0, ..., 10] == 1).all()
    x = np.asarray(token_replace_input(noisy, image))
    np.testing.assert_array_equal(x[:, :1], image)
    np.testing.assert_array_equal(x[:, 1:], noisy[:, 1:])
    start = torch.from_numpy(noisy) * torch.tensor([0.999]) + torch.from_numpy(image) * (1 - torch.tensor([0.999]))
    np.testing.assert_array_equal(np.asarray(initial_latents(noisy, image)), start.numpy())
    np.testing.assert_array_equal(np.asarray(model_input(None, noisy)), noisy)
    with pytest.raises(ValueError, match="needs the image latent"):
        model_input("latent_concat", noisy)
    with pytest.raises(ValueError, match=r"image latent must be \[B, 1, H, W, C\]"):
        latent_concat_input(noisy, image[:, :, :2])


# Diffusers' scripts/convert_hunyuan_video_to_diffusers.py, TRANSFORMER_CONFIGS (the released transformers).
DIFFUSERS_RELEASED = {
    name: dict(in_channels=c_in, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
               qk_norm="rms_norm", guidance_embeds=guidance, text_embed_dim=4096, pooled_projection_dim=768,
               rope_theta=256.0, rope_axes_dim=[16, 56, 56], image_condition_type=kind)
    for name, c_in, guidance, kind in (("HYVideo-T/2-cfgdistill", 16, True, None),
                                       ("HYVideo-T/2-I2V-33ch", 33, False, "latent_concat"),
                                       ("HYVideo-T/2-I2V-16ch", 16, True, "token_replace"))}


def test_released_configs_map_to_diffusers_and_official_arguments():
    assert sorted(RELEASED) == sorted(DIFFUSERS_RELEASED)
    for name, theirs in DIFFUSERS_RELEASED.items():
        cfg = released_config(name)
        ours = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
        assert ours == theirs, name
        assert config_from_diffusers(theirs) == cfg
        assert config_from_official(config_to_official(cfg)) == cfg
    assert released_config("HYVideo-T/2-cfgdistill") == DiTConfig()   # our defaults are the T2V release
    # the official I2V inference code's model: "HYVideo-T/2" from HUNYUAN_VIDEO_CONFIG, channels and flags added
    official = dict(mm_double_blocks_depth=20, mm_single_blocks_depth=40, rope_dim_list=[16, 56, 56],
                    hidden_size=3072, heads_num=24, mlp_width_ratio=4, patch_size=[1, 2, 2], in_channels=33,
                    out_channels=16, qkv_bias=True, qk_norm=True, qk_norm_type="rms", mlp_act_type="gelu_tanh",
                    text_projection="single_refiner", use_attention_mask=True, text_states_dim=4096,
                    text_states_dim_2=768, i2v_condition_type="latent_concat")
    assert config_from_official(official) == released_config("HYVideo-T/2-I2V-33ch")


def test_released_name_selects_the_variant_of_an_official_checkpoint(tmp_path, capsys):
    """An official-layout checkpoint opened with a released transformer's name as its config is that variant, in the
    checkpoint's stored dtype (the text-to-video tensors of a token_replace model cannot say so themselves); the
    conversion command takes the name as --model (here refused: the tiny file is not the 13B model)."""
    from hyvideo_jax.convert.__main__ import main
    cfg = DiTConfig(in_channels=4, out_channels=4, hidden_size=64, num_heads=4, depth_double=1, depth_single=1,
                    text_states_dim=32, pooled_text_dim=24, rope_axes_dim=(4, 6, 6))
    state = {n: to_torch(a) for n, a in params_to_official(cfg, random_params(cfg, ml_dtypes.bfloat16),
                                                           progress=False)}
    named, _, _ = open_torch_dit(state, config="HYVideo-T/2-I2V-16ch")
    assert named == released_config("HYVideo-T/2-I2V-16ch", param_dtype="bfloat16")
    assert named.image_condition_type == "token_replace" and open_torch_dit(state, config=dict(
        rope_axes_dim=(4, 6, 6)))[0].image_condition_type is None
    with pytest.raises(ValueError, match="unknown released transformer 'HYVideo-T/2-I2V'"):
        load_torch_dit(state, config="HYVideo-T/2-I2V", progress=False)
    torch.save({"module": state}, tmp_path / "tiny.pt")
    assert main(["to-flax", f"--src={tmp_path / 'tiny.pt'}", f"--out={tmp_path / 'flax'}",
                 "--model=HYVideo-T/2-I2V-16ch"]) == 2
    err = capsys.readouterr().err   # the 13B model was asked for: the tiny file lacks its blocks 1..
    assert "missing (" in err and "double_blocks.1.img_mod.linear.weight" in err


def test_bad_configs_fail_with_a_sentence():
    with pytest.raises(ValueError, match=r"model.image_condition_type: must be one of \(None, 'token_replace', "
                                         r"'latent_concat'\).*got 'concat'"):
        DiTConfig(image_condition_type="concat")
    with pytest.raises(ValueError, match=r"model.in_channels: image_condition_type 'latent_concat' .* in_channels "
                                         r"must be 2·out_channels \+ 1 = 33, got 16"):
        DiTConfig(image_condition_type="latent_concat")
    with pytest.raises(ValueError, match=r"model.in_channels: .* = 9, got 8"):
        config_from_diffusers({**TINY, "in_channels": 8, "image_condition_type": "latent_concat"})
    with pytest.raises(ValueError, match="official argument qk_norm_type='layer' is not supported"):
        config_from_official(dict(RELEASED["HYVideo-T/2-I2V-16ch"], qk_norm_type="layer"))
    with pytest.raises(ValueError, match=r"unknown official model argument\(s\) \['i2v_mode'\]"):
        config_from_official(dict(RELEASED["HYVideo-T/2-I2V-16ch"], i2v_mode=True))
    with pytest.raises(ValueError, match="image_condition_type must be one of"):
        model_input("replace", np.zeros((1, 2, 2, 2, 4)), np.zeros((1, 1, 2, 2, 4)))
    cfg = DiTConfig(in_channels=9, out_channels=4, hidden_size=64, num_heads=4, depth_double=1, depth_single=1,
                    text_states_dim=32, pooled_text_dim=24, rope_axes_dim=(4, 6, 6), guidance_embed=False,
                    image_condition_type="latent_concat")
    x, t, text, mask, pooled, _ = jax_inputs(dit_inputs({**TINY, "guidance_embeds": False}, frames=2, height=4,
                                                        width=4))
    with pytest.raises(ValueError, match="latents have 4 channels, the model expects in_channels=9"):
        HunyuanVideoDiT(cfg).init(jax.random.PRNGKey(0), x, t, text, mask, pooled)
    assert jnp.asarray(latent_concat_input(x, x[:, :1])).shape[-1] == 9
