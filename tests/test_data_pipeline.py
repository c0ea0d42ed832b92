"""Grain pipelines: determinism, disjoint process shards covering the epoch, exact resume, one shape per batch."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from hyvideo_jax.data import pipeline
from hyvideo_jax.data.pipeline import DataConfig, RandomClipSource, make_train_pipeline
from hyvideo_jax.data.schema import serialize

# Three buckets of 7 / 5 / 4 records (none a multiple of the global batch of 4), tiny text shapes.
SHAPES = ((2, 3, 3), (3, 2, 4), (1, 4, 2))
CONFIG = DataConfig(global_batch_size=4, random_records=16, random_latent_shapes=SHAPES, latent_channels=4,
                    text_len=8, text_dim=6, pooled_dim=5, read_threads=1, prefetch_buffer_size=2)


def source(seed=0):
    return RandomClipSource(CONFIG.random_records, SHAPES, CONFIG.spec, seed)


def take(it, n):
    return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y) == sorted(pipeline.BATCH_KEYS)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def steps():
    return pipeline.steps_per_epoch(CONFIG, seed=0)


def test_epoch_length():
    # Buckets of 6, 5 and 5 records (i % 3 cycles the shapes) → 2 + 2 + 2 global batches of 4.
    counts = np.unique(source().latent_shapes(), axis=0, return_counts=True)[1]
    assert sorted(counts.tolist()) == [5, 5, 6]
    assert steps() == 6
    dropping = DataConfig(**{**CONFIG.__dict__, "drop_remainder": True})
    assert pipeline.steps_per_epoch(dropping, seed=0) == 3


def test_same_seed_same_batches_other_seed_other_order():
    a = take(make_train_pipeline(CONFIG, 0, 1, seed=7), 2 * steps())
    b = take(make_train_pipeline(CONFIG, 0, 1, seed=7), 2 * steps())
    assert_batches_equal(a, b)
    c = take(make_train_pipeline(CONFIG, 0, 1, seed=8), steps())
    order_a = np.concatenate([x["record_index"] for x in a[:steps()]])
    order_c = np.concatenate([x["record_index"] for x in c])
    assert not np.array_equal(order_a, order_c)
    # Each epoch is reshuffled: epoch 1 is another order of the same records.
    order_a1 = np.concatenate([x["record_index"] for x in a[steps():]])
    assert not np.array_equal(order_a, order_a1)
    assert sorted(order_a[order_a >= 0]) == sorted(order_a1[order_a1 >= 0]) == list(range(16))


def test_two_processes_disjoint_and_cover_the_epoch():
    shards = []
    for p in range(2):
        batches = take(make_train_pipeline(CONFIG, p, 2, seed=3), steps())
        assert all(b["latents"].shape[0] == 2 for b in batches)  # per-process share of the global batch of 4
        shards.append(batches)
    seen = [np.concatenate([b["record_index"][b["valid"]] for b in batches]) for batches in shards]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == list(range(16))
    assert len(seen[0]) + len(seen[1]) == 16
    # At every step both processes hold the same latent shape, and together they form the 1-process global batch.
    single = take(make_train_pipeline(CONFIG, 0, 1, seed=3), steps())
    for step in range(steps()):
        assert shards[0][step]["latents"].shape == shards[1][step]["latents"].shape
        joined = np.concatenate([shards[0][step]["record_index"], shards[1][step]["record_index"]])
        np.testing.assert_array_equal(joined, single[step]["record_index"])
        np.testing.assert_array_equal(
            np.concatenate([shards[0][step]["latents"], shards[1][step]["latents"]]), single[step]["latents"])


def test_mixed_buckets_one_shape_per_batch_no_record_lost_or_repeated():
    src = source()
    batches = take(make_train_pipeline(CONFIG, 0, 1, seed=1, source=src), steps())
    shapes = [b["latents"].shape[1:4] for b in batches]
    assert sorted(set(shapes)) == sorted(SHAPES)
    seen = []
    for b in batches:
        for slot, index in enumerate(b["record_index"]):
            if index < 0:
                assert not b["valid"][slot]
                assert not b["latents"][slot].any() and not b["text_mask"][slot].any()
                continue
            clip = src[int(index)]
            assert clip.latent_shape == b["latents"].shape[1:4]
            np.testing.assert_array_equal(b["latents"][slot], clip.latents)
            np.testing.assert_array_equal(b["text_states"][slot], clip.text_states)
            np.testing.assert_array_equal(b["text_mask"][slot], clip.text_mask)
            np.testing.assert_array_equal(b["pooled_text"][slot], clip.pooled_text)
            seen.append(int(index))
    assert sorted(seen) == list(range(16))               # every record once
    assert sum((~b["valid"]).sum() for b in batches) == 6 * 4 - 16  # the rest is padding


@pytest.mark.parametrize("stop", [2, 7])  # mid-epoch, and mid-way through the second epoch
def test_resume_from_json_state_continues_exactly(stop):
    reference = take(make_train_pipeline(CONFIG, 1, 2, seed=5), stop + 5)
    it = make_train_pipeline(CONFIG, 1, 2, seed=5)
    take(it, stop)
    state = json.dumps(it.get_state())
    resumed = make_train_pipeline(CONFIG, 1, 2, seed=5)
    resumed.set_state(json.loads(state))
    assert_batches_equal(take(resumed, 5), reference[stop:])


def test_worker_processes_match_threads_and_resume(tmp_path):
    """Two worker processes: the same batches as the threaded pipeline, and an Orbax checkpoint of the iterator
    saved beside a train state restores to the same continuation."""
    import grain
    import orbax.checkpoint as ocp

    config = DataConfig(**{**CONFIG.__dict__, "worker_count": 2})
    reference = take(make_train_pipeline(CONFIG, 0, 1, seed=2), 8)
    it = make_train_pipeline(config, 0, 1, seed=2)
    try:
        assert_batches_equal(take(it, 3), reference[:3])
        manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": np.arange(3, dtype=np.int32)}),
                                                data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    finally:
        it.close()
    restored_it = make_train_pipeline(config, 0, 1, seed=2)
    try:
        restored = manager.restore(3, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"step": np.zeros(3, np.int32)}),
            data=grain.checkpoint.CheckpointRestore(restored_it)))
        np.testing.assert_array_equal(restored.state["step"], [0, 1, 2])
        assert_batches_equal(take(restored.data, 5), reference[3:])
    finally:
        restored_it.close()


def test_arrayrecord_source_reads_the_same_batches_as_in_memory(tmp_path):
    src = source()
    paths = []
    for shard, indices in enumerate((range(0, 9), range(9, 16))):
        path = str(tmp_path / f"clips-{shard:05d}.array_record")
        writer = ArrayRecordWriter(path, "group_size:1")
        for i in indices:
            writer.write(serialize(src[i]))
        writer.close()
        paths.append(path)
    config = DataConfig(**{**CONFIG.__dict__, "source": "arrayrecord", "path": ",".join(paths)})
    assert pipeline.ArrayRecordClipSource(paths).where(11) == f"shard {paths[1]}, record 2"
    assert_batches_equal(take(make_train_pipeline(config, 0, 1, seed=4), steps()),
                         take(make_train_pipeline(CONFIG, 0, 1, seed=4, source=src), steps()))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.source: must be one of"):
        DataConfig(source="parquet")
    with pytest.raises(ValueError, match="data.path: is empty"):
        DataConfig(source="arrayrecord")
    with pytest.raises(ValueError, match="data.latent_dtype: must be one of"):
        DataConfig(latent_dtype="float32")
    with pytest.raises(ValueError, match=r"unknown data config field\(s\) \['batch'\]"):
        DataConfig.from_config({"batch": 3})
    with pytest.raises(ValueError, match="global_batch_size 4 is not divisible by the 3 processes"):
        make_train_pipeline(CONFIG, 0, 3)
