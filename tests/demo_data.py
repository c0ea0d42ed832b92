"""The demo's data at test size: synthetic captioned videos of moving shapes, prepared into tokenized clips with the
tiny VAE (random weights) and the demo text encoders, as `configs/demo.py` describes; 9 frames at 64x64 resized to
the 32x32 bucket, so one latent shape (one compile per program)."""

import os

from configs import demo, tiny
from hyvideo_jax.data import prepare, synthetic


def demo_config(clips: str, num_videos: int = 16):
    """configs/demo.py's data, text encoders and VAE reading `clips`, with 9-frame 32x32 clips only (latents
    3 x 4 x 4), and the tiny transformer's model, training, flow and sampling settings (configs/tiny.py): what the
    tests train is small, and neither caption dropout nor held-out clips are on unless a test sets them."""
    config = demo.get_config()
    base = tiny.get_config()
    for section in ("model", "train", "flow", "sample"):
        config[section] = base[section]
    config.data.update(caption_dropout=0.0, eval_fraction=0.0, global_batch_size=4)
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
