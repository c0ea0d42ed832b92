"""Clip sources: random access to training records, each `source[i]` a validated `TokenizedClip` and
`source.latent_shapes()` their latent shapes [N, 3] (what the batch plan buckets by), plus how `config.data` picks
them (`make_source`) and splits off evaluation records (`held_out`, `eval_source`, `training_source`).

`RandomClipSource` (random clips computed from (seed, index), for trainer tests before records exist),
`ArrayRecordClipSource` (shards written by `hyvideo_jax.data.prepare`, listed in its manifest), `TfdsClipSource`
(`tfds.data_source`), `SubsetSource` (some records of another source). For training the VAE, `VideoFileSource`
(`source="videos"`) reads a folder of video files instead, decoded as prepare decodes them
(`hyvideo_jax.data.video`), with `video_shapes()` [N, 3] (frames, height, width).
"""

import json
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from etils import epath

from hyvideo_jax.data import video
from hyvideo_jax.data.config import DataConfig
from hyvideo_jax.data.schema import ClipSpec, RecordError, TokenizedClip, deserialize, numpy_dtype, read_header
from hyvideo_jax.paths import is_cloud

MANIFEST = "manifest.json"
NULL_TEXT = "null_text.npz"   # the empty prompt's encoding, written once by prepare beside its shards


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
        latents = rng.standard_normal((t, h, w, s.latent_channels), np.float32).astype(self.latent_dtype)
        text_states = rng.standard_normal((s.text_len, s.text_dim), np.float32).astype(self.text_dtype)
        pooled_text = rng.standard_normal(s.pooled_dim, np.float32).astype(self.text_dtype)
        # Drawn last, so the other arrays are the same with or without it; near the latents' frame 0, as a real
        # first frame's own latent is.
        image_latent = None if not s.image_latent else (
            latents[:1].astype(np.float32) + 0.1 * rng.standard_normal(latents[:1].shape, np.float32)
        ).astype(self.latent_dtype)
        return TokenizedClip(
            latents=latents, text_states=text_states, text_mask=mask, pooled_text=pooled_text,
            caption=f"random clip {index}", source_id=f"random-{index}", num_frames=(t - 1) * 4 + 1, fps=24.0,
            height=h * 8, width=w * 8, image_latent=image_latent)


def read_manifest(folder: str) -> dict:
    """The manifest prepare writes beside its shards: {"schema_version", "shards": [{"path", "records",
    "latent_shapes", "source_ids"}], ...}; an empty manifest if the folder has none yet."""
    path = epath.Path(folder) / MANIFEST
    if not path.exists():
        return {"shards": []}
    return json.loads(path.read_text())


def read_null_text(folder: str) -> dict[str, np.ndarray] | None:
    """{"text_states" [L, D], "text_mask" [L], "pooled_text" [Dp]}: the empty prompt as prepare encoded it beside the
    shards in `folder`, or None if it is not there."""
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

        if isinstance(path, str) and epath.Path(path).is_dir():   # ArrayRecord reads gs:// shards itself
            shards = read_manifest(path)["shards"]
            if not shards:
                raise ValueError(f"{path} holds no prepared shards (no {MANIFEST} or an empty one); run "
                                 "`python -m hyvideo_jax.data.prepare` first")
            self.paths = [str(epath.Path(path) / s["path"]) for s in shards]
            counts = [int(s["records"]) for s in shards]
            shapes = [np.asarray(s["latent_shapes"], np.int64).reshape(-1, 3) for s in shards]
        else:
            self.paths = [p for p in (path.split(",") if isinstance(path, str) else path) if p]
            missing = [p for p in self.paths if not epath.Path(p).exists()]
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
    (`hyvideo_jax.data.video.decode_clip`: `prepare.fps`, resized and centre-cropped to the bucket of the closest
    aspect ratio, the longest bucket length that fits). For the VAE objective, which needs pixels, not latents.

    The batch plan needs every bucket shape up front, so the source probes every video when built
    (`video.probe_clip`: frames decoded for their times only, no pixel conversion), on `threads` threads; videos
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

        if not epath.Path(folder).is_dir():
            raise FileNotFoundError(f"data.path: {folder} is not a folder of videos")
        self.folder, self.prepare, self._decode = folder, prepare, video.decode_clip
        names = sorted(p.name for p in epath.Path(folder).iterdir()
                       if p.name.lower().endswith(video.VIDEO_EXTENSIONS) and not p.name.startswith("."))

        def probe(name):
            try:
                return list(video.probe_clip(self._path(name), prepare))
            except video.SkipVideo as e:
                return str(e)

        def file_stat(name):   # size and modification time (ns locally; cloud storage gives seconds)
            path = self._path(name)
            if is_cloud(path):
                stat = epath.Path(path).stat()
                return [stat.length, stat.mtime]
            stat = os.stat(path)
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
                          disable=not progress or not todo, leave=False)
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

    def _path(self, name: str) -> str:
        return str(epath.Path(self.folder) / name)

    def __len__(self) -> int:
        return len(self.names)

    def where(self, index: int) -> str:
        return f"video {self._path(self.names[index])}"

    def video_shapes(self) -> np.ndarray:
        """[N, 3] (frames, height, width) of every video's bucket."""
        return self._shapes

    def __getitem__(self, index: int) -> np.ndarray:
        frames, _ = self._decode(self._path(self.names[index]), self.prepare)
        return frames


def _read_video_index(path: str, settings: dict) -> dict:
    """The entries of a video index written under the same prepare `settings` ({} if none, or other settings)."""
    if not epath.Path(path).exists():
        return {}
    try:
        index = json.loads(epath.Path(path).read_text())
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


def training_source(config: DataConfig, seed: int, prepare=None, process_index: int = 0, source=None):
    """The records trained on: `source` (default: the one config names) without the held-out evaluation records."""
    source = make_source(config, seed, prepare, process_index) if source is None else source
    if config.eval_fraction:
        source = SubsetSource(source, held_out(len(source), config.eval_fraction, seed)[0])
    return source


def write_json(path: str, value):
    """Write JSON to a temporary file, then rename it over `path` (local or cloud): readers never see half a
    file."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
