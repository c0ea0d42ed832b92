"""Does a video show what its caption says? Two measurable proxies for the synthetic scenes (data/synthetic.py):
the colour of the moving shape and the direction it moves in, read back from the pixels.

    colour, direction = read_scene(video)            # uint8 [F, H, W, 3] → ("red", "left"), None when unreadable
    rates = caption_following(videos, scenes)        # {"colour": 0.9, "direction": 0.8, "videos": 24}

Per frame, the background is the median colour (the shape covers less than half of the frame: a huge square about
a third) and the shape is every pixel farther than `threshold` from it. The colour is the named colour
(`synthetic.COLOURS`) nearest to most shape pixels of the whole video; the direction is the one
(`synthetic.DIRECTIONS`) closest to the shift of the shape's centroid from the first third of the frames to the last
third, when that shift is at least `min_shift` pixels. Chance levels for a model that ignores its captions are 1/6
(colour) and 1/4 (direction) on captions that cover the colours and directions evenly.
"""

from typing import Sequence

import numpy as np

from hyvideo_jax.data.synthetic import COLOURS, DIRECTIONS, Scene

THRESHOLD = 70.0     # RGB distance from the background that counts as the shape (the closest pair, purple on
                     # gray, is 112 apart; H.264's blurred edges fall below it)
MIN_SHIFT = 1.0      # pixels the centroid must move for a direction to be read


def shape_masks(video: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """bool [F, H, W]: the pixels of each frame farther than `threshold` from that frame's median colour."""
    frames = np.asarray(video, np.float32)
    background = np.median(frames.reshape(frames.shape[0], -1, 3), axis=1)[:, None, None, :]
    return np.linalg.norm(frames - background, axis=-1) > threshold


def dominant_colour(video: np.ndarray, masks: np.ndarray) -> str | None:
    """The named colour nearest to the most shape pixels (None without any)."""
    pixels = np.asarray(video, np.float32)[masks]
    if not len(pixels):
        return None
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], np.float32)
    nearest = np.argmin(np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1), axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def motion(masks: np.ndarray, min_shift: float = MIN_SHIFT) -> tuple[str | None, np.ndarray]:
    """(direction or None, the centroid's shift (dy, dx) in pixels) from the first third of the frames to the last
    third (frames without shape pixels left out)."""
    frames = masks.shape[0]
    third = max(frames // 3, 1)
    yy, xx = np.mgrid[0:masks.shape[1], 0:masks.shape[2]]

    def centroid(part):
        points = [(yy[m].mean(), xx[m].mean()) for m in part if m.any()]
        return np.mean(points, axis=0) if points else None
    start, end = centroid(masks[:third]), centroid(masks[frames - third:])
    if start is None or end is None or frames < 2:
        return None, np.zeros(2)
    shift = end - start
    if np.linalg.norm(shift) < min_shift:
        return None, shift
    names = list(DIRECTIONS)
    return names[int(np.argmax([shift @ np.asarray(DIRECTIONS[n], np.float64) for n in names]))], shift


def read_scene(video: np.ndarray, threshold: float = THRESHOLD, min_shift: float = MIN_SHIFT
               ) -> tuple[str | None, str | None]:
    """(colour, direction) of the moving shape in uint8 video [F, H, W, 3]; None for what cannot be read."""
    masks = shape_masks(video, threshold)
    return dominant_colour(video, masks), motion(masks, min_shift)[0]


def caption_following(videos: Sequence[np.ndarray], scenes: Sequence[Scene]) -> dict[str, float]:
    """{"colour": share of videos whose shape has its scene's colour, "direction": share moving in its scene's
    direction, "videos": count}, and per video what was read ("read": [[colour, direction], ...])."""
    if len(videos) != len(scenes) or not len(videos):
        raise ValueError(f"need one scene per video and at least one video, got {len(videos)} videos and "
                         f"{len(scenes)} scenes")
    read = [read_scene(v) for v in videos]
    return {"colour": float(np.mean([c == s.colour for (c, _), s in zip(read, scenes)])),
            "direction": float(np.mean([d == s.direction for (_, d), s in zip(read, scenes)])),
            "videos": len(videos), "read": [list(r) for r in read]}
