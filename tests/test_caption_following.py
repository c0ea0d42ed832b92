"""The caption-following proxies read back what the synthetic renderer drew: every (colour, direction) of rendered
scenes, after H.264 as the sampler writes them; a video of noise or of a still shape reads as neither."""

import os

import numpy as np
import pytest

from hyvideo_jax.caption_following import caption_following, read_scene
from hyvideo_jax.data import synthetic


def scenes():
    """Every colour and direction on both backgrounds, sizes and speeds cycling."""
    out = []
    for i, (colour, direction) in enumerate((c, d) for c in synthetic.COLOURS for d in synthetic.DIRECTIONS):
        out.append(synthetic.Scene(synthetic.SHAPES[i % 3], colour, list(synthetic.SIZES)[i % 2], direction,
                                   list(synthetic.SPEEDS)[(i // 2) % 2], list(synthetic.BACKGROUNDS)[(i // 3) % 2]))
    return out


def roundtrip(video: np.ndarray, tmp_path, name: str) -> np.ndarray:
    import av
    path = os.path.join(tmp_path, name)
    synthetic.write_mp4(path, video, 8.0)
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("frames,size", [(5, 32), (9, 64)])
def test_reads_rendered_scenes(tmp_path, frames, size):
    cases = scenes()
    videos = [roundtrip(synthetic.render(s, frames, size, size, offset=0.2), tmp_path, f"{i}.mp4")
              for i, s in enumerate(cases)]
    rates = caption_following(videos, cases)
    wrong = [(s.caption, r) for s, r in zip(cases, rates["read"]) if r != [s.colour, s.direction]]
    assert rates["colour"] == 1.0 and rates["direction"] == 1.0, wrong
    # Captions that say otherwise score 0: the proxies compare against the caption, not only read the pixels.
    shuffled = [synthetic.Scene(s.shape, cases[(i + 1) % len(cases)].colour, s.size,
                                cases[(i + 4 * 1) % len(cases)].direction, s.speed, s.background)
                for i, s in enumerate(cases)]
    mismatched = caption_following(videos, shuffled)
    assert mismatched["colour"] == np.mean([a.colour == b.colour for a, b in zip(cases, shuffled)])


def test_noise_and_still_shapes_read_as_nothing():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    assert read_scene(noise)[1] is None       # no coherent shape moves
    still = synthetic.render(scenes()[0], 1, 32, 32).repeat(5, axis=0)
    assert read_scene(still) == (scenes()[0].colour, None)
    flat = np.full((5, 32, 32, 3), 110, np.uint8)
    assert read_scene(flat) == (None, None)
    with pytest.raises(ValueError, match="one scene per video"):
        caption_following([flat], [])


def test_captions_parse_back_to_their_scenes():
    cases = scenes()
    assert [synthetic.Scene.from_caption(s.caption) for s in cases] == cases
    words = set(synthetic.vocabulary())
    assert all(set(s.caption.split()) <= words for s in cases) and len(words) == len(synthetic.vocabulary())
    for bad in ("a large red circle moving left quickly on a black sky", "a tiny red circle moving left quickly "
                "on a black background", "a red circle"):
        with pytest.raises(ValueError, match="not a synthetic caption"):
            synthetic.Scene.from_caption(bad)
