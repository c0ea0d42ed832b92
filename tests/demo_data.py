"""The demo's data at test size: synthetic captioned videos of moving shapes, prepared into tokenized clips with the
tiny VAE (random weights) and the demo text encoders, as `configs/demo.py` describes; 9 frames at 64x64 resized to
the 32x32 bucket, so one latent shape (one compile per program)."""

import os

from configs import demo
from hyvideo_jax.data import prepare, synthetic


def demo_config(clips: str, num_videos: int = 16):
    """configs/demo.py reading `clips`, with 9-frame 32x32 clips only (latents 3 x 4 x 4)."""
    config = demo.get_config()
    config.data.path = clips
    config.data.synthetic.num_videos = num_videos
    config.data.synthetic.frames = (12,)           # 9-frame clips at 8 fps
    config.data.synthetic.sizes = ((64, 64),)
    config.data.prepare.buckets = ((9, 32, 32),)
    return config


def make_demo_clips(folder: str, num_videos: int = 16) -> str:
    """Synthetic videos under FOLDER/videos prepared into FOLDER/clips; returns the clips folder."""
    clips = os.path.join(folder, "clips")
    config = demo_config(clips, num_videos)
    captions = synthetic.write_dataset(os.path.join(folder, "videos"), config.data.synthetic)
    prepare.prepare_videos(os.path.dirname(captions), captions, clips, config, progress=False)
    return clips
