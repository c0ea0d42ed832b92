"""Parity of the Flax text encoders with transformers' LlamaModel / CLIPTextModel, loaded through our importer."""

import jax
import numpy as np
import pytest
import torch

from hyvideo_jax.convert.text_encoders import load_clip_text, load_llama
from hyvideo_jax.models.text_encoders import CLIPTextConfig, CLIPTextEncoder, LlamaTextConfig, LlamaTextModel

transformers = pytest.importorskip("transformers")


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(model: torch.nn.Module, seed: int):
    """Weights far from their init (norm scales around 1, biases nonzero) so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)
    return model.eval()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_llama(**kw):
    # head_dim 8, theta 1e4: wavelengths 6, 63, 628, 6283 cover the keep / blend / divide branches of llama3 (16..64).
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE), rms_norm_eps=1e-5,
                attn_implementation="eager")
    base.update(kw)
    return randomize(transformers.LlamaModel(transformers.LlamaConfig(**base)), seed=1)


def padded_batch(vocab: int, length: int, valid: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(valid), length), generator=gen)
    mask = torch.zeros(len(valid), length, dtype=torch.long)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    return ids, mask


def test_llama_hidden_state_minus_3_matches_transformers(tmp_path):
    """GQA (4 heads, 2 KV heads), Llama-3 rope scaling, right padding: hidden_states[-3] with no final norm."""
    model = tiny_llama()
    model.save_pretrained(tmp_path)  # a transformers folder: config.json + model.safetensors
    cfg, params = load_llama(tmp_path)
    assert (cfg.num_layers_run, cfg.num_key_value_heads, cfg.rope_type) == (3, 2, "llama3")
    assert set(params["layers"]) >= {"q_proj", "k_proj"} and params["layers"]["k_proj"]["kernel"].shape == (3, 32, 2, 8)
    ids, mask = padded_batch(61, 14, [14, 9, 1])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3].numpy()
    ours = np.asarray(LlamaTextModel(cfg).apply({"params": params}, ids.numpy(), mask.numpy()))
    err = rel_err(ours, ref)
    print(f"LLaMA hidden_states[-3] fp32 relative max abs error: {err:.2e}")
    assert err <= 1e-4
    # The state at a real token does not depend on the padding after it.
    alone = LlamaTextModel(cfg).apply({"params": params}, ids[1:2, :9].numpy(), mask[1:2, :9].numpy())
    assert rel_err(np.asarray(alone)[0], ref[1, :9]) <= 1e-4


def test_llama_causal_lm_layout_with_biases_and_final_norm():
    """LlamaForCausalLM names (`model.` prefix, lm_head ignored), q/k/v/o and MLP biases, last state + final norm."""
    hf_cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=3, num_key_value_heads=1, rope_theta=500.0,
                                      attention_bias=True, mlp_bias=True, attn_implementation="eager")
    lm = randomize(transformers.LlamaForCausalLM(hf_cfg), seed=2)
    cfg, params = load_llama(lm.state_dict(), hf_cfg.to_dict(), hidden_state_skip_layer=0, apply_final_norm=True)
    ids, mask = padded_batch(53, 10, [10, 6], seed=3)
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    ours = LlamaTextModel(cfg).apply({"params": params}, ids.numpy(), mask.numpy())
    err = rel_err(ours, ref)
    print(f"LLaMA (biases, final norm) last_hidden_state relative error: {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("eos_token_id", [60, 2])
def test_clip_pooled_matches_transformers(eos_token_id):
    """pooler_output at the first EOS (eos id 60), or at the largest id (legacy configs with eos_token_id=2)."""
    hf_cfg = transformers.CLIPTextConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=eos_token_id,
                                         bos_token_id=59, pad_token_id=60, attn_implementation="eager")
    model = randomize(transformers.CLIPTextModel(hf_cfg), seed=4)
    # Old checkpoints (openai/clip-vit-large-patch14) prefix the names with `text_model.`.
    state = {f"text_model.{k}": v for k, v in model.state_dict().items()}
    cfg, params = load_clip_text(state, hf_cfg.to_dict())
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 59, (3, 16), generator=gen)
    ids[:, 0] = 59
    lengths = [4, 16, 2]  # EOS position; then padding with EOS (CLIP's tokenizer pads with <|endoftext|>)
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, n - 1:] = 60
        mask[i, :n] = 1
    with torch.no_grad():
        ref = model(input_ids=ids).pooler_output.numpy()
        ref_last = model(input_ids=ids).last_hidden_state.numpy()
    pooled, last = CLIPTextEncoder(cfg).apply({"params": params}, ids.numpy())
    err = rel_err(pooled, ref)
    print(f"CLIP pooler_output (eos_token_id={eos_token_id}) relative error: {err:.2e}")
    assert err <= 1e-4 and rel_err(last, ref_last) <= 1e-4
    # The official code passes the mask, diffusers does not: the pooled EOS vector is the same.
    masked, _ = CLIPTextEncoder(cfg).apply({"params": params}, ids.numpy(), mask.numpy())
    assert rel_err(masked, ref) <= 1e-4


def test_loader_lists_missing_unknown_and_mismatched_names():
    model = tiny_llama(num_hidden_layers=3)
    state = dict(model.state_dict())
    state.pop("layers.0.mlp.up_proj.weight")
    state["layers.0.mlp.extra.weight"] = torch.zeros(3)
    state["layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # as if KV heads were not grouped
    with pytest.raises(ValueError) as err:
        load_llama(state, model.config.to_dict())
    msg = str(err.value)
    assert "missing 1 weight(s): ['layers.0.mlp.up_proj.weight']" in msg
    assert "unknown 1 weight(s): ['layers.0.mlp.extra.weight']" in msg
    assert "layers.0.self_attn.k_proj.weight: checkpoint (32, 32), model expects (16, 32)" in msg
    # The layers after the returned state are known but never read: dropping them is fine.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("layers.2.", "layers.1.", "norm."))}
    cfg, params = load_llama(state, model.config.to_dict())
    assert params["layers"]["q_proj"]["kernel"].shape[0] == cfg.num_layers_run == 1
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]), model.embed_tokens.weight.detach().numpy())
    with pytest.raises(ValueError, match="has no config.json"):
        load_clip_text({"x": torch.zeros(1)})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"llm.num_key_value_heads: must divide num_attention_heads=4, got 3"):
        LlamaTextConfig(num_attention_heads=4, num_key_value_heads=3, head_dim=8)
    with pytest.raises(ValueError, match=r"llm.rope_type: must be one of .*got 'yarn'"):
        LlamaTextConfig.from_hf({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match=r"llm.rope_scaling: rope type 'llama3' needs \['low_freq_factor'"):
        LlamaTextConfig(rope_type="llama3", rope_scaling={"factor": 8.0})
    with pytest.raises(ValueError, match=r"clip.hidden_act: must be one of .*got 'relu6'"):
        CLIPTextConfig(hidden_act="relu6")
    with pytest.raises(ValueError, match=r"unknown llm config field\(s\) \['heads'\]"):
        LlamaTextConfig.from_config({"heads": 4})
    # Older config.json files keep rope_theta / rope_scaling at the top level; both layouts give the same config.
    old_scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"} | {"type": "llama3"}
    old = LlamaTextConfig.from_hf({"rope_theta": 5e5, "rope_scaling": old_scaling})
    new = LlamaTextConfig.from_hf({"rope_parameters": dict(LLAMA3_ROPE, rope_theta=5e5)})
    assert old == new and new.rope_theta == 5e5 and dict(new.rope_scaling)["factor"] == 8.0
    cfg = CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=4)
    with pytest.raises(ValueError, match="at most max_position_embeddings=4 tokens, got 5"):
        CLIPTextEncoder(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 5), np.int32))
