"""Paths under gs:// work wherever local ones do, against a local stand-in: etils.epath's mock backend with gs://
mapped to a temporary folder (and epath's TensorFlow backend turned off, which would bypass the mock).

Three libraries open files themselves and cannot be redirected by the mock, so the stand-in cannot carry a whole
training run: TensorStore (Orbax's array storage: `ocp.CheckpointManager.save` / `StandardCheckpointer` write
arrays through TensorStore's own GCS driver), `tf.io.gfile` (CLU's TensorBoard `SummaryWriter`) and the ArrayRecord
C++ reader and writer (`ArrayRecordReader` / `ArrayRecordWriter`). All three speak gs:// natively. Everything else a
run reads or writes with a user's path goes through epath and is exercised here: metrics.jsonl (resumed), the run's
config.json, converted-folder and workdir detection, PyTorch weights (copied to the local cache), LoRA files, the
prepared clips' manifest and empty-prompt encoding, caption files, video folders (listed, probed and decoded
through a file object), the video index, mp4 and PNG outputs, and exported LoRA files and safetensors folders (written
locally, then copied up).
"""

import json
import os
import shutil
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import gpath, testing

from hyvideo_jax.data import pipeline, prepare, synthetic
from hyvideo_jax.data.config import PrepareConfig
from hyvideo_jax.data.sources import VideoFileSource, write_json


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket/... ↦ tmp_path/gs/bucket/... for every epath call; local copies cached under tmp_path/cache."""
    root = tmp_path / "gs"
    (root / "bucket").mkdir(parents=True)
    local = lambda p: str(root / os.fspath(p)[5:]) if os.fspath(p).startswith("gs://") else os.fspath(p)  # noqa
    one = lambda fn, path, *a, **k: fn(local(path), *a, **k)  # noqa: E731
    two = lambda fn, path, dst, *a, **k: fn(local(path), local(dst), *a, **k)  # noqa: E731
    monkeypatch.setenv("HYVIDEO_JAX_CACHE", str(tmp_path / "cache"))
    with testing.mock_epath(exists=one, glob=one, isdir=one, listdir=one, makedirs=one, mkdir=one, open=one,
                            remove=one, rmtree=one, stat=one, walk=one, copy=two, rename=two, replace=two), \
            mock.patch.object(gpath, "_is_tf_installed", lambda: False):
        yield root / "bucket"


def test_run_files_on_gs(bucket):
    from hyvideo_jax.convert.flax_io import is_flax_model, is_training_workdir, read_flax_config, training_config
    from hyvideo_jax.metrics import JsonlWriter, read_metrics
    first = JsonlWriter("gs://bucket/run/metrics.jsonl")
    first.write_scalars(1, {"loss": 2.0})
    first.write_scalars(2, {"loss": 1.5})
    resumed = JsonlWriter("gs://bucket/run/metrics.jsonl")   # a restart appends after what is there
    resumed.write_scalars(2, {"loss": 1.25, "eval/loss": 1.0})
    assert read_metrics("gs://bucket/run") == {1: {"loss": 2.0}, 2: {"loss": 1.25, "eval/loss": 1.0}}
    assert len((bucket / "run" / "metrics.jsonl").read_text().splitlines()) == 3

    epath.Path("gs://bucket/run/config.json").write_text(json.dumps({"model": {"depth_double": 1}}))
    (bucket / "run" / "checkpoints").mkdir()
    assert training_config("gs://bucket/run")["model"] == {"depth_double": 1}
    assert is_training_workdir("gs://bucket/run") and not is_training_workdir("gs://bucket/nothing")
    (bucket / "dit" / "params").mkdir(parents=True)
    (bucket / "dit" / "config.json").write_text(json.dumps({"kind": "dit", "model": {"hidden_size": 8}}))
    assert is_flax_model("gs://bucket/dit") and read_flax_config("gs://bucket/dit", "dit") == {"hidden_size": 8}
    write_json("gs://bucket/run/index.json", {"a": 1})
    assert json.loads((bucket / "run" / "index.json").read_text()) == {"a": 1}
    assert not os.path.exists("gs:")   # nothing went to a local folder named after the URL


def test_weights_and_loras_on_gs(bucket, tmp_path):
    from safetensors.numpy import save_file

    from hyvideo_jax.convert.lora import load_lora
    from hyvideo_jax.convert.torch_io import TensorSource
    from tests.test_dit_model import tiny_config
    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(4, np.float32)}
    (bucket / "diffusers").mkdir()
    save_file(tensors, str(bucket / "diffusers" / "diffusion_pytorch_model.safetensors"))
    (bucket / "diffusers" / "config.json").write_text(json.dumps({"num_layers": 1}))
    folder = TensorSource.open("gs://bucket/diffusers")
    assert folder.config == {"num_layers": 1} and sorted(folder) == ["a.weight", "b.bias"]
    np.testing.assert_array_equal(folder["a.weight"], tensors["a.weight"])
    single = TensorSource.open("gs://bucket/diffusers/diffusion_pytorch_model.safetensors")
    np.testing.assert_array_equal(single["b.bias"], tensors["b.bias"])
    assert len(os.listdir(tmp_path / "cache")) == 1   # one cached copy of the one file, reused

    cfg = tiny_config()
    rank, hidden = 2, cfg.hidden_size
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.full((rank, hidden), 0.1, np.float32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.full((hidden, rank), 0.2, np.float32)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    shutil.copy(tmp_path / "lora.safetensors", bucket / "lora.safetensors")
    here, there = load_lora(str(tmp_path / "lora.safetensors"), cfg), load_lora("gs://bucket/lora.safetensors", cfg)
    for a, b in zip(jax_leaves(here[0]), jax_leaves(there[0])):
        np.testing.assert_array_equal(a, b)

    # Writers of local files only (safetensors, torch.save) write through a local folder copied up.
    from hyvideo_jax.convert.lora import save_diffusers_lora
    from hyvideo_jax.convert.torch_io import write_safetensors_folder
    assert save_diffusers_lora(cfg, here[0], here[1], "gs://bucket/out/lora.safetensors").startswith("gs://")
    again = load_lora(str(bucket / "out" / "lora.safetensors"), cfg)
    for a, b in zip(jax_leaves(here[0]), jax_leaves(again[0])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    write_safetensors_folder(iter(tensors.items()), "gs://bucket/out/folder", config={"num_layers": 1})
    assert sorted(os.listdir(bucket / "out" / "folder")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    np.testing.assert_array_equal(TensorSource.open(str(bucket / "out" / "folder"))["a.weight"], tensors["a.weight"])


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_data_on_gs(bucket, tmp_path):
    from configs import tiny
    config = tiny.get_config()
    captions = synthetic.write_dataset("gs://bucket/videos", dict(num_videos=3, sizes=((32, 32),), frames=(6,)))
    assert captions == "gs://bucket/videos/captions.jsonl" and len(os.listdir(bucket / "videos")) == 4
    assert len(prepare.read_captions(captions)) == 3
    prep = PrepareConfig.from_config(config.data.prepare)
    there = VideoFileSource("gs://bucket/videos", prep, progress=False, index="gs://bucket/run/video_index.json")
    shutil.copytree(bucket / "videos", tmp_path / "videos")
    here = VideoFileSource(str(tmp_path / "videos"), prep, progress=False)
    assert there.names == here.names and there.video_shapes().tolist() == here.video_shapes().tolist()
    np.testing.assert_array_equal(there[1], here[1])   # decoded through a file object
    assert set(json.loads((bucket / "run" / "video_index.json").read_text())["videos"]) == set(here.names)

    # A prepared folder's manifest and empty prompt, read from the bucket (the shards themselves: ArrayRecord).
    (bucket / "clips").mkdir()
    write_json("gs://bucket/clips/manifest.json", {"shards": [{"path": "clips-00000.array_record", "records": 2}]})
    assert pipeline.read_manifest("gs://bucket/clips")["shards"][0]["records"] == 2
    np.savez(bucket / "clips" / "null_text.npz", text_states=np.ones((2, 3)), text_mask=np.ones(2),
             pooled_text=np.zeros(3))
    assert pipeline.read_null_text("gs://bucket/clips")["text_states"].shape == (2, 3)

    from hyvideo_jax.evaluate import contact_sheet, write_png
    frames = np.round((here[0][:4] + 1.0) * 127.5).astype(np.uint8)   # the source gives [-1, 1]
    sheet = contact_sheet(np.stack([frames] * 2), 2)
    write_png("gs://bucket/run/eval/step_1/contact_sheet.png", sheet)
    import mediapy
    np.testing.assert_array_equal(mediapy.read_image(bucket / "run" / "eval" / "step_1" / "contact_sheet.png"),
                                  sheet)
