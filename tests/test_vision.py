"""Parity of the Flax CLIP vision tower and LLaVA image encoder with transformers' CLIPVisionModel and
LlavaForConditionalGeneration.get_image_features, loaded through our importer."""

import jax
import numpy as np
import pytest
import torch

from hyvideo_jax.convert.vision import load_clip_vision, load_llava_vision
from hyvideo_jax.models.vision import CLIPVisionConfig, CLIPVisionTower, LlavaImageEncoder, LlavaVisionConfig
from tests.test_text_encoders import randomize, rel_err

transformers = pytest.importorskip("transformers")


def tiny_vision_config(**kw):
    # 8 × 8 images in 2 × 2 patches: 16 patches + the class token; head_dim 8.
    base = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=8,
                patch_size=2, num_channels=3, layer_norm_eps=1e-5, attn_implementation="eager")
    base.update(kw)
    return transformers.CLIPVisionConfig(**base)


def images(batch: int, channels: int, size: int = 8, seed: int = 0):
    """torch pixel values [B, C, H, W] and the same images channel-last for our modules."""
    pixels = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return pixels, pixels.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("hidden_act,channels,prefixed", [("quick_gelu", 3, False), ("gelu", 4, True)])
def test_clip_vision_hidden_states_match_transformers(tmp_path, hidden_act, channels, prefixed):
    """Every hidden state (the embedding, layer -2 as LLaVA reads it, the last) and the pooled output, fp32.

    A transformers 5 folder (config.json + safetensors), and a state dict in the older `vision_model.` layout with
    another activation and channel count, read from the config."""
    hf_cfg = tiny_vision_config(hidden_act=hidden_act, num_channels=channels)
    model = randomize(transformers.CLIPVisionModel(hf_cfg), seed=4)
    if prefixed:
        cfg, params = load_clip_vision({f"vision_model.{k}": v for k, v in model.state_dict().items()},
                                       hf_cfg.to_dict())
    else:
        model.save_pretrained(tmp_path)
        cfg, params = load_clip_vision(tmp_path)
    assert (cfg.hidden_act, cfg.num_channels, cfg.num_patches) == (hidden_act, channels, 16)
    assert params["layers"]["q_proj"]["kernel"].shape == (3, 32, 4, 8)
    pixels, ours_in = images(2, channels)
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True)
    pooled, states = CLIPVisionTower(cfg).apply({"params": params}, ours_in)
    assert states.shape == (4, 2, 17, 32) and len(ref.hidden_states) == 4
    errors = {}
    for layer in (0, -2, -1):
        errors[layer] = rel_err(states[layer], ref.hidden_states[layer].numpy())
    errors["pooled"] = rel_err(pooled, ref.pooler_output.numpy())
    print(f"CLIP vision ({hidden_act}) fp32 relative max abs errors: "
          + ", ".join(f"{k}: {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= 1e-5
    # The states differ from layer to layer, so a wrong index could not pass.
    assert rel_err(states[-2], ref.hidden_states[-1].numpy()) > 0.1


def tiny_llava(strategy: str, feature_layer, seed: int):
    text = transformers.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")
    hf_cfg = transformers.LlavaConfig(vision_config=tiny_vision_config().to_dict(), text_config=text.to_dict(),
                                      image_token_index=39, vision_feature_layer=feature_layer,
                                      vision_feature_select_strategy=strategy)
    return hf_cfg, randomize(transformers.LlavaForConditionalGeneration(hf_cfg), seed=seed)


def old_llava_names(state: dict) -> dict:
    """The layout of transformers 4 LLaVA checkpoints (e.g. llava-llama-3-8b-v1_1-transformers)."""
    renamed = {}
    for k, v in state.items():
        k = k.replace("model.vision_tower.", "vision_tower.vision_model.")
        k = k.replace("model.language_model.", "language_model.model.")
        renamed[k.replace("model.multi_modal_projector.", "multi_modal_projector.")] = v
    return renamed


@pytest.mark.parametrize("strategy,feature_layer,layout", [("default", -2, "memory"), ("full", -2, "folder"),
                                                          ("default", [-3, -1], "old")])
def test_llava_image_features_match_transformers(tmp_path, strategy, feature_layer, layout):
    """Projected features of both select strategies (and two concatenated layers) against get_image_features, from
    the three name layouts: transformers 5 in memory (`model.`), its saved folder, and the older checkpoints."""
    hf_cfg, llava = tiny_llava(strategy, feature_layer, seed=5)
    if layout == "folder":
        llava.save_pretrained(tmp_path)
        cfg, params = load_llava_vision(tmp_path)
    else:
        state = llava.state_dict() if layout == "memory" else old_llava_names(llava.state_dict())
        cfg, params = load_llava_vision(state, hf_cfg.to_dict())
    # Only the layers that feed the selected states are loaded; post_layernorm is never read.
    assert cfg.num_layers_run == (2 if feature_layer == -2 else 3)
    assert params["vision_tower"]["layers"]["fc1"]["kernel"].shape[0] == cfg.num_layers_run
    assert "post_layernorm" not in params["vision_tower"]
    pixels, ours_in = images(2, 3, seed=1)
    with torch.no_grad():
        out = llava.get_image_features(pixel_values=pixels, vision_feature_layer=feature_layer,
                                       vision_feature_select_strategy=strategy)
    ref = torch.stack(list(out.pooler_output)).numpy()
    ours = np.asarray(LlavaImageEncoder(cfg).apply({"params": params}, ours_in))
    assert ours.shape == ref.shape == (2, cfg.num_image_tokens, 24)
    assert cfg.num_image_tokens == (17 if strategy == "full" else 16)
    err = rel_err(ours, ref)
    print(f"LLaVA image features ({strategy}, layer {feature_layer}) fp32 relative max abs error: {err:.2e}")
    assert err <= 1e-5


def test_wrong_images_and_configs_are_named():
    cfg = LlavaVisionConfig(vision=CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=8, patch_size=2),
                            text_hidden_size=8)
    model, key = LlavaImageEncoder(cfg), jax.random.PRNGKey(0)
    params = model.init(key, np.zeros((1, 8, 8, 3), np.float32))["params"]
    with pytest.raises(ValueError, match=r"images must be 8×8 .*got 16×16"):
        model.apply({"params": params}, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"num_channels=3 channels in the last axis.*channel-first"):
        model.apply({"params": params}, np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"num_channels=3 .*\(1, 8, 8, 1\)"):
        model.apply({"params": params}, np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        model.apply({"params": params}, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="llava.vision_feature_select_strategy"):
        LlavaVisionConfig(vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match=r"llava.vision_feature_layer.*\[-3, 2\]"):
        LlavaVisionConfig(vision=cfg.vision, vision_feature_layer=-4)
    with pytest.raises(ValueError, match="clip_vision.patch_size: must divide image_size=8"):
        CLIPVisionConfig(image_size=8, patch_size=3)
    # A checkpoint of another size: the loader names the tensors and both shapes.
    hf_cfg, llava = tiny_llava("default", -2, seed=6)
    with pytest.raises(ValueError, match=r"position_embedding.weight: checkpoint \(17, 32\), model expects \(5, 32\)"):
        load_llava_vision(llava.state_dict(), hf_cfg.to_dict(), vision={"image_size": 4})


def test_llava_loader_places_shards_on_a_mesh():
    """With a mesh, each tensor lands with its logical-axis sharding (8 CPU devices: fsdp 2 × tensor 4) and the
    sharded encoder gives the single-device features."""
    import flax.linen as nn
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES

    hf_cfg, llava = tiny_llava("default", -2, seed=7)
    cfg, params = load_llava_vision(llava.state_dict(), hf_cfg.to_dict())
    mesh = create_mesh(MeshConfig(ici=(1, 2, 1, 4)))
    _, sharded = load_llava_vision(llava.state_dict(), hf_cfg.to_dict(), mesh=mesh)
    fc1 = sharded["vision_tower"]["layers"]["fc1"]["kernel"]   # [layers, embed, mlp]
    assert tuple(fc1.sharding.spec) == (None, "fsdp", "tensor")
    assert tuple(sharded["multi_modal_projector"]["linear_1"]["kernel"].sharding.spec) == ("fsdp", "tensor")
    _, x = images(2, 3, seed=2)
    ref = LlavaImageEncoder(cfg).apply({"params": params}, x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(lambda p, x: LlavaImageEncoder(cfg).apply({"params": p}, x))(sharded, x)
    assert rel_err(out, ref) <= 1e-6
