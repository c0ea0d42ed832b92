"""Grain input pipelines of tokenized clips: seeded global shuffle, sharding by JAX process, bucketing by latent
shape, batching to the process's share of the global batch, prefetch in threads or worker processes.

    it = make_train_pipeline(config.data, jax.process_index(), jax.process_count(), seed=config.seed)
    batch = next(it)                  # dict of numpy arrays, keys BATCH_KEYS
    state = it.get_state()            # JSON-friendly; it.set_state(state) resumes at exactly this batch

Batches (B = global_batch_size / process_count, one latent shape per batch):

    latents       [B, T, H, W, C]  config.latent_dtype     scaled VAE latents
    text_states   [B, L, D]        config.text_dtype
    text_mask     [B, L]           int32 (1 = token)
    pooled_text   [B, Dp]          config.text_dtype
    image_latent  [B, 1, H, W, C]  config.latent_dtype     only with `with_image_latent`: the first frame's own latent
    valid         [B]              bool: False for padding slots (zeros) that fill the last batch of a bucket
    record_index  [B]              int64: the record's index in the source, -1 for padding

How an epoch is cut into batches (the "batch plan", identical on every process since it depends only on the
seed, the epoch and the records' latent shapes): the records of each latent shape (bucket) are shuffled and cut into
global batches; the last global batch of a bucket is completed with padding slots (`valid` False) unless
`drop_remainder`; then the order of all global batches is shuffled. Process p takes slots [p·B, (p+1)·B) of each
global batch, so every process runs the same shape at the same step (the jitted step stays in lockstep across
hosts), the processes' records are disjoint and together they are the epoch, each record exactly once.

The Grain dataset is a `MapDataset` over step numbers (epoch e, step s ↦ this process's slots of the plan), mapped to
loaded batches; its iterator state is the next step number, so a restored iterator yields exactly the batches an
uninterrupted one would, with or without worker processes. Save it with the train state through Orbax
(`grain.checkpoint.CheckpointSave(iterator)` in an `ocp.args.Composite`) or as JSON (`get_state` / `set_state`).

The records come from a clip source (`hyvideo_jax.data.sources`: random, ArrayRecord shards written by
`hyvideo_jax.data.prepare`, TFDS); the sources and `DataConfig` are re-exported here. For training the VAE,
`VideoFileSource` (`source="videos"`) reads a folder of video files instead, decoded as prepare decodes them
(`config.data.prepare`'s fps and buckets); the same plan buckets them by pixel shape and batches are
`video` [B, T, H, W, 3] float32 in [-1, 1] with `valid` and `record_index` (VIDEO_BATCH_KEYS).
"""

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from hyvideo_jax.data.config import SOURCES, DataConfig, PrepareConfig
from hyvideo_jax.data.schema import RecordError, numpy_dtype
from hyvideo_jax.data.sources import (MANIFEST, NULL_TEXT, ArrayRecordClipSource, RandomClipSource, SubsetSource,
                                      TfdsClipSource, VideoFileSource, clip_from_features, eval_source, held_out,
                                      make_source, read_manifest, read_null_text, tfds_features, training_source)

__all__ = [
    "BATCH_KEYS", "VIDEO_BATCH_KEYS", "epoch_plan", "ProcessBatchPlan", "batch_layout", "bucket_shapes", "LoadBatch",
    "LoadVideoBatch", "make_dataset", "make_train_pipeline", "steps_per_epoch",
    # re-exported from hyvideo_jax.data.config and hyvideo_jax.data.sources
    "SOURCES", "DataConfig", "MANIFEST", "NULL_TEXT", "ArrayRecordClipSource", "RandomClipSource", "SubsetSource",
    "TfdsClipSource", "VideoFileSource", "clip_from_features", "eval_source", "held_out", "make_source",
    "read_manifest", "read_null_text", "tfds_features", "training_source"]

BATCH_KEYS = ("latents", "text_states", "text_mask", "pooled_text", "valid", "record_index")
VIDEO_BATCH_KEYS = ("video", "valid", "record_index")
_FOREVER_EPOCHS = 1 << 30  # num_epochs=0: a MapDataset this many epochs long is iterated lazily, never exhausted


# ---------------------------------------------------------------------------------------------------- batch plan
def epoch_plan(latent_shapes: np.ndarray, global_batch_size: int, seed: int, epoch: int, shuffle: bool = True,
               drop_remainder: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(batch_shapes [S, 3], batch_records [S, global_batch_size]) of one epoch; -1 marks a padding slot.

    Depends only on its arguments, so every process computes the same plan. The number of steps S is the same for
    every epoch (it depends on the bucket sizes only).
    """
    latent_shapes = np.asarray(latent_shapes, np.int64).reshape(-1, 3)
    rng = np.random.default_rng([int(seed), int(epoch)])
    buckets, bucket_of = np.unique(latent_shapes, axis=0, return_inverse=True)
    shapes, rows = [], []
    for b, shape in enumerate(buckets):
        records = np.flatnonzero(bucket_of.reshape(-1) == b)
        if shuffle:
            records = rng.permutation(records)
        full = len(records) // global_batch_size * global_batch_size
        if not drop_remainder and full < len(records):
            pad = np.full(global_batch_size - (len(records) - full), -1, np.int64)
            records, full = np.concatenate([records, pad]), len(records) + len(pad)
        for start in range(0, full, global_batch_size):
            rows.append(records[start:start + global_batch_size])
            shapes.append(shape)
    if not rows:
        raise ValueError(f"no batch of {global_batch_size} clips can be formed: bucket sizes are "
                         f"{np.bincount(bucket_of.reshape(-1)).tolist()} and data.drop_remainder is set")
    order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
    return np.asarray(shapes, np.int64)[order], np.asarray(rows, np.int64)[order]


class ProcessBatchPlan:
    """step ↦ (latent shape [3], this process's record indices) of the epoch plans (picklable for workers).

    `slots`: the positions of the global batch this process reads (`parallel.sharding.process_rows` of the batch
    sharding: processes that hold the same rows read the same records); default, the process's contiguous block of
    global_batch_size / process_count."""

    def __init__(self, latent_shapes: np.ndarray, global_batch_size: int, process_index: int, process_count: int,
                 seed: int, shuffle: bool, drop_remainder: bool, slots: Sequence[int] | None = None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        if slots is None:
            if global_batch_size % process_count:
                raise ValueError(f"data.global_batch_size {global_batch_size} is not divisible by the "
                                 f"{process_count} processes")
            local = global_batch_size // process_count
            slots = np.arange(process_index * local, (process_index + 1) * local)
        self.slots = np.asarray(slots, np.int64)
        if not len(self.slots) or self.slots.min() < 0 or self.slots.max() >= global_batch_size:
            raise ValueError(f"batch slots {self.slots.tolist()} must be non-empty positions in a global batch of "
                             f"{global_batch_size}")
        self.latent_shapes = np.asarray(latent_shapes, np.int64).reshape(-1, 3)
        self.global_batch_size, self.seed = global_batch_size, seed
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        self.steps_per_epoch = len(self._plan(0)[0])
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _plan(self, epoch: int):
        return epoch_plan(self.latent_shapes, self.global_batch_size, self.seed, epoch, self.shuffle,
                          self.drop_remainder)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: self._plan(epoch)}  # steps arrive in order (per worker): keep one epoch
        shapes, rows = self._cache[epoch]
        return shapes[i], rows[i, self.slots]


def batch_layout(config: DataConfig, shape: Sequence[int], rows: int, videos: bool = False
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of a batch of `rows` clips of latent shape `shape` (or, `videos`, of decoded videos of
    shape [T, H, W]) as the loaders build it: what the training step is compiled for."""
    if videos:
        return dict(video=((rows, *shape, 3), np.dtype(np.float32)), valid=((rows,), np.dtype(bool)),
                    record_index=((rows,), np.dtype(np.int64)))
    s = config.spec
    latent, text = numpy_dtype(config.latent_dtype), numpy_dtype(config.text_dtype)
    layout = dict(latents=((rows, *shape, s.latent_channels), latent),
                  text_states=((rows, s.text_len, s.text_dim), text),
                  text_mask=((rows, s.text_len), np.dtype(np.int32)), pooled_text=((rows, s.pooled_dim), text),
                  valid=((rows,), np.dtype(bool)), record_index=((rows,), np.dtype(np.int64)))
    if s.image_latent:
        layout["image_latent"] = ((rows, 1, *shape[1:], s.latent_channels), latent)
    return layout


def bucket_shapes(source) -> list[tuple[int, ...]]:
    """The distinct latent (or video) shapes of a source's records, ascending: one batch shape each."""
    shapes = source.video_shapes() if isinstance(source, VideoFileSource) else source.latent_shapes()
    return [tuple(int(x) for x in row) for row in np.unique(np.asarray(shapes, np.int64).reshape(-1, 3), axis=0)]


class LoadBatch(grain.transforms.Map):
    """(latent shape, record indices) ↦ the batch dict of the module docstring; padding slots are zeros."""

    def __init__(self, source, config: DataConfig):
        self.source, self.config, self.spec = source, config, config.spec

    def map(self, element: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        shape, indices = element
        batch = {k: np.zeros(*layout) for k, layout in batch_layout(self.config, shape, len(indices)).items()}
        batch["valid"][:] = indices >= 0
        batch["record_index"][:] = indices
        for slot, index in enumerate(indices):
            if index < 0:
                continue
            where = self.source.where(int(index))
            clip = self.spec.check(self.source[int(index)], where)
            if clip.latent_shape != tuple(shape):
                raise RecordError(f"{where}: latent shape {clip.latent_shape} differs from the {tuple(shape)} the "
                                  "source listed for it (stale manifest?)")
            batch["latents"][slot] = clip.latents
            batch["text_states"][slot] = clip.text_states
            batch["text_mask"][slot] = clip.text_mask
            batch["pooled_text"][slot] = clip.pooled_text
            if "image_latent" in batch:
                batch["image_latent"][slot] = clip.image_latent
        return batch


class LoadVideoBatch(grain.transforms.Map):
    """(video shape, record indices) ↦ {video [B, T, H, W, 3] float32 in [-1, 1], valid, record_index}; padding
    slots are zeros."""

    def __init__(self, source: VideoFileSource):
        self.source = source

    def map(self, element: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        shape, indices = element
        batch = {k: np.zeros(*layout) for k, layout in batch_layout(None, shape, len(indices), videos=True).items()}
        batch["valid"][:] = indices >= 0
        batch["record_index"][:] = indices
        for slot, index in enumerate(indices):
            if index < 0:
                continue
            video = self.source[int(index)]
            if video.shape[:3] != tuple(shape):
                raise RecordError(f"{self.source.where(int(index))}: decodes to {video.shape[:3]}, not the "
                                  f"{tuple(shape)} it had when the source was built (file changed?)")
            batch["video"][slot] = video
        return batch


def _prepare_section(config):
    """config.data's prepare section as a PrepareConfig, or None (a bare DataConfig has none)."""
    if isinstance(config, DataConfig):
        return None
    section = config.get("prepare") if hasattr(config, "get") else None
    if section is None:
        return None
    return PrepareConfig.from_config(section)


# ------------------------------------------------------------------------------------------------------ pipeline
def make_dataset(config: "DataConfig | Mapping[str, Any]", process_index: int, process_count: int, seed: int = 0,
                 source=None, slots: Sequence[int] | None = None) -> grain.IterDataset:
    """The Grain IterDataset of this process's batches (see the module docstring); `source` overrides config's;
    `slots` are the global batch positions this process reads (ProcessBatchPlan)."""
    prepare = _prepare_section(config)
    config = DataConfig.from_config(config)
    source = training_source(config, seed, prepare, process_index, source)
    if isinstance(source, VideoFileSource):
        shapes, load = source.video_shapes(), LoadVideoBatch(source)
    else:
        shapes, load = source.latent_shapes(), LoadBatch(source, config)
    plan = ProcessBatchPlan(shapes, config.global_batch_size, process_index, process_count, seed,
                            config.shuffle, config.drop_remainder, slots)
    epochs = config.num_epochs or _FOREVER_EPOCHS
    ds = grain.MapDataset.range(plan.steps_per_epoch * epochs).map(plan).map(load)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.prefetch_buffer_size))
    if config.worker_count:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags (with their defaults); a library caller may not run absl.app.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    return ds


def make_train_pipeline(config: "DataConfig | Mapping[str, Any]", process_index: int | None = None,
                        process_count: int | None = None, seed: int = 0, source=None,
                        slots: Sequence[int] | None = None) -> grain.DatasetIterator:
    """An iterator of this process's batches with `get_state()` / `set_state(state)`; processes default to JAX's."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    return iter(make_dataset(config, process_index, process_count, seed, source, slots))


def steps_per_epoch(config: "DataConfig | Mapping[str, Any]", seed: int = 0, source=None) -> int:
    """Number of batches in one epoch (the same on every process)."""
    prepare = _prepare_section(config)
    config = DataConfig.from_config(config)
    source = training_source(config, seed, prepare, 0, source)
    shapes = source.video_shapes() if isinstance(source, VideoFileSource) else source.latent_shapes()
    return len(epoch_plan(shapes, config.global_batch_size, seed, 0, config.shuffle, config.drop_remainder)[0])
