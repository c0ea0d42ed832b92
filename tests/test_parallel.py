"""Sharded DiT on 8 simulated CPU devices equals the single-device result; parameters really are sharded;
Ulysses and ring sequence parallelism match unsharded attention."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hyvideo_jax.models.attention import xla_attention
from hyvideo_jax.models.dit import HunyuanVideoDiT
from hyvideo_jax.parallel import sequence
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
from hyvideo_jax.parallel.sequence import joint_attention
from hyvideo_jax.parallel.sharding import abstract_params, init_sharded, param_shardings, place_params
from tests.test_dit_model import example_inputs, random_init, tiny_config

MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 8, 1), (1, 2, 2, 2)]


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config(depth_double=1, depth_single=1, depth_refiner=1)
    inputs = example_inputs(cfg, t=2, h=8, w=8)  # 32 image tokens: divisible by every sequence-axis size here
    params = jax.tree_util.tree_map(np.asarray, random_init(cfg, inputs))
    model = HunyuanVideoDiT(cfg)

    def loss(p, *a):
        out = model.apply({"params": p}, *a)
        return jnp.mean(out ** 2), out
    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params, *inputs)
    return cfg, inputs, params, np.asarray(out), grads


def per_device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_forward_and_gradients_equal_single_device(reference, shape):
    cfg, inputs, params, ref_out, ref_grads = reference
    mesh = create_mesh(MeshConfig(ici=shape))
    model = HunyuanVideoDiT(cfg)
    boxed = abstract_params(model, *inputs)
    shardings = param_shardings(boxed, mesh)
    sharded = place_params(params, shardings)
    def loss(p, *a):
        out = model.apply({"params": p}, *a)
        return jnp.mean(out ** 2), out
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):  # one program: output and gradients
        grads, out = jax.jit(jax.grad(loss, has_aux=True), out_shardings=(shardings, None))(sharded, *inputs)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5 * np.abs(ref_out).max())
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 + 1e-4 * float(jnp.abs(r).max()),
                                   err_msg=jax.tree_util.keystr(path))
    # the parameters really are sharded as the rules say
    fc1 = sharded["double_blocks"]["img_mlp"]["fc1"]["kernel"]  # [layers, embed, mlp]
    assert fc1.sharding.spec == P(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (1, 64 // shape[1], 256 // shape[3])


def test_fsdp_shrinks_per_device_bytes(reference):
    cfg, inputs, params, _, _ = reference
    model = HunyuanVideoDiT(cfg)
    full = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))
    sizes = {}
    for fsdp in (1, 2, 8):
        mesh = create_mesh(MeshConfig(ici=(8 // fsdp, fsdp, 1, 1)))
        sizes[fsdp] = per_device_bytes(init_sharded(model, mesh, jax.random.PRNGKey(0), *inputs))
    print(f"per-device parameter bytes: total {full:,}; fsdp 1 → {sizes[1]:,}, 2 → {sizes[2]:,}, 8 → {sizes[8]:,}")
    assert sizes[1] == full and sizes[2] < 0.6 * full and sizes[8] < 0.2 * full


@pytest.mark.parametrize("method", ["ulysses", "ring"])
@pytest.mark.parametrize("seq", [2, 4, 8])
def test_sequence_parallel_attention_matches_unsharded(method, seq):
    check_sequence_parallel_attention(method, seq)


def test_ring_attention_in_many_tiles_matches_unsharded(monkeypatch):
    """Tiles of 5 queries × 5 keys: per device 16 image + 7 text queries in 5 query blocks (the last one padded),
    image K/V blocks of 16 keys in 4 tiles, the text's 7 keys in 2."""
    monkeypatch.setattr(sequence, "RING_BLOCK", 5)
    check_sequence_parallel_attention("ring", 4)


def check_sequence_parallel_attention(method, seq):
    """Forward (valid rows) and gradients of q, k, v of `joint_attention` over a sequence axis of size seq equal
    unsharded attention."""
    heads = 8 if method == "ulysses" else 6  # 6 heads do not divide over 4 or 8 devices: the ring still works
    b, n_img, n_txt, d = 2, 64, 7, 16
    keys = jax.random.split(jax.random.PRNGKey(seq), 4)
    q, k, v, dout = [jax.random.normal(x, (b, n_img + n_txt, heads, d)) for x in keys]
    text_valid = np.array([[1] * 5 + [0] * 2, [1] + [0] * 6])
    seg = jnp.asarray(np.concatenate([np.ones((b, n_img), np.int32), np.where(text_valid, 1, 2)], 1))
    ref = xla_attention(q, k, v, seg, seg)
    ref_grads = jax.vjp(lambda *x: xla_attention(*x, seg, seg), q, k, v)[1](dout)
    mesh = create_mesh(MeshConfig(ici=(8 // seq, 1, seq, 1)))
    fn = lambda *x: joint_attention(*x, seg, n_img, method=method)
    with jax.set_mesh(mesh):
        out = jax.jit(fn)(q, k, v)
        grads = jax.jit(lambda *x: jax.vjp(fn, *x)[1](dout))(q, k, v)
    valid = np.asarray(seg == 1)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5)


def ring_temp_bytes(n_img, seq=8, n_txt=16, heads=2, head_dim=64):
    """Per-device temporary bytes of ring attention forward+backward over a sequence axis of size seq, compiled
    only."""
    x = jax.ShapeDtypeStruct((1, n_img + n_txt, heads, head_dim), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, n_img + n_txt), jnp.int32)
    loss = lambda q, k, v, s: jnp.sum(joint_attention(q, k, v, s, n_img, method="ring"))
    with jax.set_mesh(create_mesh(MeshConfig(ici=(8 // seq, 1, seq, 1)))):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_ring_attention_memory_grows_linearly():
    """Ring forward+backward temporaries per device grow at most ~linearly with tokens (blockwise, own VJP);
    storing every ring step's probability tiles grows them ~4× per doubling (quadratic)."""
    tokens = (4096, 8192, 16384)
    temp = [ring_temp_bytes(n) for n in tokens]
    print("ring temp bytes per device, 8 devices: " + ", ".join(f"{n:,} tokens {t:,}" for n, t in zip(tokens, temp)))
    assert temp[1] / temp[0] < 2.3 and temp[2] / temp[1] < 2.3


def test_ulysses_rejects_indivisible_heads():
    q = jnp.zeros((1, 16 + 4, 6, 8))
    seg = jnp.ones((1, 20), jnp.int32)
    with jax.set_mesh(create_mesh(MeshConfig(ici=(2, 1, 4, 1)))):
        with pytest.raises(ValueError, match="Ulysses needs the 6 heads per device divisible by .* 4"):
            joint_attention(q, q, q, seg, 16, method="ulysses")


def test_attention_placement_follows_the_rules_and_warns_when_work_would_repeat():
    """joint_attention reads its mesh axes from the logical-axis rules in effect, and says when a batch or head
    count does not divide (the attention would be repeated on those devices), instead of silently replicating."""
    import re
    import warnings

    import flax.linen as nn

    from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
    q = jax.random.normal(jax.random.PRNGKey(0), (4, 16 + 4, 4, 8))
    seg = jnp.ones((4, 20), jnp.int32)
    mesh = create_mesh(MeshConfig(ici=(1, 4, 2, 1)))

    def compiled(rules, x):
        fn = lambda x: joint_attention(x, x, x, seg[:x.shape[0]], 16, method="ulysses")   # noqa: E731 (new trace)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hlo = jax.jit(fn).lower(x).compile().as_text()
        return len(re.findall(r" all-to-all\(", hlo)), [str(w.message) for w in caught]
    to_all, caught = compiled(LOGICAL_AXIS_RULES, q)
    assert to_all > 0 and caught == []
    # The rules no longer map the token axis to 'sequence': plain attention, no all-to-all.
    no_seq = tuple((name, None if name == "seq" else target) for name, target in LOGICAL_AXIS_RULES)
    assert compiled(no_seq, q) == (0, [])
    # A batch of 2 over fsdp 4: said, with what to change.
    _, caught = compiled(LOGICAL_AXIS_RULES, q[:2])
    assert caught == ["sequence-parallel attention: a batch of 2 does not divide over the mesh axes ('fsdp',) of "
                      "size 4: each of those 4 devices computes all of it (4× the work). Make the batch a multiple "
                      "of it, or move those devices to the sequence axis."]


def test_mesh_config_errors():
    with pytest.raises(ValueError, match=r"mesh.ici \(3, -1, 1, 1\): 8 devices per slice do not divide by 3"):
        create_mesh(MeshConfig(ici=(3, -1, 1, 1)))
    with pytest.raises(ValueError, match=r"mesh.ici: needs one size per axis"):
        MeshConfig(ici=(2, 4))
    assert create_mesh(MeshConfig(ici=(1, -1, 2, 1))).shape == {"data": 1, "fsdp": 4, "sequence": 2, "tensor": 1}
    hybrid = create_mesh(MeshConfig(ici=(1, 2, 2, 1), dcn=(2, 1, 1, 1)))
    assert hybrid.shape == {"data": 2, "fsdp": 2, "sequence": 2, "tensor": 1}


def test_vae_sharded_over_batch_and_rows_equals_single_device():
    """The VAE's convolutions shard over batch ('data') and image rows ('height' → 'sequence')."""
    from hyvideo_jax.models.vae import HunyuanVideoVAE, VAEConfig, init_params
    from tests.test_vae import TINY
    cfg = VAEConfig(**TINY, attention_block_size=16)
    model = HunyuanVideoVAE(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    video = jax.random.uniform(jax.random.PRNGKey(1), (2, 5, 32, 16, 3), minval=-1, maxval=1)
    ref = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, video)[0]
    mesh = create_mesh(MeshConfig(ici=(2, 1, 4, 1)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, video).compile()
        recon, hlo = compiled(params, video)[0], compiled.as_text()
    np.testing.assert_allclose(np.asarray(recon), np.asarray(ref), atol=1e-4 * float(jnp.abs(ref).max()))
    assert "collective-permute" in hlo or "all-to-all" in hlo or "all-gather" in hlo  # rows really are split


def test_single_stream_block_needs_only_the_collectives_of_sequence_parallelism():
    """A single-stream block under a sequence axis of 4 (Ulysses) compiles to exactly what sequence parallelism
    needs: per attention 3 all-to-alls in (q, k, v) and 1 back, and 1 all-gather of the text rows' heads; no
    reshard of q, k, v or of the joint sequence (no collective-permute). Counted as the difference between a
    model with two single blocks and one with none: the scanned blocks' body appears once in the program (a scan of
    one is unrolled, and the last block's unused text rows would be pruned)."""
    import collections
    import re
    ops = ("all-to-all", "all-gather", "collective-permute", "reduce-scatter")
    mesh = create_mesh(MeshConfig(ici=(2, 1, 4, 1)))

    def count(depth_single, grad):
        cfg = tiny_config(depth_double=0, depth_single=depth_single, depth_refiner=1, remat_policy="full")
        inputs = example_inputs(cfg, t=2, h=8, w=8)
        model = HunyuanVideoDiT(cfg)
        shardings = param_shardings(abstract_params(model, *inputs), mesh)
        params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                        nn.unbox(abstract_params(model, *inputs)), shardings)
        loss = lambda p, *a: jnp.mean(model.apply({"params": p}, *a) ** 2)  # noqa: E731
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            hlo = jax.jit(jax.grad(loss) if grad else loss).lower(params, *inputs).compile().as_text()
        return collections.Counter({op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in ops})

    added = {grad: count(2, grad) - count(0, grad) for grad in (False, True)}
    print(f"collectives of one single-stream block: forward {dict(added[False])}, "
          f"forward+backward (full remat) {dict(added[True])}")
    assert added[False] == collections.Counter({"all-to-all": 4, "all-gather": 1})
    # forward, its recompute and the backward's transposes: 3 × 4 all-to-alls; the text rows' gather is
    # recomputed and transposes to a reduce-scatter. Still no permute of q, k, v.
    assert added[True]["all-to-all"] == 12 and added[True]["collective-permute"] == 0
    assert added[True]["all-gather"] == 2 and added[True]["reduce-scatter"] == 1
