"""Videos + captions → ArrayRecord shards of tokenized clips (VAE latents + text states), resumable.

    python -m hyvideo_jax.data.prepare --videos=DIR --captions=FILE --out=DIR --config=configs/demo.py

For each video (sorted by file name) with a caption: decode (PyAV), sample frames at `data.prepare.fps`, pick a
bucket (below), resize to cover the bucket's frame and centre-crop, scale pixels to [-1, 1]; then, in batches of
`vae_batch_size` clips of one bucket, encode with the VAE (jitted; tiled when larger than a tile; posterior mean,
scaled) and the text encoders, and write one record per clip (`hyvideo_jax.data.schema`).

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
__all__ = ["SUMMARY", "read_captions", "ShardWriter", "write_null_text", "ClipEncoder", "prepare_videos", "main",
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
    states, mask, pooled = (np.asarray(a)[0] for a in encoder.text.encode_prompts([""]))
    as_records = lambda a: a.astype(numpy_dtype(data.text_dtype)).astype(np.float32)  # noqa: E731
    buffer = io.BytesIO()
    np.savez(buffer, text_states=as_records(states), text_mask=mask.astype(np.int32), pooled_text=as_records(pooled))
    tmp = epath.Path(out) / (NULL_TEXT + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(epath.Path(out) / NULL_TEXT)


# ------------------------------------------------------------------------------------------------------ encoding
class ClipEncoder:
    """The VAE and the text encoders of a config, jitted; `encode(videos, captions)` for one bucket's batch."""

    def __init__(self, config):
        import jax

        from hyvideo_jax.convert.vae import load_vae
        from hyvideo_jax.models.vae import HunyuanVideoVAE
        from hyvideo_jax.models.vae_tiling import encode_video
        from hyvideo_jax.text import TextEncoders

        prep = PrepareConfig.from_config(config.data.prepare)
        self.data = DataConfig.from_config(config.data)
        self.batch = prep.vae_batch_size
        vae_config, params = load_vae(prep.vae_checkpoint, config.vae.model, prep.vae_seed)
        self.vae_config, self.vae_params = vae_config, params
        model = HunyuanVideoVAE(vae_config)
        self._encode_video = jax.jit(lambda p, v: encode_video(model, p, v))
        self.text = TextEncoders.from_config(config.text)

    def encode(self, videos: list[np.ndarray], captions: list[str]):
        """(latents [n, t, h, w, C], text_states [n, L, D], text_mask [n, L], pooled [n, Dp]) as numpy; the batch
        is padded to `vae_batch_size` so that each bucket compiles once."""
        n = len(videos)
        pad = self.batch - n
        video = np.stack(videos + [np.zeros_like(videos[0])] * pad)
        latents = np.asarray(self._encode_video(self.vae_params, video))[:n]
        states, mask, pooled = (np.asarray(a)[:n] for a in self.text.encode_prompts(captions + [""] * pad))
        return latents, states, mask, pooled


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
        latents, states, mask, pooled = encoder.encode([g[1] for g in group], [g[2] for g in group])
        for (name, video, caption, fps), lat, st, mk, po in zip(group, latents, states, mask, pooled):
            writer.add(TokenizedClip(
                latents=lat.astype(numpy_dtype(data.latent_dtype)), text_states=st.astype(numpy_dtype(data.text_dtype)),
                text_mask=mk.astype(np.int32), pooled_text=po.astype(numpy_dtype(data.text_dtype)), caption=caption,
                source_id=name, num_frames=video.shape[0], fps=prep.fps, height=video.shape[1], width=video.shape[2],
                temporal_compression=rt, spatial_compression=rs))
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
