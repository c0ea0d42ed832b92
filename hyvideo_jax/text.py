"""Prompts → the text conditioning of the DiT (reference §3): MLLM states, their mask, and the CLIP pooled vector.

    encoders = TextEncoders.from_pretrained("llava-llama-3-8b-text-encoder", "clip-vit-large-patch14", mesh=mesh)
    text_states, text_mask, pooled = encoders.encode_prompts(["a cat walks on the grass"], mode="video")
    # text_states [B, text_len, D_llm], text_mask [B, text_len] int32 (1 = token), pooled [B, D_clip]

The LLM reads the prompt inside a system/user template (`PROMPT_TEMPLATES`), tokenized with BOS, right-padded to
`crop_start + text_len` and truncated there; the first `crop_start` positions (BOS + the template up to the prompt)
are cropped from states and mask, so the kept tokens are the prompt, its closing `<|eot_id|>`, then padding.
Like the official code, a prompt too long for `text_len` loses its end (and its `<|eot_id|>`); here with a warning.
CLIP reads the raw prompt padded / truncated to `clip_len` (77) tokens.

Both modes keep `text_len` tokens. (The official code sizes the image-mode input with the video crop_start, which
keeps 351 - 36 = 315 tokens; diffusers and this module keep 256 in both modes, so every record has one shape.)

`TextEncoders.demo(...)` builds small random-weight encoders with byte-level tokenizers made in code (no downloaded
files), deterministic from a seed, for the offline demo and tests.
"""

import functools
import warnings
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyvideo_jax.models.text_encoders import CLIPTextConfig, CLIPTextEncoder, LlamaTextConfig, LlamaTextModel
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES

# Reference §3.1: `PROMPT_TEMPLATE["dit-llm-encode-video"]` and `["dit-llm-encode"]` (crop_start 95 and 36).
PROMPT_TEMPLATES = {
    "video": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "image": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, "
        "texture, quantity, text, spatial relationships of the objects and background:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
}
OFFICIAL_CROP_START = {"video": 95, "image": 36}

LLM_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>")
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# The fields of a `config.text` section (`TextEncoders.from_config`).
TEXT_FIELDS = frozenset({
    "demo", "seed", "llm_path", "clip_path", "llm_tokenizer_path", "clip_tokenizer_path", "text_len", "clip_len",
    "crop_start_video", "crop_start_image", "hidden_state_skip_layer", "dtype", "param_dtype", "llm_dim", "clip_dim",
    "llm_layers", "llm_heads", "llm_kv_heads", "clip_layers", "clip_heads", "words"})


def byte_tokenizer(special_tokens: Sequence[str], bos: str, eos: str, *, append_eos: bool, model_max_length: int,
                   words: Sequence[str] = ()):
    """A byte-level `PreTrainedTokenizerFast` built in code: ids 0..S-1 are `special_tokens`, then one id per byte.

    Every string maps to its UTF-8 bytes, preceded by `bos` (and followed by `eos` if `append_eos`); `eos` doubles
    as the padding token, as in CLIP's tokenizer. `words` get BPE merges that make each of them, with the space in
    front of it, one token (as a trained BPE vocabulary has whole tokens for its frequent words, e.g. " red"): the
    merges build " r", " re", " red" from the bytes, so any other text still tokenizes, byte by byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    merges = []
    for word in words:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"tokenizer words must be non-empty and without spaces, got {word!r}")
        chars = byte_level.pre_tokenize_str(" " + word)[0][0]   # " red" as byte-level characters: "Ġred"
        token = chars[0]
        for ch in chars[1:]:
            if token + ch not in vocab:
                merges.append((token, ch))
                vocab[token + ch] = len(vocab)
            token += ch
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    single = f"{bos} $A {eos}" if append_eos else f"{bos} $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(bos, vocab[bos]),
                                                                                      (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   model_max_length=model_max_length, padding_side="right",
                                   truncation_side="right")


def _prefix_length(tokenizer, template: str) -> int:
    """Tokens before the prompt in `template` (BOS included): the crop that leaves the prompt first."""
    return len(tokenizer(template.split("{}")[0], add_special_tokens=True)["input_ids"])


def _abridged(text: str, limit: int = 120) -> str:
    """The start and end of a long text, for warnings."""
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


class TextEncoders:
    """Both tokenizers, both encoders (configs + params), and a jitted `encode_prompts`."""

    def __init__(self, llm_tokenizer, llm_config: LlamaTextConfig, llm_params, clip_tokenizer,
                 clip_config: CLIPTextConfig, clip_params, *, text_len: int = 256, clip_len: int = 77,
                 crop_start: Mapping[str, int | None] | None = None, templates: Mapping[str, str] = PROMPT_TEMPLATES,
                 mesh=None):
        """`crop_start[mode]` None (or a mode left out) means: measured from `llm_tokenizer` on the template."""
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        if not 0 < clip_len <= clip_config.max_position_embeddings:
            raise ValueError(f"clip_len must be in [1, {clip_config.max_position_embeddings}] (the CLIP model's "
                             f"max_position_embeddings), got {clip_len}")
        for mode, template in templates.items():
            if template.count("{}") != 1:
                raise ValueError(f"prompt template {mode!r} must contain exactly one '{{}}' for the prompt")
        if llm_tokenizer.pad_token is None:
            # Llama-3 tokenizers may have no pad token; padded positions are masked, so any id serves.
            llm_tokenizer.pad_token = llm_tokenizer.eos_token
        for tok in (llm_tokenizer, clip_tokenizer):
            tok.padding_side = "right"
            tok.truncation_side = "right"
        self.llm_tokenizer, self.clip_tokenizer = llm_tokenizer, clip_tokenizer
        self.llm_config, self.clip_config = llm_config, clip_config
        self.llm_params, self.clip_params = llm_params, clip_params
        self.text_len, self.clip_len = text_len, clip_len
        self.templates = dict(templates)
        self.mesh = mesh  # where the params were placed (by the loader or `demo`), or None
        self.crop_start = {}
        for mode, template in self.templates.items():
            measured = _prefix_length(llm_tokenizer, template)
            given = (crop_start or {}).get(mode)
            if given is not None and given != measured:
                warnings.warn(f"crop_start for {mode!r} is {given}, but this tokenizer puts {measured} tokens "
                              f"before the prompt; using {given} as configured")
            self.crop_start[mode] = measured if given is None else int(given)
        self._encode = jax.jit(functools.partial(_encode, llm_config, clip_config), static_argnames=("crop",))

    # ------------------------------------------------------------------------------------------------ tokenization
    def tokenize_llm(self, prompts: Sequence[str], mode: str = "video") -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask [B, crop_start + text_len] of the templated prompts (warns on truncation)."""
        if mode not in self.templates:
            raise ValueError(f"mode must be one of {sorted(self.templates)}, got {mode!r}")
        texts = [self.templates[mode].format(p) for p in prompts]
        max_length = self.crop_start[mode] + self.text_len
        full = self.llm_tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > max_length:
                dropped = _abridged(self.llm_tokenizer.decode(ids[max_length:]))
                warnings.warn(f"prompt {i} has {len(ids) - self.crop_start[mode]} tokens with its template end; the "
                              f"text encoder keeps {self.text_len}, so this end was cut: {dropped!r}")
        enc = self.llm_tokenizer(texts, add_special_tokens=True, max_length=max_length, padding="max_length",
                                 truncation=True, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def tokenize_clip(self, prompts: Sequence[str]) -> np.ndarray:
        """input_ids [B, clip_len] of the raw prompts (warns on truncation)."""
        full = self.clip_tokenizer(list(prompts), verbose=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > self.clip_len:
                dropped = _abridged(self.clip_tokenizer.decode(ids[self.clip_len - 1:-1]))
                warnings.warn(f"prompt {i} has {len(ids)} CLIP tokens, CLIP keeps {self.clip_len}; cut: {dropped!r}")
        enc = self.clip_tokenizer(list(prompts), max_length=self.clip_len, padding="max_length", truncation=True,
                                  return_tensors="np")
        return enc["input_ids"].astype(np.int32)

    # ----------------------------------------------------------------------------------------------------- encoding
    def encode_prompts(self, prompts: str | Sequence[str], mode: str = "video"):
        """(text_states [B, text_len, D_llm], text_mask [B, text_len] int32, pooled [B, D_clip]) as jax arrays.

        `mode` is "video" or "image" (the template). Empty prompts are valid: their mask keeps the `<|eot_id|>`.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt, got an empty list")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {bad}")
        llm_ids, llm_mask = self.tokenize_llm(prompts, mode)
        clip_ids = self.tokenize_clip(prompts)
        # With params placed on a mesh, jit partitions the computation from their shardings (GSPMD); the activations
        # carry no constraints of their own here.
        return self._encode(self.llm_params, self.clip_params, llm_ids, llm_mask, clip_ids,
                            crop=self.crop_start[mode])

    # -------------------------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, llm_dir: str, clip_dir: str, *, llm_tokenizer_dir: str | None = None,
                        clip_tokenizer_dir: str | None = None, dtype: str = "bfloat16", param_dtype: str = "bfloat16",
                        hidden_state_skip_layer: int = 2, mesh=None, rules=LOGICAL_AXIS_RULES, **kwargs):
        """Weights from transformers folders (streamed, placed on `mesh` if given); tokenizers by AutoTokenizer.

        Tokenizers are read from the model folders unless `*_tokenizer_dir` is given. `kwargs` go to `__init__`
        (text_len, clip_len, crop_start; crop_start defaults to the official 95 / 36).
        """
        from transformers import AutoTokenizer

        from hyvideo_jax.convert.text_encoders import load_clip_text, load_llama
        llm_cfg, llm_params = load_llama(llm_dir, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
                                         hidden_state_skip_layer=hidden_state_skip_layer)
        clip_cfg, clip_params = load_clip_text(clip_dir, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype)
        llm_tok = AutoTokenizer.from_pretrained(llm_tokenizer_dir or llm_dir)
        clip_tok = AutoTokenizer.from_pretrained(clip_tokenizer_dir or clip_dir)
        kwargs.setdefault("crop_start", OFFICIAL_CROP_START)
        return cls(llm_tok, llm_cfg, llm_params, clip_tok, clip_cfg, clip_params, mesh=mesh, **kwargs)

    @classmethod
    def demo(cls, llm_dim: int, clip_dim: int, *, seed: int = 0, text_len: int = 32, clip_len: int = 32,
             llm_layers: int = 4, llm_heads: int = 4, llm_kv_heads: int = 2, clip_layers: int = 2,
             clip_heads: int = 2, words: Sequence[str] = (), llm_extra_special_tokens: Sequence[str] = (), mesh=None,
             rules=LOGICAL_AXIS_RULES):
        """Small random-weight encoders with byte-level tokenizers: no files needed, same seed → same embeddings.
        `words` are single tokens of both tokenizers (`byte_tokenizer`), e.g. the demo captions' vocabulary;
        `llm_extra_special_tokens` are added to the LLM's special tokens (e.g. LLaVA's `<image>`).

        The LLM runs the real templates (crop measured from its tokenizer) and returns its layer-(n-2) state.
        """
        llm_tok = byte_tokenizer(LLM_SPECIAL_TOKENS + tuple(llm_extra_special_tokens), "<|begin_of_text|>",
                                 "<|end_of_text|>", append_eos=False, model_max_length=1 << 20, words=words)
        clip_tok = byte_tokenizer(CLIP_SPECIAL_TOKENS, "<|startoftext|>", "<|endoftext|>", append_eos=True,
                                  model_max_length=clip_len, words=words)
        if llm_dim % llm_heads or (llm_dim // llm_heads) % 2:
            raise ValueError(f"demo llm_dim {llm_dim} must split into llm_heads={llm_heads} heads of even size")
        llm_cfg = LlamaTextConfig(
            vocab_size=len(llm_tok), hidden_size=llm_dim, intermediate_size=2 * llm_dim, num_hidden_layers=llm_layers,
            num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads, head_dim=llm_dim // llm_heads,
            rope_theta=500000.0, rms_norm_eps=1e-5)
        clip_cfg = CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=clip_dim, intermediate_size=4 * clip_dim,
            num_hidden_layers=clip_layers, num_attention_heads=clip_heads, max_position_embeddings=clip_len,
            eos_token_id=clip_tok.eos_token_id)
        llm_key, clip_key = jax.random.split(jax.random.PRNGKey(seed))
        ids = jnp.zeros((1, 8), jnp.int32)
        llm_params = nn.unbox(LlamaTextModel(llm_cfg).init(llm_key, ids))["params"]
        clip_params = nn.unbox(CLIPTextEncoder(clip_cfg).init(clip_key, ids))["params"]
        if mesh is not None:
            from hyvideo_jax.convert.text_encoders import sharding_table
            llm_params, clip_params = (
                _place(p, sharding_table(m, mesh, rules))
                for p, m in ((llm_params, LlamaTextModel(llm_cfg)), (clip_params, CLIPTextEncoder(clip_cfg))))
        return cls(llm_tok, llm_cfg, llm_params, clip_tok, clip_cfg, clip_params, text_len=text_len,
                   clip_len=clip_len, mesh=mesh)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, mesh=None) -> "TextEncoders":
        """From `config.text` (see configs/*.py): demo encoders if `demo`, else folders `llm_path` / `clip_path`."""
        c = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        unknown = sorted(set(c) - TEXT_FIELDS)
        if unknown:
            raise ValueError(f"unknown text config field(s) {unknown}; known fields are {sorted(TEXT_FIELDS)}")
        if c.get("demo"):
            return cls.demo(c["llm_dim"], c["clip_dim"], mesh=mesh, **{k: c[k] for k in DEMO_FIELDS if k in c})
        require_paths(c, ("llm_path", "clip_path"))
        return cls.from_pretrained(
            c["llm_path"], c["clip_path"], llm_tokenizer_dir=c.get("llm_tokenizer_path") or None, mesh=mesh,
            crop_start={"video": c.get("crop_start_video"), "image": c.get("crop_start_image")},
            **pretrained_fields(c))


# The `demo` arguments a `config.text` section may set, and the fields both encoders' `from_pretrained` read.
DEMO_FIELDS = ("seed", "text_len", "clip_len", "llm_layers", "llm_heads", "llm_kv_heads", "clip_layers", "clip_heads",
               "words")


def pretrained_fields(c: Mapping[str, Any]) -> dict[str, Any]:
    """dtypes, skipped layers, lengths and the CLIP tokenizer folder of a `config.text` dict, with their defaults."""
    return dict(clip_tokenizer_dir=c.get("clip_tokenizer_path") or None, dtype=c.get("dtype", "bfloat16"),
                param_dtype=c.get("param_dtype", "bfloat16"),
                hidden_state_skip_layer=c.get("hidden_state_skip_layer", 2), text_len=c.get("text_len", 256),
                clip_len=c.get("clip_len", 77))


def require_paths(c: Mapping[str, Any], fields: Sequence[str]) -> None:
    for field in fields:
        if not c.get(field):
            raise ValueError(f"text.{field} is empty: give the folder of the downloaded model, or set "
                             f"text.demo=True for the small random encoders")


def _place(params, shardings):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    placed = {}
    for path, value in flat:
        keys = tuple(k.key for k in path)
        node = placed
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = jax.device_put(value, shardings[keys])
    return placed


def _encode(llm_config, clip_config, llm_params, clip_params, llm_ids, llm_mask, clip_ids, *, crop: int):
    """Both encoders on one batch; the LLM states and mask cropped after the template prefix."""
    states = LlamaTextModel(llm_config).apply({"params": llm_params}, llm_ids, llm_mask)
    pooled, _ = CLIPTextEncoder(clip_config).apply({"params": clip_params}, clip_ids)
    return states[:, crop:], llm_mask[:, crop:], pooled
