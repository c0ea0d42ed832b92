"""Videos + captions → ArrayRecord shards of tokenized clips (VAE latents + text states), resumable.

    python -m hyvideo_jax.data.prepare --videos=DIR --captions=FILE --out=DIR --config=configs/demo.py

For each video (sorted by file name) with a caption: decode (PyAV), sample frames at `data.prepare.fps`, pick a
bucket (below), resize to cover the bucket's frame and centre-crop, scale pixels to [-1, 1]; then, in batches of
`vae_batch_size` clips of one bucket, encode with the VAE (jitted; tiled when larger than a tile; posterior mean,
scaled) and the text encoders, and write one record per clip (`hyvideo_jax.data.schema`).

Image-to-video (the config's `model.image_condition_type` set, with `data.with_image_latent`): each record also
holds `image_latent`, the clip's first frame encoded alone by the VAE, which is what the sampler conditions on (the
clip's own latent frame 0 is not it: the causal VAE's GroupNorm statistics span all frames, so frame 0's latent
depends on the later frames too); and the caption is encoded with that first frame as the image by
`ImagePromptEncoders` (`config.text` with its vision fields), so the records' text length is the encoders'
`states_len` (kept image tokens + text_len − the assistant header), which `data.text_len` must equal. The empty
prompt for caption dropout is then encoded with a black image, as the sampler's negative prompt is.

Buckets and frame sampling are `hyvideo_jax.data.video`'s (the VAE objective's `VideoFileSource` decodes the same
way): a video goes to the bucket size of the closest aspect ratio and the longest bucket length it fills.

Output folder:
    clips-00000.array_record, ...   shards of `records_per_shard` records (the last one may be shorter)
    manifest.json                   shards, their records' latent shapes and source ids; the pipeline reads it
    summary.json                    this run's counts and every skipped video with its reason
    null_text.npz                   the empty prompt's encoding, for caption dropout

Resuming: a shard enters the manifest only once closed, and the manifest is replaced atomically, so a run that
stops leaves only whole shards listed; the next run skips the videos already listed and overwrites any unlisted
partial shard. A video that cannot be decoded, is too short for every bucket, or has no caption is skipped and
reported, never fatal.
"""

import io
import json
import time

import numpy as np
from etils import epath

from hyvideo_jax.data.config import DataConfig, PrepareConfig
from hyvideo_jax.data.schema import SCHEMA_VERSION, TokenizedClip, numpy_dtype, serialize
from hyvideo_jax.data.sources import MANIFEST, NULL_TEXT, read_manifest, write_json
from hyvideo_jax.data.video import VIDEO_EXTENSIONS, SkipVideo, choose_size, decode_clip, probe_clip

# PrepareConfig and the decoding names are re-exported: `prepare.decode_clip` etc. as before they moved.
__all__ = ["SUMMARY", "read_captions", "ShardWriter", "write_null_text", "first_frame_image", "ClipEncoder",
           "image_condition_type", "prepare_videos", "main",
           "PrepareConfig", "VIDEO_EXTENSIONS", "SkipVideo", "choose_size", "decode_clip", "probe_clip", "write_json"]

SUMMARY = "summary.json"


# ------------------------------------------------------------------------------------------------------ captions
def read_captions(path: str) -> dict[str, str]:
    """{video file name: caption} from JSON lines ({"video": ..., "caption": ...}) or `name<TAB>caption` lines."""
    captions = {}
    for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):   # local or cloud
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                entry = json.loads(line)
                captions[str(entry["video"])] = str(entry["caption"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} line {n}: expected {{\"video\": ..., \"caption\": ...}}, "
                                 f"got {line.strip()[:80]!r}") from None
        else:
            name, sep, caption = line.rstrip("\n").partition("\t")
            if not sep:
                raise ValueError(f"{path} line {n}: expected 'file name<TAB>caption', got {line.strip()[:80]!r}")
            captions[name] = caption
    return captions


# ------------------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Appends records to shards `clips-NNNNN.array_record` in `out`, committing each closed shard to the manifest
    (written to a temporary file, then renamed over the old one)."""

    def __init__(self, out: str, records_per_shard: int, manifest: dict):
        self.out, self.records_per_shard, self.manifest = out, records_per_shard, manifest
        self.writer, self.entry = None, None

    def add(self, clip: TokenizedClip):
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None:
            name = f"clips-{len(self.manifest['shards']):05d}.array_record"
            # group_size:1 keeps every record its own chunk, so random access reads one record, not a group.
            self.writer = ArrayRecordWriter(str(epath.Path(self.out) / name), "group_size:1")
            self.entry = {"path": name, "records": 0, "latent_shapes": [], "source_ids": []}
        self.writer.write(serialize(clip))
        self.entry["records"] += 1
        self.entry["latent_shapes"].append(list(clip.latent_shape))
        self.entry["source_ids"].append(clip.source_id)
        if self.entry["records"] >= self.records_per_shard:
            self.close()

    def close(self):
        if self.writer is None:
            return
        self.writer.close()
        self.manifest["shards"].append(self.entry)
        self.writer, self.entry = None, None
        write_json(epath.Path(self.out) / MANIFEST, self.manifest)


def write_null_text(out: str, encoder: "ClipEncoder", data: DataConfig):
    """The empty prompt's encoding (what caption dropout trains on) as NULL_TEXT in `out`: rounded to the records'
    text dtype as the clips are, stored as fp32 (plain NumPy reads it)."""
    states, mask, pooled = (np.asarray(a)[0] for a in encoder.encode_empty())
    as_records = lambda a: a.astype(numpy_dtype(data.text_dtype)).astype(np.float32)  # noqa: E731
    buffer = io.BytesIO()
    np.savez(buffer, text_states=as_records(states), text_mask=mask.astype(np.int32), pooled_text=as_records(pooled))
    tmp = epath.Path(out) / (NULL_TEXT + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(epath.Path(out) / NULL_TEXT)


# ------------------------------------------------------------------------------------------------------ encoding
def first_frame_image(video: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] of a clip's frame 0 (video [T, H, W, 3] in [-1, 1], from decoded uint8 pixels)."""
    return np.clip(np.round((video[0] + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ClipEncoder:
    """The VAE and the text encoders of a config, jitted; `encode(videos, captions)` for one bucket's batch. For
    an image-to-video model (`config.model.image_condition_type`) the text encoders are `ImagePromptEncoders`, and
    `image_latents(videos)` gives the first frames' own latents (module docstring)."""

    def __init__(self, config):
        import jax

        from hyvideo_jax.convert.vae import load_vae
        from hyvideo_jax.models.vae import HunyuanVideoVAE
        from hyvideo_jax.models.vae_tiling import encode_video

        prep = PrepareConfig.from_config(config.data.prepare)
        self.data = DataConfig.from_config(config.data)
        self.batch = prep.vae_batch_size
        self.image_condition_type = image_condition_type(config)
        if self.image_condition_type is None:
            from hyvideo_jax.text import TextEncoders
            self.text = TextEncoders.from_config(config.text)
        else:
            from hyvideo_jax.image_prompts import ImagePromptEncoders
            self.text = ImagePromptEncoders.from_config(config.text, image_condition_type=self.image_condition_type)
            if self.data.text_len != self.text.states_len:
                raise ValueError(f"data.text_len {self.data.text_len} differs from the length of the image-"
                                 f"conditioned text states, {self.text.states_len} ({self.text.image_len()} image "
                                 f"tokens + text.text_len {self.text.text.text_len} - {self.text.header_drop} "
                                 f"assistant-header tokens): set data.text_len={self.text.states_len}")
            if not self.data.with_image_latent:
                raise ValueError(f"data.with_image_latent: the model is image-to-video ({self.image_condition_type}),"
                                 f" whose clips hold their first frame's latent: set it to True")
        vae_config, params = load_vae(prep.vae_checkpoint, config.vae.model, prep.vae_seed)
        self.vae_config, self.vae_params = vae_config, params
        model = HunyuanVideoVAE(vae_config)
        self._encode_video = jax.jit(lambda p, v: encode_video(model, p, v))

    def encode_empty(self):
        """The empty prompt's (text_states [1, L, D], text_mask [1, L], pooled [1, Dp]); image-to-video: with a
        black image, as the sampler's negative prompt."""
        if self.image_condition_type is None:
            return self.text.encode_prompts([""])
        size = self.text.llava_config.vision.image_size
        return self.text.encode_negative([""], size, size)

    def _padded(self, videos: list[np.ndarray]) -> np.ndarray:
        """The videos stacked and padded with black ones to `vae_batch_size` (each bucket compiles once)."""
        return np.stack(videos + [np.zeros_like(videos[0])] * (self.batch - len(videos)))

    def encode(self, videos: list[np.ndarray], captions: list[str]):
        """(latents [n, t, h, w, C], text_states [n, L, D], text_mask [n, L], pooled [n, Dp]) as numpy; for an
        image-to-video model the captions are encoded with the clips' first frames as images."""
        n = len(videos)
        video = self._padded(videos)
        latents = np.asarray(self._encode_video(self.vae_params, video))[:n]
        prompts = captions + [""] * (len(video) - n)
        if self.image_condition_type is None:
            encoded = self.text.encode_prompts(prompts)
        else:
            encoded = self.text.encode_prompts(prompts, [first_frame_image(v) for v in video])
        states, mask, pooled = (np.asarray(a)[:n] for a in encoded)
        return latents, states, mask, pooled

    def image_latents(self, videos: list[np.ndarray]) -> np.ndarray:
        """[n, 1, h, w, C]: each clip's first frame encoded alone (the image latent of image-to-video)."""
        return np.asarray(self._encode_video(self.vae_params, self._padded(videos)[:, :1]))[:len(videos)]


def image_condition_type(config) -> str | None:
    """The image-to-video kind of the config's transformer (`model.image_condition_type`), None without one."""
    model = config.get("model") if hasattr(config, "get") else None
    return None if model is None else model.get("image_condition_type")


def prepare_videos(videos: str, captions: str, out: str, config, progress: bool = True,
                   encoder: "ClipEncoder | None" = None) -> dict:
    """Run the preparation (module docstring); returns the summary that is also written to `out/summary.json`.

    `encoder` (a ClipEncoder of the same config) saves building and compiling the encoders again."""
    from tqdm import tqdm

    prep = PrepareConfig.from_config(config.data.prepare)
    data = DataConfig.from_config(config.data)
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{out} holds records of schema version {manifest['schema_version']}, this code writes "
                         f"version {SCHEMA_VERSION}: prepare into a new folder")
    manifest.setdefault("buckets", [list(b) for b in prep.buckets])
    done = {sid for shard in manifest["shards"] for sid in shard["source_ids"]}
    names = sorted(p.name for p in epath.Path(videos).iterdir()
                   if p.name.lower().endswith(VIDEO_EXTENSIONS) and not p.name.startswith("."))
    caption_of = read_captions(captions)
    pending = [n for n in names if n not in done]
    skipped, written, started = [], 0, time.time()
    encoder = encoder or (ClipEncoder(config) if pending else None)
    if encoder is not None and not (epath.Path(out) / NULL_TEXT).exists():
        write_null_text(out, encoder, data)
    writer = ShardWriter(out, prep.records_per_shard, manifest)
    groups: dict[tuple[int, ...], list] = {}
    rs, rt = (encoder.vae_config.spatial_compression_ratio, encoder.vae_config.temporal_compression_ratio) \
        if encoder else (8, 4)

    def flush(shape):
        nonlocal written
        group = groups.pop(shape)
        videos = [g[1] for g in group]
        latents, states, mask, pooled = encoder.encode(videos, [g[2] for g in group])
        images = [None] * len(group) if encoder.image_condition_type is None else encoder.image_latents(videos)
        for (name, video, caption, fps), lat, st, mk, po, im in zip(group, latents, states, mask, pooled, images):
            writer.add(TokenizedClip(
                latents=lat.astype(numpy_dtype(data.latent_dtype)), text_states=st.astype(numpy_dtype(data.text_dtype)),
                text_mask=mk.astype(np.int32), pooled_text=po.astype(numpy_dtype(data.text_dtype)), caption=caption,
                source_id=name, num_frames=video.shape[0], fps=prep.fps, height=video.shape[1], width=video.shape[2],
                temporal_compression=rt, spatial_compression=rs,
                image_latent=None if im is None else im.astype(numpy_dtype(data.latent_dtype))))
            written += 1

    for name in tqdm(pending, desc="prepare", unit="video", disable=not progress):
        try:
            if name not in caption_of:
                raise SkipVideo(f"no caption in {epath.Path(captions).name}")
            video, source_fps = decode_clip(str(epath.Path(videos) / name), prep)
        except SkipVideo as e:
            skipped.append({"video": name, "reason": str(e)})
            continue
        groups.setdefault(video.shape, []).append((name, video, caption_of[name], source_fps))
        if len(groups[video.shape]) == prep.vae_batch_size:
            flush(video.shape)
    for shape in sorted(groups):
        flush(shape)
    writer.close()
    summary = {"videos": len(names), "already_prepared": len(names) - len(pending), "written": written,
               "skipped": skipped, "records_total": sum(s["records"] for s in manifest["shards"]),
               "shards_total": len(manifest["shards"]), "seconds": round(time.time() - started, 2)}
    write_json(epath.Path(out) / SUMMARY, summary)
    return summary


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    summary = prepare_videos(f.videos, f.captions, f.out, f.config)
    print(f"{summary['written']} clips written, {summary['already_prepared']} already prepared, "
          f"{len(summary['skipped'])} skipped (reasons in {epath.Path(f.out) / SUMMARY}); "
          f"{summary['records_total']} records in {summary['shards_total']} shards")
    for entry in summary["skipped"]:
        print(f"  skipped {entry['video']}: {entry['reason']}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("videos", None, "folder of videos", required=True)
    flags.DEFINE_string("captions", None, "captions: JSON lines {video, caption} or 'name<TAB>caption'",
                        required=True)
    flags.DEFINE_string("out", None, "output folder (shards, manifest.json, summary.json)", required=True)
    config_flags.DEFINE_config_file("config", "configs/demo.py", "config with data, vae and text sections")
    app.run(main)
