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

# The original zero-initializes modulation and output layers (adaLN-zero); other kernels follow PyTorch's nn.Linear
# default (uniform with variance 1/(3·fan_in)).
zeros = nn.initializers.zeros_init()
default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # for [..., in, out] kernels


class Dense(nn.Module):
    """x [..., *in] · kernel [*in, *features] + bias [*features], contracting the last `n_in` axes of x.

    The kernel is created at its full shape with its logical axis names (not flattened first, as
    `nn.DenseGeneral` does), so the names stay valid under a mesh. Init: PyTorch-like fan-in uniform, or zeros.
    """
    features: tuple[int, ...]
    kernel_axes: Axes
    n_in: int = 1
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n_out = len(self.features)
        if len(self.kernel_axes) != self.n_in + n_out:
            raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} must name {self.n_in} input and "
                             f"{n_out} output axes")
        init = zeros if self.zero_init else nn.initializers.variance_scaling(
            1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(self.n_in)),
            out_axis=tuple(range(self.n_in, self.n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            tuple(x.shape[-self.n_in:]) + tuple(self.features), self.param_dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(zeros, self.kernel_axes[self.n_in:]),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(features: int | Sequence[int], kernel_axes: Axes, *, name: str, dtype: Dtype, param_dtype: Dtype,
          axis: int | Sequence[int] = -1, use_bias: bool = True, zero_init: bool = False) -> Dense:
    """A `Dense` over the trailing `axis` (-1, or a run such as (-2, -1)) with named kernel and bias axes."""
    n_in = 1 if isinstance(axis, int) else len(tuple(axis))
    features_t = (features,) if isinstance(features, int) else tuple(features)
    return Dense(features_t, tuple(kernel_axes), n_in=n_in, use_bias=use_bias, zero_init=zero_init, dtype=dtype,
                 param_dtype=param_dtype, name=name)


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
    """adaLN modulation `x * (1 + scale) + shift` of tokens x [B, L, D]: per-sample [B, D] shift/scale broadcast over
    tokens, or per-token [B, L, D] (or [B, 1, D]) ones."""
    if shift.ndim == 2:
        shift, scale = shift[:, None, :], scale[:, None, :]
    return x * (1 + scale) + shift


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
    """fc1 → activation → fc2, hidden width `mlp_dim`; the hidden activation [B, L, mlp_dim] is logically
    constrained with `seq` as its token axis ('seq' for image tokens, 'text_seq' for text)."""
    mlp_dim: int
    activation: Callable = nn.gelu  # tanh approximation by default, as `gelu_tanh` in the original
    seq: str = "seq"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = dense(self.mlp_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h = nn.with_logical_constraint(self.activation(h), ("batch", self.seq, "act_mlp"))
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


# Names of the residuals the blocks tag with `jax.ad_checkpoint.checkpoint_name`, for the policies below:
#   "attention"  what the attention backward needs from its forward: the output and, for the kernels with their
#                own backward (splash, chunked, ring), the log-sum-exp. Saving it means attention, ~86 % of the
#                FLOPs at 720p, is never recomputed, while everything around it is.
#   "qkv"        q, k, v after the norms and RoPE (the attention inputs), per stream.
ATTENTION_RESIDUALS, QKV_RESIDUALS = "attention", "qkv"
_names = jax.checkpoint_policies.save_only_these_names

REMAT_POLICIES = {
    "none": None,  # keep every activation (no rematerialization)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep the attention residuals, recompute the rest of the block (its matmuls and elementwise work)
    "attention": _names(ATTENTION_RESIDUALS),
    # ... and q, k, v too, so the backward recomputes only the MLP path and the projections into q, k, v
    "attention_qkv": _names(ATTENTION_RESIDUALS, QKV_RESIDUALS),
    # ... and the matmul outputs without batch dimensions (the weight matmuls)
    "attention_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _names(ATTENTION_RESIDUALS)),
    # No offload policy: with `save_and_offload_only_these_names`, JAX still reruns the splash forward kernel in the
    # backward (its residuals live inside a custom VJP under shard_map and vmap); the AOT compile of the 13B step on
    # v5p showed the forward run twice per backward, as under "full".
}


def dtypes(cfg) -> dict[str, Any]:
    """Compute and parameter dtypes of a config with `dtype` / `param_dtype` name fields, as Flax kwargs."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def scan_blocks(block_cls, cfg, length: int, name: str, n_broadcast: int, remat_policy: str = "none"):
    """`length` copies of `block_cls(cfg)` as one `nn.scan`, parameters stacked on a leading 'layers' axis.

    The block is called as `block(carry, *broadcast_args) -> (carry, None)`; with a remat policy other than
    "none" each block is rematerialized under that `jax.checkpoint` policy.
    """
    policy = REMAT_POLICIES[remat_policy]
    if policy is not None:
        block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
    return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * n_broadcast, length=length,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name=name)
