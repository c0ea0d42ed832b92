"""The tokenized clip: the unit the trainer reads (VAE latents + text states of one captioned video clip).

    data = serialize(clip)                                   # bytes, one ArrayRecord record
    clip = deserialize(data, where="shard clips-00003.array_record, record 17")

A record is `MAGIC` + a little-endian uint32 header length + a JSON header + the raw array buffers. The header
holds `schema_version`, the scalar fields and, for each array, its dtype, shape and byte offset. Arrays:

    latents      [T, H, W, C]  bfloat16 or float16, scaled VAE latents (T = (frames-1)/4 + 1, H = height/8, ...)
    text_states  [L, D]        bfloat16, float16 or float32, the LLM states after the template crop
    text_mask    [L]           int32, 1 for a token, 0 for padding
    pooled_text  [Dp]          same dtype family as text_states, the CLIP pooled vector
    image_latent [1, H, W, C]  optional, the latents' dtype: the clip's first frame encoded alone (image-to-video
                               training; the causal VAE's latent frame 0 of the clip differs from it, since its
                               GroupNorm statistics span all frames)

Scalars: caption, source_id (file name of the source video), num_frames, fps, height, width (pixels of the
encoded clip) and the VAE compression (temporal, spatial) that links pixel and latent sizes.

Reading checks everything a later stage relies on (version, dtypes, ranks, consistent lengths and sizes) and
raises `RecordError` naming where the record came from, so a bad shard is found without a debugger.
The module imports numpy and ml_dtypes only: Grain worker processes unpickle it without importing JAX.
"""

import dataclasses
import json
import struct

import ml_dtypes
import numpy as np

SCHEMA_VERSION = 1
MAGIC = b"HYVCLIP\x00"
LATENT_DTYPES = ("bfloat16", "float16")
TEXT_DTYPES = ("bfloat16", "float16", "float32")
ARRAY_FIELDS = ("latents", "text_states", "text_mask", "pooled_text")
OPTIONAL_ARRAY_FIELDS = ("image_latent",)   # absent from a record that does not hold it (text-to-video)
_HEADER_LEN = struct.Struct("<I")


class RecordError(ValueError):
    """A record that does not follow the tokenized-clip schema; the message names the shard and record."""


def numpy_dtype(name: str) -> np.dtype:
    """np.dtype of a dtype name, with bfloat16 from ml_dtypes."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TokenizedClip:
    """One captioned clip after the VAE and the text encoders (shapes and dtypes in the module docstring)."""
    latents: np.ndarray
    text_states: np.ndarray
    text_mask: np.ndarray
    pooled_text: np.ndarray
    caption: str
    source_id: str
    num_frames: int
    fps: float
    height: int
    width: int
    temporal_compression: int = 4
    spatial_compression: int = 8
    image_latent: np.ndarray | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(T, H, W) of the latents: the bucket key."""
        return tuple(int(s) for s in self.latents.shape[:3])

    def validate(self, where: str = "clip") -> "TokenizedClip":
        """Raise RecordError (prefixed by `where`) unless the fields are mutually consistent; returns self."""
        def fail(msg):
            raise RecordError(f"{where}: {msg}")
        arrays = {name: getattr(self, name) for name in ARRAY_FIELDS}
        for name, value in arrays.items():
            if not isinstance(value, np.ndarray):
                fail(f"{name} must be a numpy array, got {type(value).__name__}")
        if self.latents.dtype.name not in LATENT_DTYPES:
            fail(f"latents dtype must be one of {LATENT_DTYPES}, got {self.latents.dtype.name}")
        for name in ("text_states", "pooled_text"):
            if arrays[name].dtype.name not in TEXT_DTYPES:
                fail(f"{name} dtype must be one of {TEXT_DTYPES}, got {arrays[name].dtype.name}")
        if self.text_mask.dtype != np.int32:
            fail(f"text_mask dtype must be int32, got {self.text_mask.dtype.name}")
        for name, rank in (("latents", 4), ("text_states", 2), ("text_mask", 1), ("pooled_text", 1)):
            if arrays[name].ndim != rank:
                fail(f"{name} must have rank {rank}, got shape {arrays[name].shape}")
        if min(self.latents.shape) < 1:
            fail(f"latents must be non-empty, got shape {self.latents.shape}")
        if self.text_mask.shape[0] != self.text_states.shape[0]:
            fail(f"text_mask has {self.text_mask.shape[0]} entries but text_states has {self.text_states.shape[0]} "
                 "tokens")
        if not np.isin(self.text_mask, (0, 1)).all():
            fail("text_mask must hold only 0 and 1")
        rt, rs = self.temporal_compression, self.spatial_compression
        t, h, w = self.latent_shape
        if self.num_frames < 1 or (self.num_frames - 1) % rt or (self.num_frames - 1) // rt + 1 != t:
            fail(f"num_frames {self.num_frames} does not match {t} latent frames (expected {(t - 1) * rt + 1}, "
                 f"frames are {rt}k+1)")
        if (self.height, self.width) != (h * rs, w * rs):
            fail(f"resolution {self.height}x{self.width} does not match latents {h}x{w} at spatial compression {rs} "
                 f"(expected {h * rs}x{w * rs})")
        if not isinstance(self.caption, str) or not isinstance(self.source_id, str):
            fail("caption and source_id must be strings")
        if not self.fps > 0:
            fail(f"fps must be positive, got {self.fps}")
        if self.image_latent is not None:
            if not isinstance(self.image_latent, np.ndarray) or self.image_latent.dtype != self.latents.dtype:
                fail(f"image_latent must be a numpy array of the latents' dtype {self.latents.dtype.name}")
            if self.image_latent.shape != (1, *self.latents.shape[1:]):
                fail(f"image_latent must have shape {(1, *self.latents.shape[1:])} (one latent frame of the "
                     f"latents' size), got {self.image_latent.shape}")
        return self


def serialize(clip: TokenizedClip) -> bytes:
    """Bytes of one validated record (see the module docstring for the layout)."""
    clip.validate()
    arrays, offset, buffers = {}, 0, []
    for name in ARRAY_FIELDS + OPTIONAL_ARRAY_FIELDS:
        if getattr(clip, name) is None:
            continue
        value = np.ascontiguousarray(getattr(clip, name))
        arrays[name] = dict(dtype=value.dtype.name, shape=list(value.shape), offset=offset, nbytes=value.nbytes)
        buffers.append(value.tobytes())
        offset += value.nbytes
    header = dict(schema_version=SCHEMA_VERSION, arrays=arrays, caption=clip.caption, source_id=clip.source_id,
                  num_frames=int(clip.num_frames), fps=float(clip.fps), height=int(clip.height),
                  width=int(clip.width), temporal_compression=int(clip.temporal_compression),
                  spatial_compression=int(clip.spatial_compression))
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header_bytes)), header_bytes, *buffers])


def read_header(data: bytes, where: str = "record") -> tuple[dict, int]:
    """(header dict, offset of the first array byte); RecordError if the bytes are not a record of this version."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:len(MAGIC)]) != MAGIC:
        raise RecordError(f"{where}: not a tokenized-clip record (expected the {MAGIC!r} prefix)")
    start = len(MAGIC) + _HEADER_LEN.size
    if len(data) < start:
        raise RecordError(f"{where}: truncated record ({len(data)} bytes)")
    (length,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(bytes(data[start:start + length]))
    except ValueError as e:
        raise RecordError(f"{where}: unreadable record header ({e})") from None
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema version {version}, this reader expects version {SCHEMA_VERSION}")
    return header, start + length


def deserialize(data: bytes, where: str = "record") -> TokenizedClip:
    """The validated TokenizedClip of `data` (arrays are read-only views of `data`); RecordError names `where`."""
    header, base = read_header(data, where)
    missing = [k for k in (*ARRAY_FIELDS, "caption", "source_id", "num_frames", "fps", "height", "width")
               if k not in header.get("arrays", {}) and k not in header]
    if missing:
        raise RecordError(f"{where}: record header lacks {missing}")
    arrays = {}
    for name in ARRAY_FIELDS + tuple(f for f in OPTIONAL_ARRAY_FIELDS if f in header["arrays"]):
        spec = header["arrays"][name]
        try:
            dtype = numpy_dtype(spec["dtype"])
        except TypeError:
            raise RecordError(f"{where}: {name} has unknown dtype {spec['dtype']!r}") from None
        count = int(np.prod(spec["shape"], dtype=np.int64))
        start = base + int(spec["offset"])
        if count * dtype.itemsize != spec["nbytes"] or start + spec["nbytes"] > len(data):
            raise RecordError(f"{where}: {name} of shape {spec['shape']} and dtype {spec['dtype']} needs "
                              f"{count * dtype.itemsize} bytes, the record holds {spec['nbytes']} "
                              f"(record length {len(data)})")
        arrays[name] = np.frombuffer(data, dtype, count, start).reshape(spec["shape"])
    clip = TokenizedClip(**arrays, caption=header["caption"], source_id=header["source_id"],
                         num_frames=header["num_frames"], fps=header["fps"], height=header["height"],
                         width=header["width"], temporal_compression=header.get("temporal_compression", 4),
                         spatial_compression=header.get("spatial_compression", 8))
    return clip.validate(where)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What a pipeline expects of every clip: the latent channels and the text shapes of its config, and whether
    it must hold `image_latent` (image-to-video training)."""
    latent_channels: int
    text_len: int
    text_dim: int
    pooled_dim: int
    image_latent: bool = False

    def check(self, clip: TokenizedClip, where: str = "clip") -> TokenizedClip:
        """Raise RecordError naming `where` if `clip` disagrees with this spec; returns the clip."""
        expected = {"latents channels": (clip.latents.shape[-1], self.latent_channels),
                    "text_states tokens": (clip.text_states.shape[0], self.text_len),
                    "text_states width": (clip.text_states.shape[1], self.text_dim),
                    "pooled_text width": (clip.pooled_text.shape[0], self.pooled_dim)}
        for what, (got, want) in expected.items():
            if got != want:
                raise RecordError(f"{where}: {what} is {got}, the data config expects {want}")
        if self.image_latent and clip.image_latent is None:
            raise RecordError(f"{where}: no image_latent (the first frame's own latent), which image-to-video "
                              f"training reads (data.with_image_latent): prepare the clips with the image-to-video "
                              f"config, which writes it")
        return clip
