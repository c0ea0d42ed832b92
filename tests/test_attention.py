"""Attention backends agree with the reference (forward and gradients), honour the padding semantics, and the
chunked backend's memory grows linearly with sequence length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyvideo_jax.models.attention import attention, cudnn_attention, xla_attention
from hyvideo_jax.models.chunked_attention import chunked_attention
from hyvideo_jax.models.splash_attention import SplashBlocks, splash_attention

B, L, H, D = 2, 300, 2, 32
SEGMENTS = np.array([[1] * 280 + [2] * 20, [1] * 257 + [2] * 43], np.int32)  # image+valid text, then padding


def qkv(seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(k, (B, L, H, D), dtype) for k in keys]


def grads(fn, q, k, v, dout, seg):
    return jax.vjp(lambda *x: fn(*x, seg, seg), q, k, v)[1](dout)


def _softmax_attention(q, k, v, q_seg, kv_seg, causal=False):
    """Plain attention differentiated by JAX: what the xla backend's own backward must reproduce."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
    mask = (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    if causal:
        mask = mask & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


@pytest.mark.parametrize("dtype, causal, tol", [(jnp.float32, False, 2e-6), (jnp.float32, True, 2e-6),
                                                (jnp.bfloat16, False, 2e-2)])
def test_xla_backward_equals_autodiff_of_the_softmax(dtype, causal, tol):
    """The xla backend's backward recomputes the probabilities from q, k and the log-sum-exp; its forward and
    gradients equal JAX's autodiff of the plain softmax (relative to each array's largest entry)."""
    q, k, v, dout = (x.astype(dtype) for x in qkv(3))
    fn = lambda *x: xla_attention(*x, causal=causal)
    ref = lambda *x: _softmax_attention(*x, causal=causal)
    got_out, got_vjp = jax.vjp(lambda *x: fn(*x, SEGMENTS, SEGMENTS), q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda *x: ref(*x, SEGMENTS, SEGMENTS), q, k, v)
    rel = lambda a, b: float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                             / jnp.abs(b.astype(jnp.float32)).max())
    errs = [rel(got_out, ref_out)] + [rel(a, b) for a, b in zip(got_vjp(dout), ref_vjp(dout))]
    print(f"{jnp.dtype(dtype).name}, causal={causal}: relative error of out, dq, dk, dv " +
          ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < tol


@pytest.mark.parametrize("name, fn", [
    ("chunked", lambda q, k, v, s1, s2: chunked_attention(q, k, v, s1, s2, block_q=64, block_k=96)),
    ("splash", lambda q, k, v, s1, s2: splash_attention(q, k, v, s1, s2, blocks=SplashBlocks(128, 128, 128),
                                                                  interpret=True)),
    ("splash, dq in its own kernel", lambda q, k, v, s1, s2: splash_attention(
        q, k, v, s1, s2, blocks=SplashBlocks(128, 128, 128, fused_backward=False), interpret=True)),
])
def test_backend_matches_xla_forward_and_gradients(name, fn):
    q, k, v, dout = qkv()
    ref, got = xla_attention(q, k, v, SEGMENTS, SEGMENTS), fn(q, k, v, SEGMENTS, SEGMENTS)
    err = float(jnp.abs(ref - got).max())
    gerr = max(float(jnp.abs(a - b).max()) for a, b in zip(grads(xla_attention, q, k, v, dout, SEGMENTS),
                                                            grads(fn, q, k, v, dout, SEGMENTS)))
    print(f"{name}: forward max error {err:.1e}, gradient max error {gerr:.1e}")
    assert err < 1e-5 and gerr < 1e-4


def test_splash_block_sizes_from_the_model_config_reach_the_kernel(monkeypatch):
    """model.splash_block_* and splash_fused_backward become the kernel's BlockSizes (traced only: the kernel is
    built at trace time); and the fused backward gives the separate-dq kernels' gradients (interpret mode)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    from hyvideo_jax.models.dit import HunyuanVideoDiT
    from tests.test_dit_model import example_inputs, tiny_config
    built = []
    real = sk.make_splash_mha
    monkeypatch.setattr(sk, "make_splash_mha", lambda mask, **kw: built.append(kw["block_sizes"]) or real(mask, **kw))
    cfg = tiny_config(attention_backend="splash", splash_block_q=256, splash_block_kv=256, splash_block_kv_compute=128,
                      splash_fused_backward=False)
    inputs = example_inputs(cfg, b=1, t=4, h=32, w=32)      # 1,024 image tokens (+ 5 text): padded to 1,280
    model = HunyuanVideoDiT(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    jax.eval_shape(lambda p: model.apply(p, *inputs), params)
    got = {(b.block_q, b.block_kv, b.block_kv_compute, b.block_q_dkv, b.block_kv_dkv, b.block_kv_dkv_compute,
            b.block_q_dq, b.block_kv_dq, b.use_fused_bwd_kernel) for b in built}
    # The blocks' attention over 1,029 tokens, and the token refiner's over 5 (blocks capped at one 128 tile).
    assert got == {(256, 256, 128, 256, 256, 128, 256, 256, False), (128,) * 8 + (False,)}
    with pytest.raises(ValueError, match=r"model.splash_block_\*: splash block kv_compute 384 must divide kv 512"):
        tiny_config(splash_block_kv_compute=384)

    q, k, v, dout = qkv(3)
    fused, separate = (grads(lambda *a: splash_attention(*a, blocks=SplashBlocks(128, 128, 128, fused_backward=f),
                                                         interpret=True), q, k, v, dout, SEGMENTS)
                       for f in (True, False))
    for a, b in zip(fused, separate):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_chunked_causal_matches_xla():
    q, k, v, dout = qkv(1)
    ref = xla_attention(q, k, v, SEGMENTS, SEGMENTS, causal=True)
    got = chunked_attention(q, k, v, SEGMENTS, SEGMENTS, causal=True, block_q=64, block_k=48)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_padding_never_reaches_valid_tokens():
    """Changing padded keys/values leaves every valid query's output unchanged, in every backend."""
    q, k, v, _ = qkv(2)
    pad = jnp.asarray(SEGMENTS != 1)[..., None, None]
    k2, v2 = jnp.where(pad, 50.0, k), jnp.where(pad, -50.0, v)
    valid = np.asarray(SEGMENTS == 1)
    for name in ("xla", "chunked"):
        a = attention(q, k, v, SEGMENTS, SEGMENTS, backend=name)
        b = attention(q, k2, v2, SEGMENTS, SEGMENTS, backend=name)
        np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-6, err_msg=name)


def test_cudnn_backend_semantics_by_key_lengths():
    """The cuDNN path masks keys by length: valid queries equal the segment-id result (run here through the
    same `jax.nn.dot_product_attention` call with the XLA implementation, as no GPU is present)."""
    q, k, v, _ = qkv(3)
    ref = np.asarray(xla_attention(q, k, v, SEGMENTS, SEGMENTS))
    got = np.asarray(cudnn_attention(q, k, v, SEGMENTS, SEGMENTS, implementation="xla"))
    valid = SEGMENTS == 1
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-5)
    assert np.abs(got[~valid] - ref[~valid]).max() > 1e-3  # padded queries differ (diffusers' semantics), unread


def _temp_bytes(fn, length):
    x = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32)
    s = jax.ShapeDtypeStruct((1, length), jnp.int32)
    loss = lambda q, k, v, seg: jnp.sum(fn(q, k, v, seg, seg))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, s).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly():
    """Forward+backward temporaries of `chunked` at 2k → 8k tokens grow ~4×, those of `xla` ~16×."""
    chunked = lambda *a: chunked_attention(*a, block_q=256, block_k=256)
    c2, c8 = _temp_bytes(chunked, 2048), _temp_bytes(chunked, 8192)
    x2, x8 = _temp_bytes(xla_attention, 2048), _temp_bytes(xla_attention, 8192)
    print(f"temp bytes 2k→8k tokens: chunked {c2:,} → {c8:,} ({c8 / c2:.1f}×), xla {x2:,} → {x8:,} ({x8 / x2:.1f}×)")
    assert c8 / c2 < 6 and x8 / x2 > 12


def test_unknown_backend_is_a_clear_error():
    q, k, v, _ = qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; expected one of"):
        attention(q, k, v, backend="flash")
