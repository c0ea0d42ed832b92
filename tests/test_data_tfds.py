"""A TFDS dataset of tokenized clips (ArrayRecord file format) read through tfds.data_source into the pipeline."""

import dataclasses

import numpy as np
import pytest

from hyvideo_jax.data import pipeline
from hyvideo_jax.data.pipeline import DataConfig, RandomClipSource, TfdsClipSource, make_train_pipeline
from hyvideo_jax.data.schema import SCHEMA_VERSION, RecordError

CONFIG = DataConfig(source="tfds", tfds_name="tokenized_clips", global_batch_size=2, latent_channels=4, text_len=8,
                    text_dim=6, pooled_dim=5, latent_dtype="float16", text_dtype="float32", read_threads=1)


def build(data_dir, name, clips, version=SCHEMA_VERSION):
    import tensorflow_datasets as tfds

    def example(c):
        fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)   # optional arrays it does not hold
                  if f.name not in ("temporal_compression", "spatial_compression") and getattr(c, f.name) is not None}
        return {**fields, "schema_version": version}
    tfds.dataset_builders.store_as_tfds_dataset(
        name, "1.0.0", pipeline.tfds_features(CONFIG.spec, "float16", "float32"),
        {"train": [(c.source_id, example(c)) for c in clips]}, data_dir=data_dir, file_format="array_record")


def test_tfds_source_feeds_the_pipeline(tmp_path):
    src = RandomClipSource(5, [(2, 3, 3), (1, 2, 4)], CONFIG.spec, seed=1, latent_dtype="float16",
                           text_dtype="float32")
    clips = [src[i] for i in range(5)]
    build(str(tmp_path), "tokenized_clips", clips)
    source = TfdsClipSource("tokenized_clips", "train", str(tmp_path))
    assert len(source) == 5
    by_id = {c.source_id: c for c in clips}
    config = dataclasses.replace(CONFIG, tfds_data_dir=str(tmp_path))
    it = make_train_pipeline(config, 0, 1, seed=0)
    seen = []
    for _ in range(pipeline.steps_per_epoch(config)):
        batch = next(it)
        for slot in np.flatnonzero(batch["valid"]):
            original = by_id[source[int(batch["record_index"][slot])].source_id]
            np.testing.assert_array_equal(batch["latents"][slot], original.latents)
            np.testing.assert_array_equal(batch["text_states"][slot], original.text_states)
            np.testing.assert_array_equal(batch["text_mask"][slot], original.text_mask)
            seen.append(original.source_id)
    assert sorted(seen) == sorted(by_id)


def test_tfds_wrong_schema_version_names_the_record(tmp_path):
    src = RandomClipSource(2, [(1, 2, 2)], CONFIG.spec, latent_dtype="float16", text_dtype="float32")
    build(str(tmp_path), "old_clips", [src[0], src[1]], version=0)
    with pytest.raises(RecordError, match=r"tfds old_clips split train, record \d: schema version 0, this reader "
                                          r"expects version 1"):
        TfdsClipSource("old_clips", "train", str(tmp_path))
