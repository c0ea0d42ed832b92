"""The HunyuanVideo diffusion transformer (reference §1): embedders, token refiner, 3D RoPE, double-stream and
single-stream blocks (each stack an `nn.scan` over stacked parameters, optionally rematerialized), final layer.

    model = HunyuanVideoDiT(DiTConfig.from_config(config.model))
    velocity = model.apply({"params": params}, latents, timesteps, text_states, text_mask, pooled_text, guidance)

Latents are channel-last [B, T, H, W, C]; the prediction has the same layout (out_channels). Timesteps are
1000·σ as floats [B]; `guidance` is the embedded guidance scale × 1000 [B] (the released pipelines round that
product to bf16, e.g. 6.0 → 6016.0; callers do that, the model takes the value as given).

Image-to-video (HunyuanVideo-I2V, `DiTConfig.image_condition_type`; the inputs are assembled by
`hyvideo_jax.models.image_condition`):
- "token_replace" ("HYVideo-T/2-I2V-16ch"): latents with frame 0 = the image latent. A second conditioning vector
  time_in(0) + vector_in(pooled) (no guidance term) modulates the first latent frame's (H/p)·(W/p) image tokens in
  every double block (image stream) and single block; text tokens and the final layer use the usual one. Same
  parameters as the text-to-video model (diffusers' `HunyuanVideoTokenReplace*` blocks, the official
  `i2v_condition_type="token_replace"`).
- "latent_concat" ("HYVideo-T/2-I2V-33ch"): in_channels = 2·out_channels + 1 (noisy latents | image latent on
  frame 0, zeros after | mask); the model is the text-to-video one with a wider patch embedding.
"""

import dataclasses
from typing import Any, Mapping, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hyvideo_jax.config_fields import from_fields, to_plain_dict
from hyvideo_jax.models.attention import BACKENDS, attention
from hyvideo_jax.models.layers import (MLP, QKV_RESIDUALS, REMAT_POLICIES, LayerNorm, Modulation, RMSNorm,
                                       VectorEmbedder, dense, dtypes as _dtypes, modulate, scan_blocks)
from hyvideo_jax.models.rope import apply_rope, rope_tables
from hyvideo_jax.models.splash_attention import SplashBlocks
from hyvideo_jax.parallel.sequence import METHODS as SEQUENCE_PARALLEL_METHODS, joint_attention_split

PADDING_SEGMENT = 2  # segment id of padded text tokens; image and valid text tokens are segment 1
IMAGE_CONDITION_TYPES = (None, "token_replace", "latent_concat")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the transformer. Defaults are the released 13B model ("HYVideo-T/2-cfgdistill")."""
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth_double: int = 20
    depth_single: int = 40
    depth_refiner: int = 2
    refiner_mlp_ratio: float = 4.0  # the token refiner's own MLP ratio (4 in both references, whatever mlp_ratio is)
    patch_size: int = 2
    patch_size_t: int = 1
    text_states_dim: int = 4096
    pooled_text_dim: int = 768
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 256.0
    qkv_bias: bool = True
    guidance_embed: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Keep the weight matmuls' outputs and the attention residuals, recompute the elementwise work (layers.
    # REMAT_POLICIES): on CPU the DiT's forward+backward is ~10 % faster than with "none" (which also keeps every
    # elementwise intermediate) and holds less; training presets choose theirs from the AOT table.
    remat_policy: str = "attention_dots"
    attention_backend: str = "xla"
    sequence_parallel: str = "auto"  # over the mesh axis 'sequence': ulysses | ring | auto (ulysses if heads allow)
    # The splash kernels' block sizes (attention_backend "splash"), in tokens, and its fused backward (SplashBlocks):
    # one kernel for dq, dk, dv, which keeps a partial dq per key block ([L / kv block, heads, L, head dim] per
    # device, quadratic in tokens: 10-40 GB at 720p), so off by default; the separate dq kernel needs none.
    splash_block_q: int = 512
    splash_block_kv: int = 512
    splash_block_kv_compute: int = 512
    splash_fused_backward: bool = False
    # Image-to-video variant (module docstring): None (text-to-video), "token_replace" or "latent_concat".
    image_condition_type: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        self.validate()

    @property
    def splash_blocks(self) -> SplashBlocks:
        return SplashBlocks(self.splash_block_q, self.splash_block_kv, self.splash_block_kv_compute,
                            self.splash_fused_backward)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_volume(self) -> int:
        return self.patch_size_t * self.patch_size * self.patch_size

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        def fail(field, msg):
            raise ValueError(f"model.{field}: {msg}")
        try:
            self.splash_blocks
        except ValueError as e:
            fail("splash_block_*", str(e))
        for f in ("in_channels", "out_channels", "hidden_size", "num_heads", "patch_size", "patch_size_t",
                  "text_states_dim", "pooled_text_dim"):
            if int(getattr(self, f)) <= 0:
                fail(f, f"must be positive, got {getattr(self, f)}")
        for f in ("depth_double", "depth_single", "depth_refiner"):
            if int(getattr(self, f)) < 0:
                fail(f, f"must be >= 0, got {getattr(self, f)}")
        if self.hidden_size % self.num_heads:
            fail("num_heads", f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.head_dim:
            fail("rope_axes_dim", f"needs three even entries (t, h, w) summing to the head dim {self.head_dim}, "
                 f"got {self.rope_axes_dim}")
        for f in ("param_dtype", "dtype"):
            if getattr(self, f) not in ("float32", "bfloat16", "float16"):
                fail(f, f"must be float32, bfloat16 or float16, got {getattr(self, f)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if self.sequence_parallel not in SEQUENCE_PARALLEL_METHODS:
            fail("sequence_parallel", f"must be one of {SEQUENCE_PARALLEL_METHODS}, got {self.sequence_parallel!r}")
        if self.attention_backend not in BACKENDS:
            fail("attention_backend", f"must be one of {sorted(BACKENDS)}, got {self.attention_backend!r}")
        if self.image_condition_type not in IMAGE_CONDITION_TYPES:
            fail("image_condition_type", f"must be one of {IMAGE_CONDITION_TYPES} (None: text-to-video), "
                 f"got {self.image_condition_type!r}")
        if self.image_condition_type == "latent_concat" and self.in_channels != 2 * self.out_channels + 1:
            fail("in_channels", f"image_condition_type 'latent_concat' reads noisy latents, the image latent and a "
                 f"mask: in_channels must be 2·out_channels + 1 = {2 * self.out_channels + 1}, got {self.in_channels}")

    @classmethod
    def from_config(cls, config: "DiTConfig | Mapping[str, Any]") -> "DiTConfig":
        """From a `DiTConfig`, a dict or an ml_collections ConfigDict (e.g. `config.model`); unknown keys are errors."""
        return from_fields(cls, config, "model")

    def to_dict(self) -> dict[str, Any]:
        return to_plain_dict(self)


def forward_flops(cfg: DiTConfig, image_tokens: int, text_tokens: int, batch: int = 1) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one DiT forward, counted from the config (2 FLOPs per multiply-add).

    Attention is 4·N²·D per layer (QKᵀ and PV over the joint sequence); the Pallas kernels that compute it are
    invisible to XLA's cost analysis, and XLA counts a scanned block once, not once per layer, so the model's
    FLOPs come from here. For the 13B model at 720×1280×129 (118,800 + 256 tokens) this gives ≈1.62 PF of
    matmuls and ≈10.45 PF of attention per forward (reference §6).
    """
    d, m = cfg.hidden_size, cfg.mlp_dim
    n = image_tokens + text_tokens
    double = 4 * d * d + 2 * d * m            # per token and stream: qkv, out-proj, MLP
    single = (3 * d + m) * d + (d + m) * d    # linear1, linear2
    refiner = 4 * d * d + 2 * d * int(d * cfg.refiner_mlp_ratio)
    per_sample = (n * cfg.depth_double * double + n * cfg.depth_single * single
                  + text_tokens * (cfg.depth_refiner * refiner + cfg.text_states_dim * d)
                  + image_tokens * (cfg.patch_volume * (cfg.in_channels + cfg.out_channels) * d))
    matmul = 2.0 * per_sample * batch
    attention = 4.0 * n * n * d * (cfg.depth_double + cfg.depth_single) * batch
    return matmul, attention


def example_inputs(cfg: DiTConfig, batch: int = 1, text_len: int = 1, image_tokens: int = 1) -> tuple:
    """Zero inputs of the smallest valid shapes (`image_tokens` patches along the width), for `init` / `eval_shape`."""
    p = cfg.patch_size
    return (jnp.zeros((batch, cfg.patch_size_t, p, p * image_tokens, cfg.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, text_len, cfg.text_states_dim)), jnp.ones((batch, text_len), jnp.int32),
            jnp.zeros((batch, cfg.pooled_text_dim)), jnp.zeros((batch,)) if cfg.guidance_embed else None)


class TokenReplaceVec(NamedTuple):
    """The blocks' conditioning in a "token_replace" model (in place of the vector [B, D] of the other variants)."""
    vec: jax.Array               # [B, D] time + pooled text (+ guidance): text tokens and the other image tokens
    first_frame_vec: jax.Array   # [B, D] time_in(0) + pooled text: the first latent frame's image tokens
    first_frame: jax.Array       # [N] bool over the image tokens: True for the first latent frame's


def _split_vec(vec):
    """(vec [B, D], first-frame vec [B, D] or None, first-frame mask [N] or None) of the blocks' `vec` argument."""
    if isinstance(vec, TokenReplaceVec):
        return vec.vec, vec.first_frame_vec, vec.first_frame
    return vec, None, None


def _per_token(values, first_frame_values, first_frame):
    """Modulation values [B, D] as per-token values of the image tokens: [B, 1, D] (all tokens alike), or [B, N, D]
    with the first frame's tokens taking `first_frame_values`. A per-token select rather than a slice and concat:
    XLA fuses it into its consumers and the image tokens stay one array that sequence parallelism splits."""
    if first_frame_values is None:
        return [v[:, None] for v in values]
    mask = first_frame[None, :, None]
    return [jnp.where(mask, f[:, None], v[:, None]) for v, f in zip(values, first_frame_values)]


def _qkv_layer(cfg: DiTConfig, name: str):
    """Fused q|k|v projection (kernel [D, 3, H, Dh]); apply it with `_split_qkv`."""
    return dense((3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "kv"), name=name, use_bias=cfg.qkv_bias,
                 **_dtypes(cfg))


def _split_qkv(layer, x, seq: str = "seq"):
    """[B, L, D] through a `_qkv_layer` → three [B, L, H, Dh]."""
    qkv = nn.with_logical_constraint(layer(x), ("batch", seq, None, "act_heads", "act_kv"))
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _qkv(x, cfg: DiTConfig, name: str, seq: str = "seq"):
    """Fused q|k|v projection [B, L, D] → three [B, L, H, Dh]."""
    return _split_qkv(_qkv_layer(cfg, name), x, seq)


def _out_proj(cfg: DiTConfig, name: str):
    """Attention output projection [B, L, H, Dh] → [B, L, D] (kernel [H, Dh, D])."""
    return dense(cfg.hidden_size, ("heads", "kv", "embed"), name=name, axis=(-2, -1), **_dtypes(cfg))


def _tag_qkv(*arrays):
    """Tag the attention inputs (after norms and RoPE) for the remat policies that save them (`QKV_RESIDUALS`)."""
    return tuple(checkpoint_name(x, QKV_RESIDUALS) for x in arrays)


def _residual(x, seq: str = "seq"):
    """The residual stream [B, L, D]; image (and joint) tokens use 'seq', text tokens 'text_seq' (replicated)."""
    return nn.with_logical_constraint(x, ("batch", seq, "act_embed"))


class TokenRefinerBlock(nn.Module):
    """Self-attention + SiLU MLP over the text tokens with gate-only adaLN (reference §1.4)."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, c, segment_ids):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        gate_msa, gate_mlp = Modulation(2, name="adaLN_modulation", **dt)(c)
        h = LayerNorm(affine=True, name="norm1", param_dtype=dt["param_dtype"])(x)
        q, k, v = _qkv(h, cfg, "self_attn_qkv", seq="text_seq")
        a = attention(q, k, v, segment_ids, segment_ids, backend=cfg.attention_backend, splash=cfg.splash_blocks)
        x = x + gate_msa[:, None] * _out_proj(cfg, "self_attn_proj")(a)
        h = LayerNorm(affine=True, name="norm2", param_dtype=dt["param_dtype"])(x)
        mlp_dim = int(cfg.hidden_size * cfg.refiner_mlp_ratio)
        x = x + gate_mlp[:, None] * MLP(mlp_dim, activation=nn.silu, seq="text_seq", name="mlp", **dt)(h)
        return _residual(x, "text_seq"), None


class TokenRefiner(nn.Module):
    """`txt_in`: projects LLM states to the hidden size and refines them, conditioned on t and the masked mean."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, text_states, timesteps, text_mask):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        mask = text_mask.astype(jnp.float32)[..., None]
        # Masked mean of the raw LLM states (fp32). A sample with no valid token pools to zeros instead of 0/0.
        pooled = (text_states.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        c = (VectorEmbedder(cfg.hidden_size, sinusoidal=True, name="t_embedder", **dt)(timesteps)
             + VectorEmbedder(cfg.hidden_size, name="c_embedder", **dt)(pooled.astype(text_states.dtype)))
        x = dense(cfg.hidden_size, ("text_embed", "embed"), name="input_embedder", **dt)(text_states)
        segment_ids = jnp.where(text_mask.astype(bool), 1, PADDING_SEGMENT).astype(jnp.int32)
        blocks = scan_blocks(TokenRefinerBlock, cfg, cfg.depth_refiner, "blocks", n_broadcast=2,
                             remat_policy=cfg.remat_policy)
        x, _ = blocks(_residual(x, "text_seq"), c, segment_ids)
        return x


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text streams, joint attention over [image, text] (reference §1.7)."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, carry, vec, cos, sin, text_segment_ids):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        img, txt = carry
        vec, first_frame_vec, first_frame = _split_vec(vec)
        img_modulation = Modulation(6, name="img_mod", **dt)
        img_mod = _per_token(img_modulation(vec),
                             None if first_frame_vec is None else img_modulation(first_frame_vec), first_frame)
        txt_mod = _per_token(Modulation(6, name="txt_mod", **dt)(vec), None, None)

        def stream_qkv(x, mod, prefix, seq):
            q, k, v = _qkv(modulate(LayerNorm()(x), mod[0], mod[1]), cfg, f"{prefix}_attn_qkv", seq)
            q = RMSNorm(name=f"{prefix}_attn_q_norm", param_dtype=dt["param_dtype"], axis_name="kv")(q)
            k = RMSNorm(name=f"{prefix}_attn_k_norm", param_dtype=dt["param_dtype"], axis_name="kv")(k)
            return q, k, v

        img_q, img_k, img_v = stream_qkv(img, img_mod, "img", "seq")
        img_q, img_k = apply_rope(img_q, cos, sin), apply_rope(img_k, cos, sin)
        txt_q, txt_k, txt_v = stream_qkv(txt, txt_mod, "txt", "text_seq")
        img_q, txt_q, img_k, txt_k, img_v, txt_v = _tag_qkv(img_q, txt_q, img_k, txt_k, img_v, txt_v)
        img_a, txt_a = joint_attention_split(img_q, txt_q, img_k, txt_k, img_v, txt_v, text_segment_ids,
                                             backend=cfg.attention_backend, method=cfg.sequence_parallel,
                                             splash=cfg.splash_blocks)

        def stream_out(x, a, mod, prefix, seq):
            x = x + mod[2] * _out_proj(cfg, f"{prefix}_attn_proj")(a)
            h = modulate(LayerNorm()(x), mod[3], mod[4])
            x = x + mod[5] * MLP(cfg.mlp_dim, seq=seq, name=f"{prefix}_mlp", **dt)(h)
            return _residual(x, seq)

        img = stream_out(img, img_a, img_mod, "img", "seq")
        txt = stream_out(txt, txt_a, txt_mod, "txt", "text_seq")
        return (img, txt), None


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint [image, text] sequence (reference §1.8).

    Image and text tokens stay two arrays (the carry), as in the double blocks: the weights are shared and every
    op but attention is per token, so this is the joint sequence of the references without concatenating it, and
    under sequence parallelism the image tokens stay split over 'seq' and the text replicated, with no reshard.
    The original fused `linear1` (q|k|v|mlp-in) and `linear2` ([attn, mlp] → D) are kept as separate kernels
    (`linear1_qkv`, `linear1_mlp`, `linear2_attn` with the bias, `linear2_mlp`) so heads and MLP width shard
    independently; the conversion code splits and joins them.
    """
    cfg: DiTConfig

    @nn.compact
    def __call__(self, carry, vec, cos, sin, text_segment_ids):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        vec, first_frame_vec, first_frame = _split_vec(vec)
        modulation = Modulation(3, name="modulation", **dt)
        mod = modulation(vec)
        img_shift, img_scale, img_gate = _per_token(
            mod, None if first_frame_vec is None else modulation(first_frame_vec), first_frame)
        txt_shift, txt_scale, txt_gate = _per_token(mod, None, None)
        qkv_in = _qkv_layer(cfg, "linear1_qkv")
        mlp_in = dense(cfg.mlp_dim, ("embed", "mlp"), name="linear1_mlp", **dt)
        q_norm = RMSNorm(name="q_norm", param_dtype=dt["param_dtype"], axis_name="kv")
        k_norm = RMSNorm(name="k_norm", param_dtype=dt["param_dtype"], axis_name="kv")
        attn_out = _out_proj(cfg, "linear2_attn")
        mlp_out = dense(cfg.hidden_size, ("mlp", "embed"), name="linear2_mlp", use_bias=False, **dt)

        def project(x, seq, shift, scale):
            h = modulate(LayerNorm()(x), shift, scale)
            q, k, v = _split_qkv(qkv_in, h, seq)
            mlp = nn.with_logical_constraint(nn.gelu(mlp_in(h)), ("batch", seq, "act_mlp"))
            return q_norm(q), k_norm(k), v, mlp

        img_q, img_k, img_v, img_mlp = project(carry[0], "seq", img_shift, img_scale)
        txt_q, txt_k, txt_v, txt_mlp = project(carry[1], "text_seq", txt_shift, txt_scale)
        img_q, img_k = apply_rope(img_q, cos, sin), apply_rope(img_k, cos, sin)
        img_q, txt_q, img_k, txt_k, img_v, txt_v = _tag_qkv(img_q, txt_q, img_k, txt_k, img_v, txt_v)
        img_a, txt_a = joint_attention_split(img_q, txt_q, img_k, txt_k, img_v, txt_v, text_segment_ids,
                                             backend=cfg.attention_backend, method=cfg.sequence_parallel,
                                             splash=cfg.splash_blocks)
        img = carry[0] + img_gate * (attn_out(img_a) + mlp_out(img_mlp))
        txt = carry[1] + txt_gate * (attn_out(txt_a) + mlp_out(txt_mlp))
        return (_residual(img), _residual(txt, "text_seq")), None


class FinalLayer(nn.Module):
    """adaLN (shift, scale) → Linear to one patch of output channels, ordered (pt, ph, pw, c)."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, vec):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        shift, scale = Modulation(2, name="adaLN_modulation", **dt)(vec)
        x = modulate(LayerNorm()(x), shift, scale)
        features = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size, cfg.out_channels)
        return dense(features, ("embed", None, None, None, None), name="linear", zero_init=True, **dt)(x)


class HunyuanVideoDiT(nn.Module):
    """The full transformer; see the module docstring for the call convention."""
    config: DiTConfig

    def _check_inputs(self, latents, timesteps, text_states, text_mask, pooled_text, guidance):
        cfg = self.config

        def fail(msg):
            raise ValueError(msg)
        if latents.ndim != 5:
            fail(f"latents must be [B, T, H, W, C] (channel-last), got shape {latents.shape}")
        b, t, h, w, c = latents.shape
        if c != cfg.in_channels:
            fail(f"latents have {c} channels, the model expects in_channels={cfg.in_channels} "
                 f"(latents must be channel-last [B, T, H, W, C]; got shape {latents.shape})")
        for size, p, axis in ((t, cfg.patch_size_t, "T"), (h, cfg.patch_size, "H"), (w, cfg.patch_size, "W")):
            if size % p:
                fail(f"latent {axis}={size} is not divisible by the patch size {p} (latents shape {latents.shape})")
        if timesteps.shape != (b,):
            fail(f"timesteps must have shape [B]=({b},), got {timesteps.shape}")
        if text_states.ndim != 3 or text_states.shape[0] != b or text_states.shape[2] != cfg.text_states_dim:
            fail(f"text_states must be [B={b}, L, {cfg.text_states_dim}], got {text_states.shape}")
        if text_mask.shape != text_states.shape[:2]:
            fail(f"text_mask must be [B, L]={text_states.shape[:2]} like text_states, got {text_mask.shape}")
        if pooled_text.shape != (b, cfg.pooled_text_dim):
            fail(f"pooled_text must be [B, {cfg.pooled_text_dim}]=({b}, {cfg.pooled_text_dim}), "
                 f"got {pooled_text.shape}")
        if cfg.guidance_embed and guidance is None:
            fail("this model embeds a guidance value (guidance_embed=True): pass guidance [B] "
                 "(embedded scale × 1000, e.g. 6016.0 for 6.0)")
        if not cfg.guidance_embed and guidance is not None:
            fail("this model has no guidance embedding (guidance_embed=False): pass guidance=None")
        if guidance is not None and guidance.shape != (b,):
            fail(f"guidance must have shape [B]=({b},), got {guidance.shape}")

    @nn.compact
    def __call__(self, latents, timesteps, text_states, text_mask, pooled_text, guidance=None, *, blocks=None):
        """The prediction [B, T, H, W, C_out]. `blocks`, if given, replaces the two block stacks (for cached
        sampling): `blocks(img, txt, vec, cos, sin, text_segments) -> (img, aux)` maps the embedded streams to the
        image tokens the final layer reads (use `run_layers` on this model's stacked parameters for any range of
        blocks, passing `vec` on as it comes: a [B, D] array, or a `TokenReplaceVec` for "token_replace" models);
        the call then returns (prediction, aux)."""
        cfg, dt = self.config, _dtypes(self.config)
        timesteps = jnp.asarray(timesteps)
        guidance = None if guidance is None else jnp.asarray(guidance)
        self._check_inputs(latents, timesteps, text_states, text_mask, pooled_text, guidance)
        pt, p = cfg.patch_size_t, cfg.patch_size
        b, t, h, w, _ = latents.shape
        grid = (t // pt, h // p, w // p)
        cos, sin = rope_tables(grid, cfg.rope_axes_dim, cfg.rope_theta)

        time_in = VectorEmbedder(cfg.hidden_size, sinusoidal=True, name="time_in", **dt)
        pooled = VectorEmbedder(cfg.hidden_size, name="vector_in", **dt)(pooled_text)
        vec = time_in(timesteps) + pooled
        if cfg.guidance_embed:
            vec = vec + VectorEmbedder(cfg.hidden_size, sinusoidal=True, name="guidance_in", **dt)(guidance)
        block_vec = vec   # what the blocks are conditioned on; the final layer reads `vec`
        if cfg.image_condition_type == "token_replace":
            first_frame = jnp.arange(grid[0] * grid[1] * grid[2]) < grid[1] * grid[2]
            block_vec = TokenReplaceVec(vec, time_in(jnp.zeros_like(timesteps)) + pooled,
                                        nn.with_logical_constraint(first_frame, ("seq",)))

        patches = einops.rearrange(latents, "b (t pt) (h ph) (w pw) c -> b (t h w) pt ph pw c", pt=pt, ph=p, pw=p)
        img = dense(cfg.hidden_size, (None, None, None, None, "embed"), name="img_in", axis=(-4, -3, -2, -1),
                    **dt)(patches)
        txt = TokenRefiner(cfg, name="txt_in")(text_states, timesteps, text_mask)

        text_segments = jnp.where(text_mask.astype(bool), 1, PADDING_SEGMENT).astype(jnp.int32)
        remat = cfg.remat_policy
        aux = None
        if blocks is None:
            double = scan_blocks(DoubleStreamBlock, cfg, cfg.depth_double, "double_blocks", n_broadcast=4,
                                 remat_policy=remat)
            (img, txt), _ = double((_residual(img), _residual(txt, "text_seq")), block_vec, cos, sin,
                                   text_segments)
            single = scan_blocks(SingleStreamBlock, cfg, cfg.depth_single, "single_blocks", n_broadcast=4,
                                 remat_policy=remat)
            (img, _), _ = single((img, txt), block_vec, cos, sin, text_segments)
        else:   # the stacks' parameters are read by `blocks` (through `run_layers`), not by modules here
            img, aux = blocks(_residual(img), _residual(txt, "text_seq"), block_vec, cos, sin, text_segments)

        out = FinalLayer(cfg, name="final_layer")(img, vec)
        out = einops.rearrange(out, "b (t h w) pt ph pw c -> b (t pt) (h ph) (w pw) c",
                               t=grid[0], h=grid[1], w=grid[2])
        out = out.astype(latents.dtype)
        return out if blocks is None else (out, aux)


STACKS = {"double_blocks": DoubleStreamBlock, "single_blocks": SingleStreamBlock}


def run_layers(cfg: DiTConfig, params, stack: str, start: int, stop: int, img, txt, vec, cos, sin, text_segments):
    """Layers [start, stop) of one block stack ("double_blocks" or "single_blocks") on the streams (img [B, N, D],
    txt [B, L, D]) → (img, txt): the stack's parameters `params[stack]` (stacked on a leading layer axis) sliced and
    scanned, the same arithmetic as the full call (no remat: for inference). `vec` is what the `blocks` hook was
    given (a `TokenReplaceVec` for "token_replace" models)."""
    if not 0 <= start <= stop <= len(jax.tree.leaves(params[stack])[0]):
        raise ValueError(f"layers [{start}, {stop}) out of range for {stack}")
    if start == stop:
        return img, txt
    block = STACKS[stack](cfg)
    layers = jax.tree.map(lambda x: x[start:stop], params[stack])

    def body(carry, layer_params):
        return block.apply({"params": layer_params}, carry, vec, cos, sin, text_segments)[0], None
    return jax.lax.scan(body, (img, txt), layers)[0]
