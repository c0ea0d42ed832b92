"""Small shared pieces of the HunyuanVideo transformer: dense layers with logical axes, norms, modulation, MLPs,
and the sinusoidal timestep embedding.

Every parameter carries logical axis names (see `hyvideo_jax.parallel.rules`); activations are constrained with
`nn.with_logical_constraint`, which is a no-op outside a mesh.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

# Original zero-initializes modulation and output layers (adaLN-zero); everything else uses PyTorch's nn.Linear default,
# which we approximate with a scaled uniform (lecun-uniform-like) init.
default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros_init()


def dense(features: int | Sequence[int], kernel_axes: Axes, *, name: str, dtype: Dtype, param_dtype: Dtype,
          axis: int | Sequence[int] = -1, use_bias: bool = True, zero_init: bool = False) -> nn.DenseGeneral:
    """A `DenseGeneral` whose kernel and bias carry logical axis names (bias axes = the output axes of the kernel)."""
    features_t = (features,) if isinstance(features, int) else tuple(features)
    n_out = len(features_t)
    init = zeros if zero_init else default_kernel_init
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(init, kernel_axes),
        bias_init=nn.with_logical_partitioning(zeros, kernel_axes[-n_out:]),
    )


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learnable scale, computed in fp32 and cast back (qk-norm of the DiT)."""
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in fp32 (eps 1e-6); `affine=False` is the parameter-free norm of the DiT blocks."""
    affine: bool = False
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            d = x.shape[-1]
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                               (d,), self.param_dtype)
            bias = self.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), (d,), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


def modulate(x, shift, scale):
    """adaLN modulation `x * (1 + scale) + shift` with per-sample [B, D] shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Modulation(nn.Module):
    """`Linear(SiLU(vec))` split into `chunks` vectors of size D (zero-initialized, as in the original)."""
    chunks: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec) -> list[jax.Array]:
        d = vec.shape[-1]
        out = dense((self.chunks, d), ("embed", None, "mlp"), name="linear", dtype=self.dtype,
                    param_dtype=self.param_dtype, zero_init=True)(nn.silu(vec))
        return [out[:, i] for i in range(self.chunks)]


class MLP(nn.Module):
    """fc1 → activation → fc2, hidden width `mlp_dim`; activations of shape [B, L, ...] are logically constrained."""
    mlp_dim: int
    activation: Callable = nn.gelu  # tanh approximation by default, as `gelu_tanh` in the original
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = dense(self.mlp_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h = nn.with_logical_constraint(self.activation(h), ("batch", "seq", "act_mlp"))
        return dense(d, ("mlp", "embed"), name="fc2", dtype=self.dtype, param_dtype=self.param_dtype)(h)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding of float timesteps t [B] → [B, dim] in fp32, ordered [cos | sin] as in the original."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class VectorEmbedder(nn.Module):
    """Linear → SiLU → Linear: every vector embedder of the DiT (timestep, guidance, pooled text).

    With `sinusoidal=True` the input is a float timestep [B] (or guidance value), first embedded with
    `timestep_embedding(·, 256)` in fp32 and cast to the compute dtype, as in the original.
    """
    hidden_size: int
    sinusoidal: bool = False
    frequency_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.sinusoidal:
            x = timestep_embedding(x, self.frequency_dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden_size, (None, "embed"), name="linear_1", **kw)(x.astype(self.dtype))
        return dense(self.hidden_size, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))
