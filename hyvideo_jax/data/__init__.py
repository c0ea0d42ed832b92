"""Tokenized-clip records, Grain input pipelines, video preparation and the synthetic demo dataset.

    from hyvideo_jax.data import make_train_pipeline
    it = make_train_pipeline(config.data, jax.process_index(), jax.process_count(), seed=config.seed)
"""

from hyvideo_jax.data.pipeline import (BATCH_KEYS, ArrayRecordClipSource, DataConfig, RandomClipSource,
                                       TfdsClipSource, make_dataset, make_train_pipeline, steps_per_epoch)
from hyvideo_jax.data.schema import SCHEMA_VERSION, ClipSpec, RecordError, TokenizedClip, deserialize, serialize

__all__ = ["BATCH_KEYS", "ArrayRecordClipSource", "DataConfig", "RandomClipSource", "TfdsClipSource", "make_dataset",
           "make_train_pipeline", "steps_per_epoch", "SCHEMA_VERSION", "ClipSpec", "RecordError", "TokenizedClip",
           "deserialize", "serialize"]
