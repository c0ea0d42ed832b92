"""The image-to-video prompt path against the references: LLaVA (`LlavaForConditionalGeneration`, hidden state −3
over the merged image + text sequence) and diffusers' `HunyuanVideoImageToVideoPipeline` prompt encoding, with
tiny random encoders and byte-level tokenizers built here, loaded through our importers."""

import numpy as np
import PIL.Image
import pytest
import torch

from hyvideo_jax.convert.text_encoders import load_clip_text, load_llama
from hyvideo_jax.convert.vision import load_llava_vision
from hyvideo_jax.image_prompts import (ASSISTANT_HEADER, I2V_TEMPLATE, IMAGE_TOKEN, ImagePromptEncoders,
                                       black_images, clip_image_processor)
from hyvideo_jax.models.text_encoders import LlamaTextModel
from hyvideo_jax.models.vision import LlavaImageEncoder
from hyvideo_jax.text import CLIP_SPECIAL_TOKENS, LLM_SPECIAL_TOKENS, TextEncoders, byte_tokenizer
from tests.test_text_encoders import randomize, rel_err
from tests.test_vision import tiny_vision_config

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TEXT_LEN = 24
PROMPTS = ["a red ball", "blue"]


def pictures(seed: int, sizes=((12, 20), (9, 9))):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def parts():
    return build_parts()


def build_parts(clip_dim: int = 16, seed: int = 11) -> dict:
    """A LLaVA (CLIP ViT 8 px / 2 px patches = 16 image tokens, 4-layer Llama 32 wide), a CLIP text model, tokenizers
    where the assistant header is 4 tokens as in Llama 3 ("assistant" is one token), our encoders from them, and
    diffusers' I2V pipeline holding the same parts (no transformer, VAE or scheduler)."""
    llm_tok = byte_tokenizer(LLM_SPECIAL_TOKENS + (IMAGE_TOKEN, "assistant"), "<|begin_of_text|>", "<|end_of_text|>",
                             append_eos=False, model_max_length=1 << 20)
    clip_tok = byte_tokenizer(CLIP_SPECIAL_TOKENS, "<|startoftext|>", "<|endoftext|>", append_eos=True,
                              model_max_length=77)
    image_id = llm_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = transformers.LlamaConfig(vocab_size=len(llm_tok), hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    rope_theta=500000.0, attn_implementation="eager")
    hf = transformers.LlavaConfig(vision_config=tiny_vision_config().to_dict(), text_config=text.to_dict(),
                                  image_token_index=image_id, vision_feature_layer=-2,
                                  vision_feature_select_strategy="default")
    hf.pad_token_id = llm_tok.pad_token_id   # transformers 5 leaves it unset; diffusers' mask reads it
    llava = randomize(transformers.LlavaForConditionalGeneration(hf), seed=seed)
    clip_hf = transformers.CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=clip_dim, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                          eos_token_id=clip_tok.eos_token_id, attn_implementation="eager")
    clip = randomize(transformers.CLIPTextModel(clip_hf), seed=seed + 1)
    processor = clip_image_processor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})

    state = llava.state_dict()
    llm_cfg, llm_params = load_llama(state, hf.to_dict(), hidden_state_skip_layer=2)
    llava_cfg, vision_params = load_llava_vision(state, hf.to_dict())
    clip_cfg, clip_params = load_clip_text(clip.state_dict(), clip_hf.to_dict())
    text_encoders = TextEncoders(llm_tok, llm_cfg, llm_params, clip_tok, clip_cfg, clip_params, text_len=TEXT_LEN,
                                 clip_len=77)
    ours = ImagePromptEncoders(text_encoders, llava_cfg, vision_params, processor)
    pipe = diffusers.HunyuanVideoImageToVideoPipeline(
        text_encoder=llava, tokenizer=llm_tok, transformer=None, vae=None, scheduler=None, text_encoder_2=clip,
        tokenizer_2=clip_tok, image_processor=processor)
    return dict(ours=ours, pipe=pipe, llava=llava, llm_tok=llm_tok, image_id=image_id, clip=clip, clip_tok=clip_tok,
                processor=processor)


def reference_template(ours: ImagePromptEncoders) -> dict:
    """diffusers' template numbers recomputed for this tokenizer (the released ones are 103 / 5 / 581 / 576)."""
    tok, crop = ours.text.llm_tokenizer, ours.text.crop_start["i2v"]
    start = tok(I2V_TEMPLATE.split("{}")[0])["input_ids"].index(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    n = ours.num_image_tokens
    return {"template": I2V_TEMPLATE, "crop_start": crop, "image_emb_start": start, "image_emb_end": start + n,
            "image_emb_len": n}


def test_merged_sequence_matches_llava_layer_minus_3(parts):
    """The merged input (ids, mask, positions) equals diffusers' expansion, and the LLM states over it (image
    features at the image tokens, hidden state −3) equal LlavaForConditionalGeneration's at every position."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
        _expand_input_ids_with_image_tokens)
    ours, llava = parts["ours"], parts["llava"]
    tokens = ours.tokenize(PROMPTS)
    ids, mask = ours.text.tokenize_llm(PROMPTS, "i2v")
    t = reference_template(ours)
    ref_inputs = _expand_input_ids_with_image_tokens(
        torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), ids.shape[1], parts["image_id"],
        t["image_emb_len"], t["image_emb_start"], t["image_emb_end"], parts["llm_tok"].pad_token_id)
    for ours_key, ref_key in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
                              ("position_ids", "position_ids")):
        np.testing.assert_array_equal(tokens[ours_key], ref_inputs[ref_key].numpy(), err_msg=ours_key)
    assert tokens["input_ids"].shape == (2, ours.text.crop_start["i2v"] + TEXT_LEN + 15)

    pixels = ours.preprocess(pictures(0))
    with torch.no_grad():
        ref = llava(**ref_inputs, pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                    output_hidden_states=True).hidden_states[-3].numpy()
    features = LlavaImageEncoder(ours.llava_config).apply({"params": ours.vision_params}, pixels)
    states = LlamaTextModel(ours.text.llm_config).apply(
        {"params": ours.text.llm_params}, tokens["input_ids"], tokens["attention_mask"],
        position_ids=tokens["position_ids"], image_features=features, image_mask=tokens["image_mask"])
    err = rel_err(states, ref)
    print(f"LLaVA hidden state -3 over image + text, fp32 relative max abs error: {err:.2e}")
    assert err <= 1e-5
    # The image features matter: without them the image positions (and, through attention, the text) change.
    plain = LlamaTextModel(ours.text.llm_config).apply({"params": ours.text.llm_params}, tokens["input_ids"],
                                                       tokens["attention_mask"], position_ids=tokens["position_ids"])
    assert rel_err(plain, ref) > 0.05


@pytest.mark.parametrize("interleave", [4, 2])
def test_prompt_states_match_the_i2v_pipeline(parts, interleave):
    """Text states, mask and pooled vector equal `_get_llama_prompt_embeds` / `_get_clip_prompt_embeds` for a batch
    of two prompts and images of other sizes (the CLIP image processor resizes and crops them)."""
    ours, pipe = parts["ours"], parts["pipe"]
    images = pictures(1)
    states, mask, pooled = ours.encode_prompts(PROMPTS, images, interleave=interleave)
    with torch.no_grad():
        ref_states, ref_mask = pipe._get_llama_prompt_embeds(
            images, PROMPTS, reference_template(ours), max_sequence_length=TEXT_LEN, num_hidden_layers_to_skip=2,
            image_embed_interleave=interleave, device=torch.device("cpu"))
        ref_pooled = pipe._get_clip_prompt_embeds(PROMPTS, device=torch.device("cpu"))
    image_len = -(-16 // interleave)
    assert states.shape == (2, image_len + TEXT_LEN - 4, 32) == tuple(ref_states.shape)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask.numpy())
    errors = (rel_err(states, ref_states.numpy()), rel_err(pooled, ref_pooled.numpy()))
    print(f"I2V prompt states (interleave {interleave}) / pooled, fp32 relative max abs error: "
          f"{errors[0]:.2e} / {errors[1]:.2e}")
    assert max(errors) <= 1e-5
    assert ours.image_len(interleave) == image_len


def test_truncated_prompt_and_black_image_match_the_pipeline(parts):
    """A prompt longer than text_len (the assistant header cut: the last four positions go, as diffusers does for
    one prompt), and the negative prompt's black image."""
    ours, pipe = parts["ours"], parts["pipe"]
    long_prompt = "a small green square moves slowly to the right on a black floor"
    with pytest.warns(UserWarning, match="cut"):
        states, mask, _ = ours.encode_prompts(long_prompt, pictures(2)[:1])
    negative, negative_mask, _ = ours.encode_negative("", 32, 48)
    with torch.no_grad():
        ref, ref_mask = pipe._get_llama_prompt_embeds(pictures(2)[:1], [long_prompt], reference_template(ours),
                                                      max_sequence_length=TEXT_LEN, image_embed_interleave=4,
                                                      device=torch.device("cpu"))
        ref_neg, ref_neg_mask = pipe._get_llama_prompt_embeds(black_images(1, 32, 48), [""],
                                                              reference_template(ours), max_sequence_length=TEXT_LEN,
                                                              image_embed_interleave=4, device=torch.device("cpu"))
    assert int(np.asarray(mask).sum()) == 4 + TEXT_LEN - 4
    np.testing.assert_array_equal(np.asarray(mask), ref_mask.numpy())
    np.testing.assert_array_equal(np.asarray(negative_mask), ref_neg_mask.numpy())
    assert max(rel_err(states, ref.numpy()), rel_err(negative, ref_neg.numpy())) <= 1e-5


def test_kept_text_is_the_prompt_without_the_assistant_header():
    """With the demo's byte tokenizer the assistant header is 12 tokens: exactly those go, the prompt and the
    closing blank line stay, in order; bad inputs are named."""
    enc = ImagePromptEncoders.demo(32, 16, text_len=40, llm_layers=3, image_size=8, patch_size=2)
    tok = enc.text.llm_tokenizer
    assert enc.header_drop == len(tok(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]) == 12
    tokens = enc.tokenize(["red ball"])
    kept = tokens["input_ids"][0, tokens["keep"][0]]
    n_image = enc.image_len()
    assert (kept[:n_image] == enc.image_token_id).all()
    valid = kept[n_image:][tokens["keep_mask"][0, n_image:] > 0]
    assert tok.decode(valid) == "red ball\n\n"
    states, mask, pooled = enc.encode_prompts(["red ball", "blue"], pictures(3))
    assert states.shape == (2, enc.states_len, 32) and enc.states_len == 16 // 4 + 40 - 12
    assert np.isfinite(np.asarray(states)).all()
    with pytest.raises(ValueError, match="one '<image>' token"):
        enc.tokenize(["a <image> here"])
    with pytest.raises(ValueError, match="2 prompts need one image each"):
        enc.encode_prompts(["a", "b"], pictures(3) + pictures(4))
    with pytest.raises(ValueError, match="n in 1..5"):
        enc.encode_prompts(["a"], pictures(3)[:1], interleave=8)


def test_from_pretrained_folders_in_both_layouts(parts, tmp_path):
    """`from_pretrained` on a saved LLaVA folder (weights, tokenizer, preprocessor config) and a CLIP folder gives
    the encoders of the in-memory import; so does the older name layout of the released I2V text encoder."""
    from tests.test_vision import old_llava_names
    ours, llava, pipe = parts["ours"], parts["llava"], parts["pipe"]
    llava_dir, clip_dir = tmp_path / "text_encoder_i2v", tmp_path / "clip"
    llava.save_pretrained(llava_dir)
    parts["llm_tok"].save_pretrained(llava_dir)
    ours.image_processor.save_pretrained(llava_dir)
    pipe.text_encoder_2.save_pretrained(clip_dir)
    pipe.tokenizer_2.save_pretrained(clip_dir)
    kw = dict(dtype="float32", param_dtype="float32", crop_start=None, text_len=TEXT_LEN, clip_len=77)
    loaded = ImagePromptEncoders.from_pretrained(llava_dir, clip_dir, **kw)
    assert loaded.image_token_id == parts["image_id"] and loaded.states_len == ours.states_len
    ref = ours.encode_prompts(PROMPTS, pictures(5))
    for got, want in zip(loaded.encode_prompts(PROMPTS, pictures(5)), ref):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The older layout (language_model.model.*, vision_tower.vision_model.*), as the released folder names it.
    from safetensors.torch import save_file
    old = {k: v.contiguous() for k, v in old_llava_names(llava.state_dict()).items()}
    for f in llava_dir.glob("*.safetensors"):
        f.unlink()
    save_file(old, llava_dir / "model.safetensors")
    again = ImagePromptEncoders.from_pretrained(llava_dir, clip_dir, **kw)
    np.testing.assert_array_equal(np.asarray(again.encode_prompts(PROMPTS, pictures(5))[0]), np.asarray(ref[0]))
