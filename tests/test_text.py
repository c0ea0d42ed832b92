"""Prompt encoding: template crop and mask against diffusers' HunyuanVideo pipeline, truncation, empty prompts,
the offline demo encoders, and sharded execution."""

import types
import warnings

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec as P

from configs import tiny
from hyvideo_jax.convert.text_encoders import load_clip_text, load_llama
from hyvideo_jax.parallel.rules import MESH_AXES
from hyvideo_jax.text import LLM_SPECIAL_TOKENS, PROMPT_TEMPLATES, TextEncoders, byte_tokenizer

transformers = pytest.importorskip("transformers")
from diffusers import HunyuanVideoPipeline  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

PROMPTS = ["A red fox jumps over the lazy dog, at dusk.", "", "one"]
LONG_PROMPT = " ".join(["fox", "dog", "jumps", "red"] * 80)  # 320 words, one token each


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def word_tokenizer(folder):
    """A Llama-3-like word-level tokenizer: the template's special tokens, BOS prepended, no pad token.

    Saved to `folder` and read back with AutoTokenizer, as users load the real one.
    """
    specials = list(LLM_SPECIAL_TOKENS) + ["[UNK]"]
    split = pre_tokenizers.Whitespace()
    texts = list(PROMPT_TEMPLATES.values()) + PROMPTS + [LONG_PROMPT]
    words = set()
    for text in texts:
        for special in specials:
            text = text.replace(special, " ")
        words |= {w for w, _ in split.pre_tokenize_str(text)}
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>", unk_token="[UNK]")
    fast.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny torch encoders + tokenizers, the same weights imported into a TextEncoders, and a stand-in pipeline."""
    llm_tok = word_tokenizer(tmp_path_factory.mktemp("llm_tokenizer"))
    clip_tok = byte_tokenizer(("<|startoftext|>", "<|endoftext|>"), "<|startoftext|>", "<|endoftext|>",
                              append_eos=True, model_max_length=77)
    llm = randomize(transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=len(llm_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, attn_implementation="eager")), seed=1)
    clip = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=clip_tok.eos_token_id, attn_implementation="eager")), seed=2)
    llm_cfg, llm_params = load_llama(llm.state_dict(), llm.config.to_dict())
    clip_cfg, clip_params = load_clip_text(clip.state_dict(), clip.config.to_dict())
    encoders = TextEncoders(llm_tok, llm_cfg, llm_params, clip_tok, clip_cfg, clip_params)
    # diffusers' prompt-embedding methods only need these attributes of the pipeline.
    pipe = types.SimpleNamespace(tokenizer=llm_tok, text_encoder=llm, tokenizer_2=clip_tok, text_encoder_2=clip)
    return encoders, pipe


def diffusers_embeddings(pipe, prompts, mode, crop_start):
    with torch.no_grad():
        states, mask = HunyuanVideoPipeline._get_llama_prompt_embeds(
            pipe, prompts, {"template": PROMPT_TEMPLATES[mode], "crop_start": crop_start},
            device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=256)
        pooled = HunyuanVideoPipeline._get_clip_prompt_embeds(pipe, prompts, device=torch.device("cpu"),
                                                              dtype=torch.float32, max_sequence_length=77)
    return states.numpy(), mask.numpy(), pooled.numpy()


@pytest.mark.parametrize("mode", ["video", "image"])
def test_crop_removes_exactly_the_template_and_matches_diffusers(setup, mode):
    encoders, pipe = setup
    tok = encoders.llm_tokenizer
    crop = encoders.crop_start[mode]
    # diffusers' own count when no crop_start is given: template tokens minus the "{}" placeholder and <|eot_id|>.
    assert crop == len(tok(PROMPT_TEMPLATES[mode])["input_ids"]) - 2
    ids, full_mask = encoders.tokenize_llm(PROMPTS, mode)
    prefix = tok(PROMPT_TEMPLATES[mode].split("{}")[0])["input_ids"]
    assert ids.shape == (3, crop + 256) and (ids[:, :crop] == np.array(prefix)).all()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    states, mask, pooled = encoders.encode_prompts(PROMPTS, mode=mode)
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids) + 1   # the prompt and its <|eot_id|>
        np.testing.assert_array_equal(ids[i, crop:crop + n], prompt_ids + [eot])
        assert int(np.asarray(mask[i]).sum()) == n and np.asarray(mask[i, :n]).all()
    print(f"{mode}: crop_start {crop}, kept mask sums {np.asarray(mask).sum(1).tolist()}")
    ref_states, ref_mask, ref_pooled = diffusers_embeddings(pipe, PROMPTS, mode, crop)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    err_states, err_pooled = rel_err(states, ref_states), rel_err(pooled, ref_pooled)
    print(f"{mode}: text_states vs diffusers pipeline {err_states:.2e}, pooled {err_pooled:.2e}")
    assert states.shape == (3, 256, 32) and err_states <= 1e-4 and err_pooled <= 1e-4


def test_long_prompt_is_truncated_with_a_warning(setup):
    encoders, pipe = setup
    tok = encoders.llm_tokenizer
    with pytest.warns(UserWarning) as record:
        states, mask, pooled = encoders.encode_prompts([LONG_PROMPT, "one"])
    messages = [str(w.message) for w in record]
    assert any("prompt 0 has 321 tokens with its template end; the text encoder keeps 256" in m for m in messages)
    assert any("prompt 0 has" in m and "CLIP keeps 77" in m for m in messages)
    assert np.asarray(mask).sum(1).tolist() == [256, 2]   # the long prompt fills all 256 and loses its <|eot_id|>
    ids, _ = encoders.tokenize_llm([LONG_PROMPT])
    crop = encoders.crop_start["video"]
    np.testing.assert_array_equal(ids[0, crop:], tok(LONG_PROMPT, add_special_tokens=False)["input_ids"][:256])
    clip_ids = encoders.tokenize_clip([LONG_PROMPT])[0]
    assert clip_ids[-1] == encoders.clip_tokenizer.eos_token_id   # CLIP keeps its EOS when truncating
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_states, ref_mask, ref_pooled = diffusers_embeddings(pipe, [LONG_PROMPT, "one"], "video", crop)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    assert rel_err(states, ref_states) <= 1e-4 and rel_err(pooled, ref_pooled) <= 1e-4


def test_empty_prompts(setup):
    encoders, pipe = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # an empty prompt is ordinary input: no warning
        states, mask, pooled = encoders.encode_prompts(["", ""], mode="image")
    assert np.asarray(mask).sum(1).tolist() == [1, 1]
    np.testing.assert_allclose(np.asarray(states[0]), np.asarray(states[1]), rtol=0, atol=0)
    ref_states, _, ref_pooled = diffusers_embeddings(pipe, [""], "image", encoders.crop_start["image"])
    assert rel_err(states[:1], ref_states) <= 1e-4 and rel_err(pooled[:1], ref_pooled) <= 1e-4
    assert np.isfinite(np.asarray(states)).all()


def test_input_errors(setup):
    encoders, _ = setup
    with pytest.raises(ValueError, match=r"mode must be one of \['image', 'video'\], got 'movie'"):
        encoders.encode_prompts(["a"], mode="movie")
    with pytest.raises(ValueError, match="at least one prompt"):
        encoders.encode_prompts([])
    with pytest.raises(TypeError, match=r"prompts must be strings, got \['int'\]"):
        encoders.encode_prompts(["a", 3])
    with pytest.raises(ValueError, match=r"clip_len must be in \[1, 77\].*got 78"):
        TextEncoders(encoders.llm_tokenizer, encoders.llm_config, encoders.llm_params, encoders.clip_tokenizer,
                     encoders.clip_config, encoders.clip_params, clip_len=78)
    with pytest.warns(UserWarning, match=r"crop_start for 'video' is 95, but this tokenizer puts \d+ tokens"):
        TextEncoders(encoders.llm_tokenizer, encoders.llm_config, encoders.llm_params, encoders.clip_tokenizer,
                     encoders.clip_config, encoders.clip_params, crop_start={"video": 95})
    with pytest.raises(ValueError, match="text.llm_path is empty"):
        TextEncoders.from_config(dict(demo=False, llm_path="", clip_path=""))


def test_byte_tokenizer_words_are_single_tokens_and_other_text_stays_bytes():
    from hyvideo_jax.data.synthetic import vocabulary
    plain = byte_tokenizer(("<s>", "</s>"), "<s>", "</s>", append_eos=True, model_max_length=77)
    worded = byte_tokenizer(("<s>", "</s>"), "<s>", "</s>", append_eos=True, model_max_length=77,
                            words=vocabulary())
    caption = "a large red circle moving right quickly on a black background"
    tokens = worded.convert_ids_to_tokens(worded(caption)["input_ids"])
    assert tokens == ["<s>", "a", *[f"Ġ{w}" for w in caption.split()[1:]], "</s>"]
    for text in ("a redder cat, über 3 · 4", caption, " gray\n\nbackgrounds"):
        ids = worded(text)["input_ids"]
        assert worded.decode(ids, skip_special_tokens=True) == text
        assert len(ids) <= len(plain(text)["input_ids"])
    # Text without the words is tokenized byte by byte, with the same ids as without merges.
    assert worded("über xyz")["input_ids"] == plain("über xyz")["input_ids"]
    with pytest.raises(ValueError, match="without spaces"):
        byte_tokenizer(("<s>", "</s>"), "<s>", "</s>", append_eos=True, model_max_length=77, words=("two words",))


def test_demo_encoders_are_deterministic_and_distinct():
    config = tiny.get_config()
    captions = ["a cat on a sofa", "a dog on a sofa", "a cat on a sofa."]
    a = TextEncoders.from_config(config.text).encode_prompts(captions)
    b = TextEncoders.from_config(config.text).encode_prompts(captions)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    states, mask, pooled = (np.asarray(x) for x in a)
    assert states.shape == (3, config.text.text_len, config.model.text_states_dim)
    assert pooled.shape == (3, config.model.pooled_text_dim)
    assert mask.sum(1).tolist() == [16, 16, 17]   # bytes of the caption + <|eot_id|>
    gaps = [float(np.abs(pooled[i] - pooled[j]).max()) for i, j in ((0, 1), (0, 2), (1, 2))]
    state_gap = float(np.abs(states[0, :16] - states[1, :16]).max())
    print(f"demo: pooled pairwise max gaps {[f'{g:.3f}' for g in gaps]}, state gap {state_gap:.3f}")
    assert min(gaps) > 1e-3 and state_gap > 1e-3
    other = TextEncoders.demo(config.model.text_states_dim, config.model.pooled_text_dim, seed=1).encode_prompts(
        captions[:1])
    assert float(np.abs(np.asarray(other[2][0]) - pooled[0]).max()) > 1e-3


def test_sharded_encoding_matches_single_device():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 1, 2), MESH_AXES)
    # Loader placement: each tensor lands with the sharding of its logical axes (vocab → tensor, embed → fsdp).
    llm = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2))
    cfg, sharded = load_llama(llm.state_dict(), llm.config.to_dict(), mesh=mesh)
    assert sharded["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert sharded["layers"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    np.testing.assert_array_equal(np.asarray(sharded["embed_tokens"]), llm.embed_tokens.weight.detach().numpy())
    # End to end: the demo encoders with params sharded over an 8-device mesh equal one device.
    dims = (32, 24)
    single = TextEncoders.demo(*dims, seed=3).encode_prompts(PROMPTS)
    multi = TextEncoders.demo(*dims, seed=3, mesh=mesh)
    assert multi.llm_params["layers"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    out = multi.encode_prompts(PROMPTS)
    errs = [rel_err(x, y) for x, y in zip(out, single)]
    print(f"sharded vs single-device relative errors (states, mask, pooled): {[f'{e:.1e}' for e in errs]}")
    assert max(errs) <= 1e-5
