"""The `config.data` section (`DataConfig`) and its `prepare` subsection (`PrepareConfig`): validated frozen
dataclasses, kept apart from the code that reads them so that sources, video decoding, the pipeline and prepare all
import them without importing one another.
"""

import dataclasses
from typing import Any, Mapping

from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.data.schema import LATENT_DTYPES, TEXT_DTYPES, ClipSpec

SOURCES = ("random", "arrayrecord", "tfds", "videos")


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
    `with_image_latent`: every clip holds `image_latent` (its first frame encoded alone) and batches carry it, as
    image-to-video training (model.image_condition_type) needs; prepare writes it, with image-conditioned text
    states, when the config's model is image-to-video (sources "arrayrecord" and "random"; TFDS features have no
    such field).
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
    with_image_latent: bool = False

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
        if self.with_image_latent and self.source not in ("arrayrecord", "random"):
            fail("with_image_latent", f"first-frame latents come with clips prepared for image-to-video (source "
                 f"'arrayrecord') or random clips; source {self.source!r} has none")
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
        return ClipSpec(self.latent_channels, self.text_len, self.text_dim, self.pooled_dim, self.with_image_latent)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """The `config.data.prepare` section. `buckets` are (frames, height, width) in pixels; `vae_checkpoint` is a
    folder written by `python -m hyvideo_jax.convert` (empty: random VAE weights from `vae_seed`, for the demo)."""
    fps: float = 24.0
    buckets: tuple[tuple[int, int, int], ...] = ((129, 544, 960),)
    records_per_shard: int = 64
    vae_batch_size: int = 1
    vae_checkpoint: str = ""
    vae_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(tuple(int(v) for v in b) for b in self.buckets))
        self.validate()

    def validate(self):
        def fail(field, msg):
            raise ValueError(f"data.prepare.{field}: {msg}")
        if not self.fps > 0:
            fail("fps", f"must be positive, got {self.fps}")
        if not self.buckets:
            fail("buckets", "needs at least one (frames, height, width)")
        for b in self.buckets:
            if len(b) != 3 or b[0] < 1 or (b[0] - 1) % 4 or b[1] % 16 or b[2] % 16 or min(b) < 1:
                fail("buckets", f"each bucket must be (frames 4k+1, height, width multiples of 16), got {b}")
        for f in ("records_per_shard", "vae_batch_size"):
            if getattr(self, f) < 1:
                fail(f, f"must be positive, got {getattr(self, f)}")

    @classmethod
    def from_config(cls, config: "PrepareConfig | Mapping[str, Any]") -> "PrepareConfig":
        return from_fields(cls, config, "data.prepare")
