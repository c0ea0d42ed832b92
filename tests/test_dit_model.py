"""The DiT module itself: scan keeps the program size independent of depth, remat keeps gradients, inputs are
checked with clear errors, and the 13B tree is counted without allocation."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs import hunyuan_video_13b, tiny
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT


def tiny_config(**kw) -> DiTConfig:
    return dataclasses.replace(DiTConfig.from_config(tiny.get_config().model), **kw)


def example_inputs(cfg: DiTConfig, b=2, t=2, h=4, w=6, text_len=5):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, t, h, w, cfg.in_channels), np.float32), np.array([300.0, 900.0][:b], np.float32),
            rng.standard_normal((b, text_len, cfg.text_states_dim), np.float32),
            np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]][:b], np.int32),
            rng.standard_normal((b, cfg.pooled_text_dim), np.float32), np.array([6016.0, 1000.0][:b], np.float32))


def random_init(cfg: DiTConfig, inputs, seed=0):
    """init, then every leaf re-drawn (the real init zeroes the modulation and output layers)."""
    shapes = jax.eval_shape(lambda: HunyuanVideoDiT(cfg).init(jax.random.PRNGKey(seed), *inputs))["params"]
    leaves, tree = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        jax.random.normal(k, x.shape) * 0.2 + (1.0 if path[-1].key == "scale" else 0.0)
        for k, (path, x) in zip(keys, leaves)])


def test_13b_config_counts_the_released_parameters_without_allocating():
    cfg = DiTConfig.from_config(hunyuan_video_13b.get_config().model)
    model = HunyuanVideoDiT(cfg)
    inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in example_inputs(cfg, t=1, h=2, w=2)]
    shapes = jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *inputs)["params"]
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 12_821_012_544
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))   # fp32 masters for training


def _program_size(cfg: DiTConfig) -> int:
    inputs = example_inputs(cfg)
    model = HunyuanVideoDiT(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    text = jax.jit(model.apply).lower(params, *inputs).as_text()
    return len([line for line in text.splitlines() if re.search(r"stablehlo\.", line)])


def test_program_size_does_not_grow_with_depth():
    """Acceptance 4 (structure): the 13B depth (20 + 40) lowers to about the ops of 2 + 2 blocks (scan), and doubling
    it again adds none. (Compile times are printed by benchmarks/dit_compile_time.py.)"""
    shallow = _program_size(tiny_config(depth_double=2, depth_single=2))
    deep = _program_size(tiny_config(depth_double=20, depth_single=40))
    deeper = _program_size(tiny_config(depth_double=40, depth_single=80))
    print(f"stablehlo ops: depth 2+2 → {shallow}, 20+40 → {deep}, 40+80 → {deeper}")
    assert deep <= 1.1 * shallow and deeper == deep


def test_remat_policies_keep_gradients():
    cfg = tiny_config(depth_double=1, depth_single=1, depth_refiner=1)
    inputs = example_inputs(cfg)
    params = random_init(cfg, inputs)

    def grads(c):
        loss = lambda p: jnp.mean(HunyuanVideoDiT(c).apply({"params": p}, *inputs) ** 2)
        return jax.jit(jax.grad(loss))(params)
    ref = grads(cfg)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref)) > 1e-3  # gradients are not trivial
    for policy in ("full", "dots_no_batch", "attention", "attention_qkv", "attention_dots"):
        got = grads(dataclasses.replace(cfg, remat_policy=policy))
        for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
            # fp32 rounding only: recomputed parts fuse (and sum) in another order (measured up to 2e-6)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=policy)


def _pallas_kernels(jaxpr, counts):
    """Pallas kernel calls by name in a jaxpr and every jaxpr nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            counts[str(eqn.params.get("name_and_src_info", eqn.params.get("name"))).split(" ")[0]] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    _pallas_kernels(getattr(sub, "jaxpr", sub), counts)
    return counts


def test_attention_remat_policies_never_recompute_attention():
    """The splash forward kernel runs once per block stack (refiner, double, single) under "none" and the
    "attention*" policies, which keep its tagged output and log-sum-exp, and twice under "full" and the dot
    policies (forward, then recomputed in the backward). Counted in the differentiated program after dead-code
    elimination, which is what the compiler receives; traced only, no kernel runs."""
    import collections

    from jax._src.interpreters import partial_eval as pe
    runs = {}
    for policy in ("none", "full", "dots_no_batch", "attention", "attention_qkv", "attention_dots"):
        cfg = tiny_config(attention_backend="splash", remat_policy=policy, depth_refiner=1)
        inputs = example_inputs(cfg, b=1)
        model = HunyuanVideoDiT(cfg)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
        step = jax.make_jaxpr(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, *inputs) ** 2)))(params)
        live, _ = pe.dce_jaxpr(step.jaxpr, [True] * len(step.jaxpr.outvars))
        kernels = _pallas_kernels(live, collections.Counter())
        runs[policy] = (kernels["splash_mha_fwd_segmented_residuals"], kernels["splash_mha_dkv_segmented_no_residuals"])
    print("splash (forward, backward) kernels in the train step:", runs)
    assert runs == {"none": (3, 3), "full": (6, 3), "dots_no_batch": (6, 3), "attention": (3, 3),
                    "attention_qkv": (3, 3), "attention_dots": (3, 3)}


def test_bad_inputs_get_clear_errors():
    cfg = tiny_config()
    x, t, text, mask, pooled, g = example_inputs(cfg)
    model = HunyuanVideoDiT(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, text, mask, pooled, g))
    check = lambda *a, **k: jax.eval_shape(lambda p: model.apply(p, *a, **k), params)
    with pytest.raises(ValueError, match=r"latent W=5 is not divisible by the patch size 2"):
        check(x[:, :, :, :5], t, text, mask, pooled, g)
    with pytest.raises(ValueError, match=r"latents have 6 channels, the model expects in_channels=4"):
        check(np.zeros((2, 2, 4, 6, 6), np.float32), t, text, mask, pooled, g)
    with pytest.raises(ValueError, match=r"text_mask must be \[B, L\]=\(2, 5\)"):
        check(x, t, text, mask[:1], pooled, g)
    with pytest.raises(ValueError, match=r"timesteps must have shape \[B\]=\(2,\)"):
        check(x, t[:1], text, mask, pooled, g)
    with pytest.raises(ValueError, match=r"pass guidance \[B\]"):
        check(x, t, text, mask, pooled)
    with pytest.raises(ValueError, match=r"guidance_embed=False"):
        HunyuanVideoDiT(tiny_config(guidance_embed=False)).init(jax.random.PRNGKey(0), x, t, text, mask, pooled, g)
    with pytest.raises(ValueError, match=r"channel-last"):
        check(x[0], t, text, mask, pooled, g)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model.rope_axes_dim: .*head dim 16"):
        tiny_config(rope_axes_dim=(4, 4, 4))
    with pytest.raises(ValueError, match=r"model.remat_policy"):
        tiny_config(remat_policy="sometimes")
    with pytest.raises(ValueError, match=r"model.attention_backend"):
        tiny_config(attention_backend="magic")
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['hiden_size'\]"):
        DiTConfig.from_config({"hiden_size": 3})


def test_rope_tables_are_computed_in_the_program_not_baked_in():
    """The tables equal the references' NumPy formula, and the compiled forward holds no large constant (at 720p
    baked-in tables would weigh ~61 MB)."""
    from hyvideo_jax.models.rope import rope_tables
    grid, axes, theta = (3, 4, 6), (4, 6, 6), 256.0
    positions = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid], indexing="ij"), -1)
    angles = np.concatenate([positions.reshape(-1, 3)[:, a:a + 1] * (1.0 / np.float32(theta) ** (
        np.arange(0, d, 2, dtype=np.float32)[: d // 2] / np.float32(d))).astype(np.float32)[None]
        for a, d in enumerate(axes)], axis=-1)
    cos, sin = rope_tables(grid, axes, theta)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-7)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-7)

    cfg = tiny_config()
    model = HunyuanVideoDiT(cfg)
    inputs = example_inputs(cfg, b=1, t=8, h=32, w=32)          # 2,048 image tokens: tables of 16,384 values
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))["params"]
    hlo = jax.jit(lambda p, *a: model.apply({"params": p}, *a)).lower(nn.unbox(params), *inputs).compile().as_text()
    sizes = [int(np.prod([int(d) for d in m.group(1).split(",") if d] or [1]))
             for m in re.finditer(r"(?:f32|s32|bf16)\[([\d,]*)\][^ ]* constant\(", hlo)]
    assert max(sizes) < 1024, sorted(sizes)[-3:]


def test_initializer_compiled_once_draws_the_same_parameters():
    """`init_sharded` compiles the initializer with `run_once_options()` (on CPU optimisation level 0, for compile
    time): the parameters equal, bit for bit, those of the same initializer compiled at XLA's default level 2."""
    from hyvideo_jax.compilation import run_once_options
    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    from hyvideo_jax.parallel.sharding import init_sharded
    assert run_once_options() == {"xla_backend_optimization_level": 0}   # the tests run on CPU
    cfg = tiny_config()
    inputs = [jnp.asarray(a) for a in example_inputs(cfg, b=1)]
    mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), devices=jax.devices()[:1])
    ours = init_sharded(HunyuanVideoDiT(cfg), mesh, jax.random.PRNGKey(3), *inputs)
    level2 = jax.jit(lambda r: nn.unbox(HunyuanVideoDiT(cfg).init(r, *inputs))["params"],
                     compiler_options={"xla_backend_optimization_level": 2})(jax.random.PRNGKey(3))
    leaves = jax.tree_util.tree_leaves_with_path(ours)
    assert len(leaves) > 50 and any(float(jnp.std(x)) > 0 for _, x in leaves)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(level2)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
