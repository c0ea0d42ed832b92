"""The embedded demo: the tiny model trained on procedural videos of moving shapes, prepared on this machine.

    python -m hyvideo_jax.data.synthetic --config=configs/demo.py --out=demo_data/videos
    python -m hyvideo_jax.data.prepare --config=configs/demo.py --videos=demo_data/videos \\
        --captions=demo_data/videos/captions.jsonl --out=demo_data/clips

Everything is CPU-sized: 64x64 / 32x64 source videos resized to 32x32 and 16x32 buckets (each one VAE tile) of 9 or
17 frames at 8 fps, the tiny VAE (random weights unless data.prepare.vae_checkpoint is set) and the demo text
encoders, whose byte-level tokenizers need `text_len` ≥ the longest caption + 1 (about 70 for the synthetic captions).
"""

from configs import tiny


def get_config():
    config = tiny.get_config()
    config.text.text_len = 80
    config.text.clip_len = 80
    config.data.source = "arrayrecord"
    config.data.path = "demo_data/clips"
    config.data.global_batch_size = 4
    config.data.text_len = config.text.text_len
    config.data.prepare.buckets = ((9, 32, 32), (17, 32, 32), (9, 16, 32), (17, 16, 32))
    config.data.prepare.records_per_shard = 32
    config.data.prepare.vae_batch_size = 4
    config.data.synthetic.num_videos = 64
    config.data.synthetic.sizes = ((64, 64), (32, 64))
    config.data.synthetic.frames = (12, 20)       # at 8 fps: 9- and 17-frame clips
    return config
