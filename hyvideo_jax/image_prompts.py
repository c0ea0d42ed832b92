"""Prompt + reference image → the text conditioning of HunyuanVideo-I2V (LLaVA image tokens in the LLM input).

    encoders = ImagePromptEncoders.from_pretrained("text_encoder_i2v", "clip-vit-large-patch14", mesh=mesh)
    text_states, text_mask, pooled = encoders.encode_prompts(["a cat walks"], [PIL.Image.open("cat.png")])
    # text_states [B, image_len + text_len - 4, D_llm], text_mask likewise (image part all ones), pooled [B, D_clip]

What happens, as in diffusers' `HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds` (the parity reference):
1. The prompt goes into `I2V_TEMPLATE` (a system part holding one `<image>` token, the user turn with the prompt,
   then the assistant header), tokenized with BOS, right-padded / truncated to `crop_start + text_len`.
2. The image goes through the CLIP image processor of the LLaVA folder and `LlavaImageEncoder` (CLIP ViT layer −2,
   class token dropped, projected); its N features (576 for the released model) replace the `<image>` token, so the
   LLM reads a sequence N − 1 tokens longer. Position ids count the real tokens (padding gets 1, as diffusers).
3. The LLM's hidden state −(skip + 1) (−3) is read over that merged sequence. Kept: the image positions, every
   `image_interleave`-th (4 for the token-replace model, 2 for the 33-channel one), then the text after the template
   prefix without the four tokens `<|eot_id|><|start_header_id|>assistant<|end_header_id|>` that end the user turn
   (the tokens before the last `<|end_header_id|>`, counted with this tokenizer; if truncation cut the assistant
   header, the last four positions, as diffusers does for one prompt). Mask = [ones, the text's mask].
4. CLIP's pooled vector of the raw prompt, as in text-to-video.

The negative prompt under true CFG is encoded with a black image (`black_images`). Two points where this module is
more general than diffusers, equal to it on its inputs: the mask comes from the tokenizer (diffusers rebuilds it
from `pad_token_id`, the same unless a prompt contains the pad token), and the assistant header is found per row
(diffusers' fallback for a truncated header works for one prompt only).
"""

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.models.text_encoders import CLIPTextEncoder, LlamaTextModel
from hyvideo_jax.models.vision import CLIPVisionConfig, LlavaImageEncoder, LlavaVisionConfig
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
from hyvideo_jax.text import (DEMO_FIELDS, TEXT_FIELDS, TextEncoders, _prefix_length, pretrained_fields,
                              require_paths)

IMAGE_TOKEN = "<image>"
# diffusers' DEFAULT_PROMPT_TEMPLATE of the I2V pipeline (crop_start 103 with the released tokenizer).
I2V_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
    "according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
OFFICIAL_I2V_CROP_START = 103
ASSISTANT_HEADER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
END_HEADER = "<|end_header_id|>"
# Image features kept per image-condition type of the transformer (diffusers' `image_embed_interleave` defaults).
IMAGE_INTERLEAVE = {"token_replace": 4, "latent_concat": 2}


def clip_image_processor(folder: str | None = None, **kwargs):
    """transformers' CLIP image processor on its PIL backend (resize the short side, centre crop, normalize), from
    a folder's `preprocessor_config.json` or from `kwargs`."""
    import transformers
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(folder) if folder is not None else cls(**kwargs)


def black_images(count: int, height: int, width: int) -> list:
    """`count` black RGB images (the image of the negative prompt under true CFG, as the references)."""
    import PIL.Image
    return [PIL.Image.new("RGB", (width, height), 0) for _ in range(count)]


class ImagePromptEncoders:
    """The LLaVA LLM + CLIP text encoders of `TextEncoders` with the LLaVA image encoder and its image processor."""

    def __init__(self, text: TextEncoders, llava_config: LlavaVisionConfig, vision_params, image_processor, *,
                 image_token_id: int | None = None, template: str = I2V_TEMPLATE, crop_start: int | None = None,
                 image_interleave: int = IMAGE_INTERLEAVE["token_replace"]):
        """`text` holds the LLaVA's language model (its `llm_*`), the CLIP text model and `text_len`; `crop_start`
        None measures the template prefix with the tokenizer (the `<image>` token counted once)."""
        if template.count(IMAGE_TOKEN) != 1 or template.count("{}") != 1:
            raise ValueError(f"the I2V template needs exactly one {IMAGE_TOKEN!r} and one '{{}}', got {template!r}")
        if llava_config.text_hidden_size != text.llm_config.hidden_size:
            raise ValueError(f"the LLaVA projector makes {llava_config.text_hidden_size}-wide features, the LLM is "
                             f"{text.llm_config.hidden_size} wide")
        tok = text.llm_tokenizer
        if image_token_id is None:
            image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if tok.convert_ids_to_tokens(int(image_token_id)) != IMAGE_TOKEN:
            raise ValueError(f"the LLM tokenizer has no single {IMAGE_TOKEN!r} token with id {image_token_id}")
        self.text, self.llava_config, self.vision_params = text, llava_config, vision_params
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.end_header_id = tok.convert_tokens_to_ids(END_HEADER)
        self.header_drop = len(tok(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"])
        text.templates["i2v"] = template
        text.crop_start["i2v"] = _prefix_length(tok, template) if crop_start is None else int(crop_start)
        self.image_interleave = self._check_interleave(image_interleave)
        self._encode = jax.jit(functools.partial(_encode, text.llm_config, text.clip_config, llava_config))

    @staticmethod
    def _check_interleave(value: int) -> int:
        if not 1 <= int(value) <= 5:
            raise ValueError(f"image_interleave keeps every n-th image token, n in 1..5 (as diffusers), got {value}")
        return int(value)

    @property
    def num_image_tokens(self) -> int:
        return self.llava_config.num_image_tokens

    def image_len(self, interleave: int | None = None) -> int:
        """Image tokens kept in the text states."""
        step = self.image_interleave if interleave is None else self._check_interleave(interleave)
        return -(-self.num_image_tokens // step)

    @property
    def states_len(self) -> int:
        """Length of the text states: kept image tokens + text tokens without the assistant header."""
        return self.image_len() + self.text.text_len - self.header_drop

    # --------------------------------------------------------------------------------------------------- images
    def preprocess(self, images) -> np.ndarray:
        """PIL images or uint8 [H, W, 3] arrays → normalized pixels [B, S, S, 3] (channel-last) for the tower."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = self.image_processor(list(images), return_tensors="np")["pixel_values"]
        size = self.llava_config.vision.image_size
        if pixels.shape[2:] != (size, size):
            raise ValueError(f"the image processor makes {pixels.shape[2:]} images, the vision tower takes "
                             f"{size} × {size}")
        return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1), np.float32)

    # ------------------------------------------------------------------------------------------------ tokenization
    def tokenize(self, prompts: Sequence[str], interleave: int | None = None) -> dict[str, np.ndarray]:
        """The merged LLM input and the gather of what is kept (host-side, fixed shapes for one jitted encode)."""
        ids, mask = self.text.tokenize_llm(prompts, "i2v")
        n, crop = self.num_image_tokens, self.text.crop_start["i2v"]
        step = self.image_interleave if interleave is None else self._check_interleave(interleave)
        expected_headers = int(np.sum(ids[0, :crop] == self.end_header_id)) + 1   # + the assistant's
        batch, length = ids.shape
        rows = {k: [] for k in ("input_ids", "attention_mask", "position_ids", "image_mask", "keep", "keep_mask")}
        for i in range(batch):
            where = np.flatnonzero(ids[i] == self.image_token_id)
            if len(where) != 1 or where[0] >= crop:
                raise ValueError(f"prompt {i}: the templated text must hold one {IMAGE_TOKEN!r} token, in the "
                                 f"template (found {len(where)}); a prompt may not contain it")
            p = int(where[0])
            headers = np.flatnonzero(ids[i] == self.end_header_id)
            end = int(headers[-1]) if len(headers) >= expected_headers else length - 1
            text_keep = np.concatenate([np.arange(crop, end + 1 - self.header_drop), np.arange(end + 1, length)])
            exp_ids = np.concatenate([ids[i, :p], np.full(n, self.image_token_id, ids.dtype), ids[i, p + 1:]])
            exp_mask = np.concatenate([mask[i, :p], np.ones(n, mask.dtype), mask[i, p + 1:]])
            positions = np.where(exp_mask > 0, np.cumsum(exp_mask) - 1, 1)
            rows["input_ids"].append(exp_ids)
            rows["attention_mask"].append(exp_mask)
            rows["position_ids"].append(positions)
            rows["image_mask"].append(exp_ids == self.image_token_id)
            rows["keep"].append(np.concatenate([np.arange(p, p + n, step), text_keep + n - 1]))
            rows["keep_mask"].append(np.concatenate([np.ones(len(range(0, n, step)), mask.dtype), mask[i, text_keep]]))
        return {k: np.stack(v).astype(np.int32) for k, v in rows.items()}

    # ----------------------------------------------------------------------------------------------------- encoding
    def encode_prompts(self, prompts: str | Sequence[str], images, *, interleave: int | None = None):
        """(text_states [B, states_len, D_llm], text_mask [B, states_len] int32, pooled [B, D_clip]).

        `images`: one PIL image / uint8 array per prompt (or one for all), in any size: the image processor resizes
        and crops it. `interleave` overrides the kept-image-token step (e.g. 2 for a negative prompt encoded as
        diffusers does under true CFG)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt, got an empty list")
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need one image each (or one for all), got {len(images)} images")
        pixels = self.preprocess(images)
        tokens = self.tokenize(prompts, interleave)
        clip_ids = self.text.tokenize_clip(prompts)
        states, pooled = self._encode(self.text.llm_params, self.text.clip_params, self.vision_params, pixels,
                                      tokens["input_ids"], tokens["attention_mask"], tokens["position_ids"],
                                      tokens["image_mask"], tokens["keep"], clip_ids)
        return states, jnp.asarray(tokens["keep_mask"]), pooled

    def encode_negative(self, prompts: str | Sequence[str], height: int, width: int, *,
                        interleave: int | None = None):
        """The negative prompt(s) with black images of the video's size (true CFG)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.encode_prompts(prompts, black_images(len(prompts), height, width), interleave=interleave)

    # -------------------------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, llava_dir: str, clip_dir: str, *, llava_tokenizer_dir: str | None = None,
                        clip_tokenizer_dir: str | None = None, dtype: str = "bfloat16",
                        param_dtype: str = "bfloat16", hidden_state_skip_layer: int = 2,
                        crop_start: int | None = OFFICIAL_I2V_CROP_START,
                        image_interleave: int = IMAGE_INTERLEAVE["token_replace"], mesh=None,
                        rules=LOGICAL_AXIS_RULES, **kwargs):
        """From a transformers `LlavaForConditionalGeneration` folder (the I2V release's `text_encoder_i2v`, with
        its tokenizer and `preprocessor_config.json`) and a CLIP text folder. `kwargs` go to `TextEncoders`."""
        import json

        from etils import epath
        from transformers import AutoTokenizer

        from hyvideo_jax.convert.text_encoders import load_clip_text, load_llama
        from hyvideo_jax.convert.vision import load_llava_vision
        vision_dtypes = {"dtype": dtype, "param_dtype": param_dtype}
        llava_cfg, vision_params = load_llava_vision(llava_dir, mesh=mesh, rules=rules, vision=vision_dtypes)
        llm_cfg, llm_params = load_llama(llava_dir, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
                                         hidden_state_skip_layer=hidden_state_skip_layer)
        clip_cfg, clip_params = load_clip_text(clip_dir, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype)
        llm_tok = AutoTokenizer.from_pretrained(llava_tokenizer_dir or llava_dir)
        clip_tok = AutoTokenizer.from_pretrained(clip_tokenizer_dir or clip_dir)
        hf = json.loads((epath.Path(llava_dir) / "config.json").read_text())
        processor = clip_image_processor(llava_dir)
        text = TextEncoders(llm_tok, llm_cfg, llm_params, clip_tok, clip_cfg, clip_params, mesh=mesh, **kwargs)
        return cls(text, llava_cfg, vision_params, processor, image_token_id=hf.get("image_token_index"),
                   crop_start=crop_start, image_interleave=image_interleave)

    @classmethod
    def demo(cls, llm_dim: int, clip_dim: int, *, seed: int = 0, text_len: int = 32, clip_len: int = 32,
             llm_layers: int = 4, llm_heads: int = 4, llm_kv_heads: int = 2, clip_layers: int = 2,
             clip_heads: int = 2, words: Sequence[str] = (), image_size: int = 16, patch_size: int = 4,
             vision_dim: int = 32, vision_layers: int = 3, vision_heads: int = 2,
             image_interleave: int = IMAGE_INTERLEAVE["token_replace"], mesh=None, rules=LOGICAL_AXIS_RULES):
        """Small random-weight encoders, deterministic from `seed`: `TextEncoders.demo`'s text side with an `<image>`
        token in the LLM's byte tokenizer, and a CLIP ViT of `image_size` pixels in `patch_size` patches."""
        text = TextEncoders.demo(llm_dim, clip_dim, seed=seed, text_len=text_len, clip_len=clip_len,
                                 llm_layers=llm_layers, llm_heads=llm_heads, llm_kv_heads=llm_kv_heads,
                                 clip_layers=clip_layers, clip_heads=clip_heads, words=words,
                                 llm_extra_special_tokens=(IMAGE_TOKEN,), mesh=mesh, rules=rules)
        vision = CLIPVisionConfig(hidden_size=vision_dim, intermediate_size=2 * vision_dim,
                                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                  image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu")
        llava_cfg = LlavaVisionConfig(vision=vision, text_hidden_size=llm_dim)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 7)
        pixels = jnp.zeros((1, image_size, image_size, 3))
        model = LlavaImageEncoder(llava_cfg)
        params = nn.unbox(model.init(key, pixels))["params"]
        if mesh is not None:
            from hyvideo_jax.convert.vision import vision_sharding_table
            from hyvideo_jax.text import _place
            params = _place(params, vision_sharding_table(model, mesh, rules))
        processor = clip_image_processor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
        return cls(text, llava_cfg, params, processor, image_interleave=image_interleave)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, mesh=None,
                    image_condition_type: str = "token_replace") -> "ImagePromptEncoders":
        """From `config.text` with `llava_path` (the I2V text encoder) instead of `llm_path`, or `demo`; the
        `image_*` / `vision_*` demo fields size the random vision tower. `image_interleave` defaults to the
        transformer's (`IMAGE_INTERLEAVE[image_condition_type]`)."""
        c = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        vision_keys = ("image_size", "patch_size", "vision_dim", "vision_layers", "vision_heads")
        known = TEXT_FIELDS | {"llava_path", "crop_start_i2v", "image_interleave", *vision_keys}
        unknown = sorted(set(c) - known)
        if unknown:
            raise ValueError(f"unknown text config field(s) {unknown} for image-to-video; known fields are "
                             f"{sorted(known)}")
        if image_condition_type not in IMAGE_INTERLEAVE:
            raise ValueError(f"image_condition_type must be one of {sorted(IMAGE_INTERLEAVE)}, "
                             f"got {image_condition_type!r}")
        common = {"image_interleave": c.get("image_interleave") or IMAGE_INTERLEAVE[image_condition_type]}
        if c.get("demo"):
            return cls.demo(c["llm_dim"], c["clip_dim"], mesh=mesh,
                            **{k: c[k] for k in DEMO_FIELDS + vision_keys if k in c}, **common)
        require_paths(c, ("llava_path", "clip_path"))
        return cls.from_pretrained(
            c["llava_path"], c["clip_path"], llava_tokenizer_dir=c.get("llm_tokenizer_path") or None, mesh=mesh,
            crop_start=c.get("crop_start_i2v") or OFFICIAL_I2V_CROP_START, **pretrained_fields(c), **common)


def _encode(llm_config, clip_config, llava_config, llm_params, clip_params, vision_params, pixels, input_ids,
            attention_mask, position_ids, image_mask, keep, clip_ids):
    """Image features merged into the LLM input; its states gathered at `keep`; CLIP's pooled vector."""
    features = LlavaImageEncoder(llava_config).apply({"params": vision_params}, pixels)
    states = LlamaTextModel(llm_config).apply({"params": llm_params}, input_ids, attention_mask,
                                              position_ids=position_ids, image_features=features,
                                              image_mask=image_mask)
    pooled, _ = CLIPTextEncoder(clip_config).apply({"params": clip_params}, clip_ids)
    return jnp.take_along_axis(states, keep[..., None], axis=1), pooled

