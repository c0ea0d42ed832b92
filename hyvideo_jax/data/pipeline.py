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

Sources (random access, each `source[i]` a validated `TokenizedClip`, `source.latent_shapes()` [N, 3]):
`RandomClipSource` (random clips computed from (seed, index), for trainer tests before records exist),
`ArrayRecordClipSource` (shards written by `hyvideo_jax.data.prepare`), `TfdsClipSource` (`tfds.data_source`).

For training the VAE, `VideoFileSource` (`source="videos"`) reads a folder of video files instead, decoded as
prepare decodes them (`config.data.prepare`'s fps and buckets); the same plan buckets them by pixel shape and
batches are `video` [B, T, H, W, 3] float32 in [-1, 1] with `valid` and `record_index` (VIDEO_BATCH_KEYS).
"""

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.data.schema import (LATENT_DTYPES, TEXT_DTYPES, ClipSpec, RecordError, TokenizedClip, deserialize,
                                     numpy_dtype, read_header)

BATCH_KEYS = ("latents", "text_states", "text_mask", "pooled_text", "valid", "record_index")
VIDEO_BATCH_KEYS = ("video", "valid", "record_index")
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.npz"   # the empty prompt's encoding, written once by prepare beside its shards
SOURCES = ("random", "arrayrecord", "tfds", "videos")
_FOREVER_EPOCHS = 1 << 30  # num_epochs=0: a MapDataset this many epochs long is iterated lazily, never exhausted


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `config.data` section: where tokenized clips come from and how they are batched.

    `source` is "random" (RandomClipSource with `random_records` clips whose latent shapes cycle through
    `random_latent_shapes`), "arrayrecord" (`path`: a folder written by prepare, or a comma-separated list of shard
    files), "tfds" (`tfds_name`, `tfds_split`, `tfds_data_dir`) or "videos" (`path`: a folder of video files, for
    the VAE objective; `video_index`, if set, is a JSON file that keeps each video's probed bucket shape, so a
    restart probes only new or changed files). `num_epochs` 0 repeats forever. `caption_dropout` is the chance that
    a sample trains on the empty prompt's encoding instead of its caption's (for classifier-free guidance later).
    Evaluation data (`eval_source`): `eval_path`, clips of the same source kind (a prepared folder for "arrayrecord",
    a split name for "tfds"), or `eval_fraction` of the training records, held out deterministically (from the
    run's seed) and never trained on.
    `worker_count` > 0 decodes batches in that many worker processes; `read_threads` threads otherwise.
    """
    source: str = "random"
    path: str = ""
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    global_batch_size: int = 8
    num_epochs: int = 0
    shuffle: bool = True
    drop_remainder: bool = False
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    prefetch_buffer_size: int = 4
    latent_channels: int = 16
    text_len: int = 256
    text_dim: int = 4096
    pooled_dim: int = 768
    latent_dtype: str = "bfloat16"
    text_dtype: str = "bfloat16"
    random_records: int = 64
    random_latent_shapes: tuple[tuple[int, int, int], ...] = ((5, 8, 8),)
    video_index: str = ""
    caption_dropout: float = 0.0
    eval_path: str = ""
    eval_fraction: float = 0.0

    def __post_init__(self):
        shapes = tuple(tuple(int(s) for s in shape) for shape in self.random_latent_shapes)
        object.__setattr__(self, "random_latent_shapes", shapes)
        self.validate()

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        def fail(field, msg):
            raise ValueError(f"data.{field}: {msg}")
        if not 0.0 <= self.eval_fraction < 1.0:
            fail("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_path:
            fail("eval_fraction", f"evaluation data comes from data.eval_path ({self.eval_path}) or a held-out "
                 f"fraction of the training records, not both")
        if (self.eval_path or self.eval_fraction) and self.source == "videos":
            fail("eval_path" if self.eval_path else "eval_fraction", "evaluation computes the transformer's "
                 "validation loss on tokenized clips; the 'videos' source feeds the VAE objective")
        if self.eval_path and self.source not in ("arrayrecord", "tfds"):
            fail("eval_path", f"names clips of the same kind as data.source, which only 'arrayrecord' (a prepared "
                 f"folder) and 'tfds' (a split) have; data.source is {self.source!r}: use data.eval_fraction")
        if not 0.0 <= self.caption_dropout < 1.0:
            fail("caption_dropout", f"must be in [0, 1), got {self.caption_dropout}")
        if self.source not in SOURCES:
            fail("source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.source == "arrayrecord" and not self.path:
            fail("path", "is empty: give the folder written by `python -m hyvideo_jax.data.prepare`")
        if self.source == "videos" and not self.path:
            fail("path", "is empty: give a folder of video files")
        if self.source == "tfds" and not self.tfds_name:
            fail("tfds_name", "is empty: give the name of a TFDS dataset of tokenized clips")
        for f in ("global_batch_size", "latent_channels", "text_len", "text_dim", "pooled_dim", "random_records",
                  "prefetch_buffer_size", "worker_buffer_size"):
            if int(getattr(self, f)) <= 0:
                fail(f, f"must be positive, got {getattr(self, f)}")
        for f in ("num_epochs", "worker_count", "read_threads"):
            if int(getattr(self, f)) < 0:
                fail(f, f"must be >= 0, got {getattr(self, f)}")
        if self.latent_dtype not in LATENT_DTYPES:
            fail("latent_dtype", f"must be one of {LATENT_DTYPES}, got {self.latent_dtype!r}")
        if self.text_dtype not in TEXT_DTYPES:
            fail("text_dtype", f"must be one of {TEXT_DTYPES}, got {self.text_dtype!r}")
        if not self.random_latent_shapes or any(len(s) != 3 or min(s) < 1 for s in self.random_latent_shapes):
            fail("random_latent_shapes", f"must be a non-empty list of positive (T, H, W), "
                 f"got {self.random_latent_shapes}")

    @classmethod
    def from_config(cls, config: "DataConfig | Mapping[str, Any]") -> "DataConfig":
        """From `config.data` (its `prepare` and `synthetic` subsections belong to other modules and are ignored)."""
        if isinstance(config, cls):
            return config
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        values.pop("prepare", None)
        values.pop("synthetic", None)
        return from_fields(cls, values, "data")

    @property
    def spec(self) -> ClipSpec:
        return ClipSpec(self.latent_channels, self.text_len, self.text_dim, self.pooled_dim)


# ------------------------------------------------------------------------------------------------------- sources
class RandomClipSource:
    """`num_records` random tokenized clips, record i computed from (seed, i) when read: no files, any size.

    Latent shapes cycle through `latent_shapes` ([T, H, W] each); text masks keep a random number of tokens.
    """

    def __init__(self, num_records: int, latent_shapes: Sequence[Sequence[int]], spec: ClipSpec, seed: int = 0,
                 latent_dtype: str = "bfloat16", text_dtype: str = "bfloat16"):
        self.num_records, self.spec, self.seed = int(num_records), spec, int(seed)
        self.shapes = np.asarray(latent_shapes, np.int64).reshape(-1, 3)
        self.latent_dtype, self.text_dtype = numpy_dtype(latent_dtype), numpy_dtype(text_dtype)

    def __len__(self) -> int:
        return self.num_records

    def where(self, index: int) -> str:
        return f"random record {index}"

    def latent_shapes(self) -> np.ndarray:
        return self.shapes[np.arange(self.num_records) % len(self.shapes)]

    def __getitem__(self, index: int) -> TokenizedClip:
        if not 0 <= index < self.num_records:
            raise IndexError(f"random record {index} out of range [0, {self.num_records})")
        rng = np.random.default_rng([self.seed, index])
        t, h, w = (int(s) for s in self.shapes[index % len(self.shapes)])
        s = self.spec
        mask = np.zeros(s.text_len, np.int32)
        mask[:rng.integers(1, s.text_len + 1)] = 1
        return TokenizedClip(
            latents=rng.standard_normal((t, h, w, s.latent_channels), np.float32).astype(self.latent_dtype),
            text_states=rng.standard_normal((s.text_len, s.text_dim), np.float32).astype(self.text_dtype),
            text_mask=mask,
            pooled_text=rng.standard_normal(s.pooled_dim, np.float32).astype(self.text_dtype),
            caption=f"random clip {index}", source_id=f"random-{index}", num_frames=(t - 1) * 4 + 1, fps=24.0,
            height=h * 8, width=w * 8)


def read_manifest(folder: str) -> dict:
    """The manifest prepare writes beside its shards: {"schema_version", "shards": [{"path", "records",
    "latent_shapes", "source_ids"}], ...}; an empty manifest if the folder has none yet."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return {"shards": []}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_null_text(folder: str) -> dict[str, np.ndarray] | None:
    """{"text_states" [L, D], "text_mask" [L], "pooled_text" [Dp]}: the empty prompt as prepare encoded it beside the
    shards in `folder`, or None if it is not there."""
    from etils import epath
    path = epath.Path(folder) / NULL_TEXT
    if not folder or not path.exists():
        return None
    with path.open("rb") as f:
        stored = np.load(f)
        return {k: np.asarray(stored[k]) for k in ("text_states", "text_mask", "pooled_text")}


class ArrayRecordClipSource:
    """Tokenized clips in ArrayRecord shards: a folder written by prepare (its manifest lists shards and latent
    shapes), or a list of shard files (latent shapes then come from reading every record's header once)."""

    def __init__(self, path: str | Sequence[str]):
        from array_record.python.array_record_module import ArrayRecordReader

        if isinstance(path, str) and os.path.isdir(path):
            shards = read_manifest(path)["shards"]
            if not shards:
                raise ValueError(f"{path} holds no prepared shards (no {MANIFEST} or an empty one); run "
                                 "`python -m hyvideo_jax.data.prepare` first")
            self.paths = [os.path.join(path, s["path"]) for s in shards]
            counts = [int(s["records"]) for s in shards]
            shapes = [np.asarray(s["latent_shapes"], np.int64).reshape(-1, 3) for s in shards]
        else:
            self.paths = [p for p in (path.split(",") if isinstance(path, str) else path) if p]
            missing = [p for p in self.paths if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(f"ArrayRecord shard(s) not found: {missing}")
            counts = []
            for p in self.paths:
                reader = ArrayRecordReader(p)
                counts.append(reader.num_records())
                reader.close()
            shapes = None
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.source = grain.sources.ArrayRecordDataSource(self.paths)
        if len(self.source) != self.offsets[-1]:
            raise ValueError(f"shards hold {len(self.source)} records, the manifest lists {self.offsets[-1]}")
        self._shapes = (np.concatenate(shapes) if shapes else
                        np.asarray([self._header_shape(i) for i in range(len(self))], np.int64).reshape(-1, 3))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def where(self, index: int) -> str:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return f"shard {self.paths[shard]}, record {index - self.offsets[shard]}"

    def _header_shape(self, index: int) -> list[int]:
        header, _ = read_header(self.source[index], self.where(index))
        return header["arrays"]["latents"]["shape"][:3]

    def latent_shapes(self) -> np.ndarray:
        return self._shapes

    def __getitem__(self, index: int) -> TokenizedClip:
        return deserialize(self.source[index], self.where(index))


class TfdsClipSource:
    """Tokenized clips from a TFDS dataset read through `tfds.data_source` (ArrayRecord file format).

    Its features are the schema's fields: the arrays (latents, text_states, text_mask, pooled_text), the scalars
    (caption, source_id, num_frames, fps, height, width) and `schema_version`. TFDS keeps no latent shapes aside,
    so they are read from every record once, when the source is built.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        self._shapes = np.asarray([self[i].latent_shape for i in range(len(self))], np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.source)

    def where(self, index: int) -> str:
        return f"tfds {self.name} split {self.split}, record {index}"

    def latent_shapes(self) -> np.ndarray:
        return self._shapes

    def __getitem__(self, index: int) -> TokenizedClip:
        return clip_from_features(self.source[index], self.where(index))


def tfds_features(spec: ClipSpec, latent_dtype: str = "bfloat16", text_dtype: str = "float32"):
    """The `tfds.features.FeaturesDict` of a TFDS dataset of tokenized clips that `TfdsClipSource` reads.

    Latents have a free [T, H, W] (buckets), so they are stored as raw bytes; the text shapes are fixed by `spec`.
    A builder's examples are `dict(latents=..., ..., schema_version=SCHEMA_VERSION)` with the TokenizedClip fields.
    """
    import tensorflow_datasets as tfds

    tensor = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        "latents": tensor(shape=(None, None, None, spec.latent_channels), dtype=numpy_dtype(latent_dtype),
                          encoding="bytes"),
        "text_states": tensor(shape=(spec.text_len, spec.text_dim), dtype=numpy_dtype(text_dtype)),
        "text_mask": tensor(shape=(spec.text_len,), dtype=np.int32),
        "pooled_text": tensor(shape=(spec.pooled_dim,), dtype=numpy_dtype(text_dtype)),
        "caption": tfds.features.Text(), "source_id": tfds.features.Text(), "num_frames": np.int32,
        "fps": np.float32, "height": np.int32, "width": np.int32, "schema_version": np.int32})


def clip_from_features(features: Mapping[str, Any], where: str) -> TokenizedClip:
    """A validated TokenizedClip from a dict of features (TFDS decoding gives numpy arrays and bytes)."""
    from hyvideo_jax.data.schema import SCHEMA_VERSION

    version = int(features.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema version {version}, this reader expects version {SCHEMA_VERSION}")

    def text(value):
        return value.decode() if isinstance(value, bytes) else str(value)
    mask = np.asarray(features["text_mask"])
    return TokenizedClip(
        latents=np.asarray(features["latents"]), text_states=np.asarray(features["text_states"]),
        text_mask=mask.astype(np.int32) if mask.dtype in (np.int64, np.bool_) else mask,
        pooled_text=np.asarray(features["pooled_text"]), caption=text(features["caption"]),
        source_id=text(features["source_id"]), num_frames=int(features["num_frames"]), fps=float(features["fps"]),
        height=int(features["height"]), width=int(features["width"])).validate(where)


class VideoFileSource:
    """The video files of a folder (names sorted), each decoded when read exactly as prepare decodes it
    (`hyvideo_jax.data.prepare.decode_clip`: `prepare.fps`, resized and centre-cropped to the bucket of the closest
    aspect ratio, the longest bucket length that fits). For the VAE objective, which needs pixels, not latents.

    The batch plan needs every bucket shape up front, so the source probes every video when built
    (`prepare.probe_clip`: frames decoded for their times only, no pixel conversion), on `threads` threads; videos
    prepare would skip (unreadable, too short) are left out and logged with the reason. With `index` (a JSON file
    path) the outcomes are kept there, keyed by file name, size and modification time under the prepare settings,
    and only videos not in it are probed; `write_index` False reads it without updating it (processes other than
    the first).
    """

    def __init__(self, folder: str, prepare, progress: bool = True, threads: int = 2, index: str = "",
                 write_index: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        from absl import logging
        from tqdm import tqdm

        from hyvideo_jax.data.prepare import VIDEO_EXTENSIONS, SkipVideo, decode_clip, probe_clip, write_json

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data.path: {folder} is not a folder of videos")
        self.folder, self.prepare, self._decode = folder, prepare, decode_clip
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith("."))

        def probe(name):
            try:
                return list(probe_clip(os.path.join(folder, name), prepare))
            except SkipVideo as e:
                return str(e)

        def file_stat(name):
            stat = os.stat(os.path.join(folder, name))
            return [stat.st_size, stat.st_mtime_ns]

        settings = {"fps": prepare.fps, "buckets": [list(b) for b in prepare.buckets]}
        known = _read_video_index(index, settings) if index else {}
        stats = {n: file_stat(n) for n in names}
        outcomes = {n: known[n]["outcome"] for n in names if n in known and known[n]["stat"] == stats[n]}
        todo = [n for n in names if n not in outcomes]
        if outcomes:
            logging.info("data: %d of %d video shapes from %s", len(outcomes), len(names), index)
        with ThreadPoolExecutor(max(1, threads)) as pool:   # the decoder releases the GIL
            probed = tqdm(pool.map(probe, todo), total=len(todo), desc=f"probe {folder}", unit="video",
                          disable=not progress or not todo)
            outcomes.update(zip(todo, probed))
        if index and write_index and todo:
            write_json(index, {"settings": settings,
                                "videos": {n: {"stat": stats[n], "outcome": outcomes[n]} for n in names}})

        self.names, shapes, self.skipped = [], [], []
        for name in names:
            if isinstance(outcomes[name], str):
                self.skipped.append({"video": name, "reason": outcomes[name]})
            else:
                self.names.append(name)
                shapes.append(outcomes[name])
        for entry in self.skipped:
            logging.warning("data: left out %s: %s", entry["video"], entry["reason"])
        if not self.names:
            raise ValueError(f"data.path: no usable video in {folder} ({len(names)} video files, "
                             f"{len(self.skipped)} left out)")
        self._shapes = np.asarray(shapes, np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.names)

    def where(self, index: int) -> str:
        return f"video {os.path.join(self.folder, self.names[index])}"

    def video_shapes(self) -> np.ndarray:
        """[N, 3] (frames, height, width) of every video's bucket."""
        return self._shapes

    def __getitem__(self, index: int) -> np.ndarray:
        video, _ = self._decode(os.path.join(self.folder, self.names[index]), self.prepare)
        return video


def _read_video_index(path: str, settings: dict) -> dict:
    """The entries of a video index written under the same prepare `settings` ({} if none, or other settings)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.video_index: {path} is not a readable index ({e}); delete it to probe "
                         f"again") from None
    return index.get("videos", {}) if index.get("settings") == settings else {}


def make_source(config: DataConfig, seed: int = 0, prepare=None, process_index: int = 0):
    """The source `config.source` names; "videos" decodes with `prepare` (a PrepareConfig: fps and buckets), and
    only process 0 updates its `video_index`."""
    if config.source == "videos":
        if prepare is None:
            raise ValueError("data.prepare: the videos source decodes with data.prepare's fps and buckets; pass "
                             "config.data with its prepare section")
        return VideoFileSource(config.path, prepare, threads=config.read_threads, index=config.video_index,
                               write_index=process_index == 0)
    if config.source == "random":
        return RandomClipSource(config.random_records, config.random_latent_shapes, config.spec, seed,
                                config.latent_dtype, config.text_dtype)
    if config.source == "arrayrecord":
        return ArrayRecordClipSource(config.path)
    return TfdsClipSource(config.tfds_name, config.tfds_split, config.tfds_data_dir)


class SubsetSource:
    """The records `indices` of a clip source, renumbered 0..len-1 (a training or held-out part of one source)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def where(self, index: int) -> str:
        return self.source.where(int(self.indices[index]))

    def latent_shapes(self) -> np.ndarray:
        return np.asarray(self.source.latent_shapes()).reshape(-1, 3)[self.indices]

    def __getitem__(self, index: int) -> TokenizedClip:
        return self.source[int(self.indices[index])]


def held_out(num_records: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), sorted: ⌈fraction · num_records⌉ records drawn from `seed` (the same
    on every process and every restart); at least one record stays on each side."""
    if num_records < 2:
        raise ValueError(f"data.eval_fraction: a source of {num_records} record cannot be split")
    count = min(max(int(np.ceil(fraction * num_records)), 1), num_records - 1)
    chosen = np.random.default_rng([int(seed), 0xE7A1]).permutation(num_records)[:count]
    mask = np.zeros(num_records, bool)
    mask[chosen] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def eval_source(config: "DataConfig | Mapping[str, Any]", seed: int = 0):
    """The evaluation clips `config` names (see DataConfig), or None when it names none."""
    config = DataConfig.from_config(config)
    if config.eval_path:
        if config.source == "tfds":
            return TfdsClipSource(config.tfds_name, config.eval_path, config.tfds_data_dir)
        return ArrayRecordClipSource(config.eval_path)
    if config.eval_fraction:
        source = make_source(config, seed)
        return SubsetSource(source, held_out(len(source), config.eval_fraction, seed)[1])
    return None


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
    return dict(latents=((rows, *shape, s.latent_channels), latent), text_states=((rows, s.text_len, s.text_dim), text),
                text_mask=((rows, s.text_len), np.dtype(np.int32)), pooled_text=((rows, s.pooled_dim), text),
                valid=((rows,), np.dtype(bool)), record_index=((rows,), np.dtype(np.int64)))


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
    from hyvideo_jax.data.prepare import PrepareConfig
    return PrepareConfig.from_config(section)


# ------------------------------------------------------------------------------------------------------ pipeline
def training_source(config: DataConfig, seed: int, prepare=None, process_index: int = 0, source=None):
    """The records trained on: `source` (default: the one config names) without the held-out evaluation records."""
    source = make_source(config, seed, prepare, process_index) if source is None else source
    if config.eval_fraction:
        source = SubsetSource(source, held_out(len(source), config.eval_fraction, seed)[0])
    return source


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
