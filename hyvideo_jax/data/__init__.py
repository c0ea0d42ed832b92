"""Tokenized-clip records, Grain input pipelines, video preparation and the synthetic demo dataset.

    from hyvideo_jax.data import make_train_pipeline
    it = make_train_pipeline(config.data, jax.process_index(), jax.process_count(), seed=config.seed)

Modules: schema (the record format), config (`config.data` and its prepare section), video (decoding to bucket
shapes), sources (clip sources, held-out evaluation records), pipeline (batch plan, loaders, Grain datasets),
prepare (videos → ArrayRecord shards, CLI), synthetic (demo videos, CLI).
"""

from hyvideo_jax.data.config import DataConfig
from hyvideo_jax.data.pipeline import BATCH_KEYS, make_dataset, make_train_pipeline, steps_per_epoch
from hyvideo_jax.data.schema import SCHEMA_VERSION, ClipSpec, RecordError, TokenizedClip, deserialize, serialize
from hyvideo_jax.data.sources import ArrayRecordClipSource, RandomClipSource, TfdsClipSource

__all__ = ["BATCH_KEYS", "ArrayRecordClipSource", "DataConfig", "RandomClipSource", "TfdsClipSource", "make_dataset",
           "make_train_pipeline", "steps_per_epoch", "SCHEMA_VERSION", "ClipSpec", "RecordError", "TokenizedClip",
           "deserialize", "serialize"]
