"""Tokenized-clip records: exact round trip, and clear errors (naming shard and record) for bad records."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from hyvideo_jax.data import pipeline
from hyvideo_jax.data.schema import MAGIC, ClipSpec, RecordError, TokenizedClip, deserialize, serialize

SPEC = ClipSpec(latent_channels=4, text_len=6, text_dim=5, pooled_dim=3)


def make_clip(seed=0, t=2, h=3, w=2, **overrides):
    rng = np.random.default_rng(seed)
    mask = np.array([1, 1, 1, 0, 0, 0], np.int32)
    fields = dict(latents=rng.standard_normal((t, h, w, 4)).astype(ml_dtypes.bfloat16),
                  text_states=rng.standard_normal((6, 5)).astype(np.float32), text_mask=mask,
                  pooled_text=rng.standard_normal(3).astype(np.float32), caption="a small red circle moving left",
                  source_id=f"clip{seed}.mp4", num_frames=(t - 1) * 4 + 1, fps=8.0, height=h * 8, width=w * 8)
    fields.update(overrides)
    return TokenizedClip(**fields)


def edit_header(data: bytes, edit) -> bytes:
    """Bytes of `data` with its JSON header changed by `edit(header)` (array bytes kept)."""
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start:start + length])
    edit(header)
    new = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(new)) + new + data[start + length:]


def write_shard(path, records):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


def test_round_trip_is_exact():
    clip = make_clip(3, t=3, h=2, w=4)
    back = deserialize(serialize(clip))
    for name in ("latents", "text_states", "text_mask", "pooled_text"):
        got, want = getattr(back, name), getattr(clip, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert (back.caption, back.source_id, back.num_frames, back.fps, back.height, back.width) == \
        ("a small red circle moving left", "clip3.mp4", 9, 8.0, 16, 32)
    assert back.latent_shape == (3, 2, 4)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(schema_version=2), "schema version 2, this reader expects version 1"),
    (lambda h: h["arrays"]["latents"].update(dtype="float32"),
     r"latents of shape \[2, 3, 2, 4\] and dtype float32 needs 192 bytes, the record holds 96"),
    (lambda h: h["arrays"]["text_mask"].update(shape=[5], nbytes=20),
     "text_mask has 5 entries but text_states has 6 tokens"),
])
def test_bad_record_names_shard_and_record(tmp_path, edit, message):
    shard = tmp_path / "clips-00000.array_record"
    write_shard(shard, [serialize(make_clip(0)), edit_header(serialize(make_clip(1)), edit)])
    # Without a manifest the source reads every header when built; the full check runs when a record is read.
    with pytest.raises(RecordError, match=rf"^shard {shard}, record 1: {message}"):
        pipeline.ArrayRecordClipSource([str(shard)])[1]


def test_wrong_dtype_and_inconsistent_shapes_are_errors(tmp_path):
    with pytest.raises(RecordError, match=r"latents dtype must be one of \('bfloat16', 'float16'\), got float32"):
        serialize(make_clip(latents=np.zeros((2, 3, 2, 4), np.float32)))
    with pytest.raises(RecordError, match="text_mask has 4 entries but text_states has 6 tokens"):
        serialize(make_clip(text_mask=np.ones(4, np.int32)))
    with pytest.raises(RecordError, match=r"num_frames 8 does not match 2 latent frames \(expected 5"):
        serialize(make_clip(num_frames=8))
    with pytest.raises(RecordError, match=r"resolution 24x24 does not match latents 3x2 .*expected 24x16"):
        serialize(make_clip(width=24))
    # A float32 latent array written by another tool: the dtype check fires on read, naming shard and record.
    data = serialize(make_clip(0))
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + length])
    latents = np.zeros((2, 3, 2, 4), np.float32)
    header["arrays"]["latents"].update(dtype="float32", nbytes=latents.nbytes)
    rest = data[len(MAGIC) + 4 + length + 2 * latents.size:]
    for name in ("text_states", "text_mask", "pooled_text"):
        header["arrays"][name]["offset"] += latents.nbytes - 2 * latents.size
    new = json.dumps(header).encode()
    bad = MAGIC + struct.pack("<I", len(new)) + new + latents.tobytes() + rest
    shard = tmp_path / "clips-00007.array_record"
    write_shard(shard, [data, data, bad])
    with pytest.raises(RecordError, match=rf"shard {shard}, record 2: latents dtype must be .* got float32"):
        pipeline.ArrayRecordClipSource([str(shard)])[2]


def test_not_a_record_and_spec_mismatch(tmp_path):
    shard = tmp_path / "clips-00000.array_record"
    write_shard(shard, [serialize(make_clip(0)), b"garbage bytes"])
    with pytest.raises(RecordError, match=rf"shard {shard}, record 1: not a tokenized-clip record"):
        pipeline.ArrayRecordClipSource([str(shard)])
    clip = make_clip(0)
    assert SPEC.check(clip) is clip
    with pytest.raises(RecordError, match="shard x, record 4: text_states width is 5, the data config expects 7"):
        ClipSpec(4, 6, 7, 3).check(clip, "shard x, record 4")
