"""Video decoding shared by prepare (clips to encode) and `VideoFileSource` (the VAE objective's pixels), so that
both see exactly the same frames: decode with PyAV, sample at `data.prepare.fps`, resize to cover a bucket and
centre-crop, scale to [-1, 1]; `probe_clip` gives the resulting shape without converting any pixels.

Buckets are pixel sizes (frames, height, width) with frames 4k+1. A video goes to the spatial size whose aspect
ratio is closest to its own (the larger one on ties), and to the longest bucket of that size that its duration
fills; the clip starts at the video's first frame. Frame sampling takes, for each time k/fps, the last decoded
frame shown at or before it.
"""

import math
from typing import Sequence

import numpy as np

from hyvideo_jax.data.config import PrepareConfig

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif")


class SkipVideo(Exception):
    """A video that is not turned into a record; the message is the reason given in the summary."""


def choose_size(height: int, width: int, buckets: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect ratio is closest to height:width in log scale (larger area on ties)."""
    sizes = sorted({(b[1], b[2]) for b in buckets}, key=lambda s: -s[0] * s[1])
    return min(sizes, key=lambda s: abs(math.log(s[1] / s[0]) - math.log(width / height)))


def resize_crop(frame, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3] from a PyAV VideoFrame: scaled (bicubic) to cover the size, centre-cropped."""
    scale = max(height / frame.height, width / frame.width)
    rh, rw = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    rgb = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="BICUBIC").to_ndarray()
    top, left = (rh - height) // 2, (rw - width) // 2
    return rgb[top:top + height, left:left + width]


def _read_clip(path: str, config: PrepareConfig, pixels: bool) -> tuple[list, tuple[int, int], int, float]:
    """(frames at `config.fps`, bucket (height, width), bucket length, source fps). Frames are uint8 arrays, or
    None each when `pixels` is False: then frames are decoded only for their times, never converted, which is what
    the bucket shape needs and several times cheaper."""
    import av
    from etils import epath

    from hyvideo_jax.paths import is_cloud
    try:   # a cloud file streams through a Python file object (ffmpeg cannot open gs:// itself)
        with av.open(epath.Path(path).open("rb") if is_cloud(path) else path) as container:
            if not container.streams.video:
                raise SkipVideo("no video stream")
            stream = container.streams.video[0]
            size = choose_size(stream.codec_context.height, stream.codec_context.width, config.buckets)
            lengths = sorted(b[0] for b in config.buckets if (b[1], b[2]) == size)
            source_fps = float(stream.average_rate or 0.0)
            frames, last_time = [], None
            previous, seen = None, False
            for frame in container.decode(stream):
                t = float(frame.time if frame.time is not None else len(frames) / max(source_fps, 1e-6))
                # Target k (time k/fps) shows the last frame at or before it: emit `previous` for targets before t.
                while seen and len(frames) < lengths[-1] and len(frames) / config.fps < t - 1e-6:
                    frames.append(previous)
                if len(frames) >= lengths[-1]:
                    break
                previous, last_time, seen = resize_crop(frame, *size) if pixels else None, t, True
            if seen and len(frames) < lengths[-1]:
                # The last frame stays on screen for one source frame period.
                end = last_time + (1.0 / source_fps if source_fps > 0 else 0.0)
                while len(frames) < lengths[-1] and len(frames) / config.fps < end - 1e-6:
                    frames.append(previous)
    except SkipVideo:
        raise
    except Exception as e:  # any decoder failure (corrupt data, unknown format) skips the video
        raise SkipVideo(f"unreadable video ({type(e).__name__}: {str(e)[:200]})") from None
    if not frames:
        raise SkipVideo("no decodable frames")
    fitting = [n for n in lengths if n <= len(frames)]
    if not fitting:
        raise SkipVideo(f"too short: {len(frames)} frames at {config.fps:g} fps, the shortest {size[0]}x{size[1]} "
                        f"bucket needs {lengths[0]}")
    return frames[:fitting[-1]], size, fitting[-1], source_fps


def decode_clip(path: str, config: PrepareConfig) -> tuple[np.ndarray, float]:
    """(video [T, H, W, 3] float32 in [-1, 1] of the chosen bucket, source fps); SkipVideo with a reason."""
    frames, _, _, source_fps = _read_clip(path, config, pixels=True)
    return np.stack(frames).astype(np.float32) / 127.5 - 1.0, source_fps


def probe_clip(path: str, config: PrepareConfig) -> tuple[int, int, int]:
    """The (frames, height, width) of `decode_clip(path, config)`'s video, or the same SkipVideo, without
    converting any pixels."""
    _, (height, width), length, _ = _read_clip(path, config, pixels=False)
    return length, height, width
