"""HunyuanVideo's causal 3D VAE ("884-16c-hy", reference §2) as flax.linen modules.

    model = HunyuanVideoVAE(VAEConfig.from_config(config.vae.model))
    latents = model.apply({"params": params}, video, method=model.encode)      # scaled by 0.476986
    video = model.apply({"params": params}, latents, method=model.decode)

Videos are channel-last [B, T, H, W, 3] with pixels in [-1, 1]; T must be 4k+1 (1 frame, an image, works) and
H, W multiples of 8. Latents are [B, (T-1)/4+1, H/8, W/8, 16]. Every convolution is causal in time: replicate
("edge") padding on all three axes, with the kt-1 time frames padded in front only, so frame t of any activation
depends only on input frames ≤ t — except through GroupNorm, whose statistics span all frames (as in the
reference), which is why tiled and untiled results differ slightly.

Long or large videos go through `hyvideo_jax.models.vae_tiling` (spatial tiles and temporal windows with linear
blending); `TileParams` and the presets below are what the config selects.
"""

import dataclasses
import math
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from hyvideo_jax.config_fields import from_fields, to_plain_dict
from hyvideo_jax.models.layers import default_kernel_init, dense, dtypes, zeros

Dtype = Any
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior clamps log-variance to this range, as the reference does


@dataclasses.dataclass(frozen=True)
class TileParams:
    """Tile sizes in sample (pixel) units; latent sizes are these divided by the compression ratios.

    Spatial tiles are `min_size`² pixels every `stride` pixels, blended over `min_size - stride` pixels; temporal
    windows are `min_frames + 1` frames every `stride_frames` frames, blended over `min_frames - stride_frames`
    decoded frames. Spatial tiling applies when a frame is larger than one tile, temporal windows when the video is
    longer than `min_frames`.
    """
    min_size: int
    stride: int
    min_frames: int
    stride_frames: int
    spatial: bool = True
    temporal: bool = True


# The official pipeline's `enable_tiling()` (tile 256 px / 64 frames, overlap factor 0.25) and diffusers'
# `enable_tiling()` defaults (tile 256 px, windows of 16 frames with stride 12, its framewise coding).
TILE_PRESETS: dict[str, TileParams] = {
    "official": TileParams(min_size=256, stride=192, min_frames=64, stride_frames=48),
    "diffusers": TileParams(min_size=256, stride=192, min_frames=16, stride_frames=12),
    "none": TileParams(min_size=256, stride=192, min_frames=64, stride_frames=48, spatial=False, temporal=False),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the VAE. Defaults are the released 884-16c-hy VAE (246,478,803 parameters).

    `tiling` names a preset in `TILE_PRESETS`; the `tile_*` fields, when set, override its numbers (pixels/frames).
    `attention_block_size` is the query (and key) block length of the mid-block attention: scores are computed
    for one block pair at a time, never for the whole (T·H·W)² matrix.
    """
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.476986
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_block_size: int = 4096
    tiling: str = "official"
    tile_sample_min_size: int | None = None
    tile_sample_stride: int | None = None
    tile_sample_min_frames: int | None = None
    tile_sample_stride_frames: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        self.validate()

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        def fail(field, msg):
            raise ValueError(f"vae.{field}: {msg}")
        for f in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                  "attention_block_size"):
            if int(getattr(self, f)) <= 0:
                fail(f, f"must be positive, got {getattr(self, f)}")
        if len(self.block_out_channels) < 3:
            fail("block_out_channels", f"needs at least 3 blocks (two of them downsample time), "
                 f"got {self.block_out_channels}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                fail("norm_num_groups", f"{self.norm_num_groups} groups do not divide {c} channels "
                     f"(block_out_channels={self.block_out_channels})")
        if self.act_fn != "silu":
            fail("act_fn", f"only 'silu' is supported, got {self.act_fn!r}")
        if self.temporal_compression_ratio != 4:
            fail("temporal_compression_ratio", f"must be 4 (the only ratio the decoder supports), "
                 f"got {self.temporal_compression_ratio}")
        n_spatial = math.log2(self.spatial_compression_ratio) if self.spatial_compression_ratio > 0 else -1
        if n_spatial != int(n_spatial) or not 0 <= n_spatial <= len(self.block_out_channels):
            fail("spatial_compression_ratio", f"must be 2^n with n <= {len(self.block_out_channels)} "
                 f"(number of blocks), got {self.spatial_compression_ratio}")
        for f in ("param_dtype", "dtype"):
            if getattr(self, f) not in ("float32", "bfloat16", "float16"):
                fail(f, f"must be float32, bfloat16 or float16, got {getattr(self, f)!r}")
        if self.tiling not in TILE_PRESETS:
            fail("tiling", f"must be one of {sorted(TILE_PRESETS)}, got {self.tiling!r}")
        self.tile_params()  # validates the tile numbers

    def tile_params(self) -> TileParams:
        """The preset named by `tiling` with any `tile_*` overrides, checked against the compression ratios."""
        preset = TILE_PRESETS[self.tiling]
        overrides = dict(min_size=self.tile_sample_min_size, stride=self.tile_sample_stride,
                         min_frames=self.tile_sample_min_frames, stride_frames=self.tile_sample_stride_frames)
        tiles = dataclasses.replace(preset, **{k: int(v) for k, v in overrides.items() if v is not None})
        return check_tile_params(tiles, self)

    @classmethod
    def from_config(cls, config: "VAEConfig | Mapping[str, Any]") -> "VAEConfig":
        """From a `VAEConfig`, a dict or a ConfigDict (e.g. `config.vae.model`); unknown keys are errors."""
        return from_fields(cls, config, "vae")

    def to_dict(self) -> dict[str, Any]:
        return to_plain_dict(self)

    @property
    def num_spatial_layers(self) -> int:
        return int(math.log2(self.spatial_compression_ratio))

    def block_strides(self) -> list[tuple[int, int, int]]:
        """(t, h, w) down/upsampling factor of each encoder block (decoder blocks use the same list).

        Reference rule: block i halves space if i < log2(spatial ratio) and halves time if it is one of the two
        blocks before the last; the last block never resamples time.
        """
        n = len(self.block_out_channels)
        n_time = int(math.log2(self.temporal_compression_ratio))
        strides = []
        for i in range(n):
            s = 2 if i < self.num_spatial_layers else 1
            t = 2 if (i >= n - 1 - n_time and i != n - 1) else 1
            strides.append((t, s, s))
        return strides


def check_tile_params(tiles: TileParams, config: VAEConfig) -> TileParams:
    """Return `tiles` if the VAE can tile with them, else raise ValueError naming the config field: sizes are
    positive multiples of the compression ratios, and each overlap is at most half a tile (the stride at least
    half the tile), which keeps tiles from reaching past their neighbours' pieces."""
    s, t = config.spatial_compression_ratio, config.temporal_compression_ratio
    checks = (("tile_sample_min_size", tiles.min_size, s), ("tile_sample_stride", tiles.stride, s),
              ("tile_sample_min_frames", tiles.min_frames, t), ("tile_sample_stride_frames", tiles.stride_frames, t))
    for field, value, ratio in checks:
        if value <= 0 or value % ratio:
            raise ValueError(f"vae.{field}: must be a positive multiple of {ratio}, got {value}")
    for field, stride, size, what in (("tile_sample_stride", tiles.stride, tiles.min_size, "tile size"),
                                      ("tile_sample_stride_frames", tiles.stride_frames, tiles.min_frames,
                                       "window length")):
        if stride > size:
            raise ValueError(f"vae.{field}: {stride} exceeds the {what} {size} (tiles would leave gaps)")
        if 2 * stride < size:
            raise ValueError(f"vae.{field}: {stride} is less than half the {what} {size}; overlaps of more than "
                             "half a tile are not supported")
    return tiles


def check_video_shape(shape: tuple[int, ...], config: VAEConfig):
    """Raise ValueError unless `shape` is a video [B, T, H, W, C] the encoder accepts (T = 4k+1, H, W % 8 == 0)."""
    if len(shape) != 5:
        raise ValueError(f"video must be [B, T, H, W, C], got shape {tuple(shape)}")
    _, t, h, w, c = shape
    rt, rs = config.temporal_compression_ratio, config.spatial_compression_ratio
    if t < 1 or (t - 1) % rt:
        raise ValueError(f"frames must be {rt}k+1 (1, 5, 9, ...), got {t}")
    if h % rs or w % rs or h == 0 or w == 0:
        raise ValueError(f"height and width must be positive multiples of {rs}, got {h}x{w}")
    if c != config.in_channels:
        raise ValueError(f"video must have {config.in_channels} channels (last axis), got {c}")


def check_latent_shape(shape: tuple[int, ...], config: VAEConfig):
    """Raise ValueError unless `shape` is a latent [B, T, h, w, latent_channels]."""
    if len(shape) != 5:
        raise ValueError(f"latents must be [B, T, H, W, C], got shape {tuple(shape)}")
    if shape[-1] != config.latent_channels:
        raise ValueError(f"latents must have {config.latent_channels} channels (last axis), got {shape[-1]}")
    if min(shape[1:4]) < 1:
        raise ValueError(f"latents need at least one frame and pixel, got shape {tuple(shape)}")


VIDEO_AXES = ("batch", "frames", "height", "width", "act_vae_channels")  # logical names of [B, T, H, W, C]


def conv3d(x, kernel, strides: tuple[int, int, int]):
    """The "VALID" convolution of x [B, T, H, W, Cin] with kernel [kt, kh, kw, Cin, Cout]. On CPU it is computed as
    kt 2D convolutions of strided frame slices, summed: XLA:CPU's direct 3D convolution takes 3-4x as long (a VAE
    train step at 8 x 5 x 32 x 32: 1.8 s against 0.5 s); elsewhere the direct one is kept."""
    def direct(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    def by_frames(x, kernel):
        kt, st = kernel.shape[0], strides[0]
        frames = (x.shape[1] - kt) // st + 1
        out = None
        for dt in range(kt):
            taps = x[:, dt:dt + st * (frames - 1) + 1:st]           # [B, frames, H, W, Cin]: tap dt of each output
            y = jax.lax.conv_general_dilated(taps.reshape(-1, *taps.shape[2:]), kernel[dt], strides[1:], "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y.reshape(x.shape[0], frames, *y.shape[1:])
            out = y if out is None else out + y
        return out
    if kernel.shape[0] == 1:
        return direct(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=by_frames, default=direct)


class CausalConv3d(nn.Module):
    """Conv3d on [B, T, H, W, C] after replicate padding (k//2 each side in space, k-1 frames in front in time).

    With k = 1 this is the plain 1×1×1 convolution (`quant_conv`, shortcuts). Kernel [kt, kh, kw, Cin, Cout].
    """
    features: int
    kernel_size: int = 3
    strides: tuple[int, int, int] = (1, 1, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        if k > 1:
            x = jnp.pad(x, ((0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
        kernel = self.param("kernel", nn.with_logical_partitioning(default_kernel_init,
                                                                   (None, None, None, None, "vae_channels")),
                            (k, k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(zeros, ("vae_channels",)), (self.features,),
                          self.param_dtype)
        y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)
        # Under a mesh, activations shard over batch and image rows (the rules table maps 'height'); XLA adds the
        # halo exchange the 3×3×3 convolutions need.
        return nn.with_logical_constraint(y + bias.astype(self.dtype), VIDEO_AXES)


class GroupNorm(nn.Module):
    """GroupNorm on [B, ..., C]: statistics per sample and group over every other axis (all frames), fp32."""
    num_groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("vae_channels",)),
                           (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(zeros, ("vae_channels",)), (c,), self.param_dtype)
        grouped = einops.rearrange(x.astype(jnp.float32), "b ... (g c) -> b (...) g c", g=self.num_groups)
        mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)
        normed = (grouped - mean) * jax.lax.rsqrt(var + self.eps)
        y = normed.reshape(x.shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def block_causal_attention(q, k, v, frame_index, block_size: int):
    """Single-head attention where token i sees token j iff frame_index[j] <= frame_index[i]; fp32 softmax.

    q, k, v: [B, L, D]; frame_index: [L] non-decreasing ints (t-major flattening of [T, H, W]). Scores are
    computed for one (query block, key block) pair at a time with an online softmax, so memory is
    O(block_size²) rather than O(L²); key blocks lying wholly in later frames than a query block are skipped.
    Every query sees key 0 (frame 0), so no row is fully masked.
    """
    b, length, d = q.shape
    n_blocks = -(-length // block_size)
    pad = n_blocks * block_size - length
    scale = 1.0 / math.sqrt(d)
    big_frame = jnp.iinfo(jnp.int32).max
    q_frames = jnp.pad(frame_index.astype(jnp.int32), (0, pad), constant_values=big_frame)
    k_frames = jnp.pad(frame_index.astype(jnp.int32), (0, pad), constant_values=big_frame)
    qb, kb, vb = (einops.rearrange(jnp.pad(a, ((0, 0), (0, pad), (0, 0))), "b (n l) d -> n b l d", l=block_size)
                  for a in (q, k, v))
    q_frames = q_frames.reshape(n_blocks, block_size)
    k_frames = k_frames.reshape(n_blocks, block_size)
    neg = jnp.float32(-1e30)  # finite, so that masked entries underflow to 0 without inf - inf

    def one_query_block(args):
        q_blk, qf = args

        def step(carry, kv):
            m, l, acc = carry
            k_blk, v_blk, kf = kv

            def attend(_):
                s = jnp.einsum("bqd,bkd->bqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
                s = jnp.where(kf[None, None, :] <= qf[None, :, None], s, neg)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                correction = jnp.exp(m - m_new)
                l_new = l * correction + p.sum(-1)
                acc_new = acc * correction[..., None] + jnp.einsum("bqk,bkd->bqd", p.astype(v_blk.dtype), v_blk,
                                                                   preferred_element_type=jnp.float32)
                return m_new, l_new, acc_new

            # Key blocks starting after the query block's last frame contribute nothing: skip their FLOPs.
            return jax.lax.cond(kf[0] <= qf[-1], attend, lambda _: (m, l, acc), None), None

        init = (jnp.full((b, block_size), neg), jnp.zeros((b, block_size), jnp.float32),
                jnp.zeros((b, block_size, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, k_frames))
        return acc / l[..., None]

    out = jax.lax.map(one_query_block, (qb, q_frames))
    return einops.rearrange(out, "n b l d -> b (n l) d")[:, :length].astype(q.dtype)


class MidBlockAttention(nn.Module):
    """GroupNorm → 1-head attention over all T·H·W tokens (block-causal over frames) → out projection, + input."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dtypes(cfg)
        _, t, h, w, c = x.shape
        normed = GroupNorm(cfg.norm_num_groups, name="group_norm", **kw)(x)
        tokens = einops.rearrange(normed, "b t h w c -> b (t h w) c")
        q, k, v = (dense(c, (None, "vae_channels"), name=n, **kw)(tokens) for n in ("to_q", "to_k", "to_v"))
        frame_index = jnp.repeat(jnp.arange(t, dtype=jnp.int32), h * w)
        out = block_causal_attention(q, k, v, frame_index, min(cfg.attention_block_size, t * h * w))
        out = dense(c, (None, "vae_channels"), name="to_out_0", **kw)(out)
        return x + einops.rearrange(out, "b (t h w) c -> b t h w c", t=t, h=h, w=w)


class ResnetBlock(nn.Module):
    """GN → SiLU → conv3 → GN → SiLU → conv3, plus the input (through a 1×1×1 conv if channels change)."""
    features: int
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dtypes(cfg)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, name="norm1", **kw)(x))
        h = CausalConv3d(self.features, 3, name="conv1", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, name="norm2", **kw)(h))
        h = CausalConv3d(self.features, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, 1, name="conv_shortcut", **kw)(x)
        return x.astype(h.dtype) + h


class MidBlock(nn.Module):
    """resnet → attention → resnet at the deepest width."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        c = cfg.block_out_channels[-1]
        x = ResnetBlock(c, cfg, name="resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = MidBlockAttention(cfg, name="attentions_0")(x)
        return ResnetBlock(c, cfg, name="resnets_1")(x)


def upsample_nearest(x, factor: tuple[int, int, int]):
    """Nearest upsampling of [B, T, H, W, C] with the first-frame rule: frame 0 is upsampled in space only,
    frames 1.. are repeated `factor[0]` times in time, so T frames become 1 + factor[0]·(T-1)."""
    ft, fh, fw = factor
    x = jnp.repeat(jnp.repeat(x, fh, axis=2), fw, axis=3)
    if ft == 1 or x.shape[1] == 1:
        return x
    return jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], ft, axis=1)], axis=1)


class Encoder(nn.Module):
    """Video [B, T, H, W, Cin] → moments [B, (T-1)/4+1, H/8, W/8, 2·latent] (before `quant_conv`)."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dtypes(cfg)
        x = CausalConv3d(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        for i, (features, stride) in enumerate(zip(cfg.block_out_channels, cfg.block_strides())):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock(features, cfg, name=f"down_blocks_{i}_resnets_{j}")(x)
            if stride != (1, 1, 1):
                x = CausalConv3d(features, 3, strides=stride, name=f"down_blocks_{i}_downsamplers_0_conv", **kw)(x)
        x = MidBlock(cfg, name="mid_block")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, name="conv_norm_out", **kw)(x))
        return CausalConv3d(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents [B, T, h, w, latent] (after `post_quant_conv`) → video [B, 4(T-1)+1, 8h, 8w, Cout]."""
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dtypes(cfg)
        x = CausalConv3d(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(z)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, (features, factor) in enumerate(zip(cfg.block_out_channels[::-1], cfg.block_strides())):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock(features, cfg, name=f"up_blocks_{i}_resnets_{j}")(x)
            if factor != (1, 1, 1):
                x = upsample_nearest(x, factor)
                x = CausalConv3d(features, 3, name=f"up_blocks_{i}_upsamplers_0_conv", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, name="conv_norm_out", **kw)(x))
        return CausalConv3d(cfg.out_channels, 3, name="conv_out", **kw)(x)


class HunyuanVideoVAE(nn.Module):
    """The causal 3D VAE: encoder + quant_conv, post_quant_conv + decoder. Calling it reconstructs a video.

    Methods (all channel-last, pixels in [-1, 1]):
      encode_moments(video)   → moments [B, t, h, w, 2·latent] (mean | log-variance, before clamping)
      decode_unscaled(z)      → video from unscaled latents z
      encode(video, rng=None) → latents × scaling_factor (posterior mode, or a sample if rng is given)
      decode(latents)         → video from scaled latents
      __call__(video, rng)    → (reconstruction, mean, logvar), the training forward pass
    """
    config: VAEConfig

    def setup(self):
        cfg = self.config
        kw = dtypes(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_channels, 1, **kw)
        self.post_quant_conv = CausalConv3d(cfg.latent_channels, 1, **kw)

    def encode_moments(self, video):
        check_video_shape(video.shape, self.config)
        return self.quant_conv(self.encoder(video))

    def decode_unscaled(self, z):
        check_latent_shape(z.shape, self.config)
        return self.decoder(self.post_quant_conv(z))

    def encode(self, video, rng=None):
        mean, logvar = posterior(self.encode_moments(video))
        return posterior_latents(mean, logvar, rng) * self.config.scaling_factor

    def decode(self, latents):
        return self.decode_unscaled(latents / self.config.scaling_factor)

    def __call__(self, video, rng=None):
        mean, logvar = posterior(self.encode_moments(video))
        return self.decode_unscaled(posterior_latents(mean, logvar, rng)), mean, logvar


def posterior(moments):
    """Split moments [..., 2C] into (mean, logvar) in fp32, logvar clamped to [-30, 20] as the reference does."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def posterior_latents(mean, logvar, rng=None):
    """The posterior mode (rng None) or a reparameterized sample mean + exp(logvar/2)·ε."""
    if rng is None:
        return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def init_params(config: VAEConfig, rng, frames: int = 1, size: int | None = None):
    """Random parameters (boxed logical-axis metadata removed) from a small dummy video."""
    size = size or config.spatial_compression_ratio
    video = jnp.zeros((1, frames, size, size, config.in_channels), jnp.float32)
    model = HunyuanVideoVAE(config)
    return nn.meta.unbox(model.init(rng, video))["params"]


def inflate_to_current_frame(params):
    """Parameters whose causal convolutions see only the current frame: each 3D kernel's temporal taps summed into
    its last tap (the current frame's), the others zero; 1×1×1 kernels, biases and norms unchanged.

    A VAE trained on stills (one-frame videos) learned only those sums: causal replicate padding shows every tap
    the same frame. Inflated, it encodes and decodes a still exactly as before, and in a clip each frame's features
    come from that frame alone (frames mix only through the normalization statistics and mid-block attention): latent
    frame t holds frame 4t, the strided convolutions keeping every second frame, and a decoded latent frame is
    repeated over its four frames. Training on clips then starts from the stills' reconstructions rather than from
    random temporal taps, which otherwise undo what the stills taught (the image-to-video inflation of causal video
    autoencoders)."""
    def inflate(kernel):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 5 or kernel.shape[0] == 1:
            return kernel
        return jnp.zeros_like(kernel).at[-1].set(kernel.sum(axis=0))
    return jax.tree.map(inflate, params)
