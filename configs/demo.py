"""The embedded demo: text → video trained from scratch on this machine (hyvideo_jax/demo.py runs every stage).

    python -m hyvideo_jax.demo --workdir=demo_run            # about 15 minutes on 2 CPU cores
    python -m hyvideo_jax.demo --workdir=demo_run --fast     # the shortened run the tests use

Everything is CPU-sized: procedural 64x64 videos of one large shape on black, resized to 32x32 clips of 9 frames at
8 fps (one VAE tile; latents 3 x 4 x 4, 12 image tokens); the tiny VAE trained on them; the demo text encoders,
whose byte-level tokenizers have the captions' words as whole tokens (so `text_len` 16 holds a caption); and a
128-wide tiny transformer. The config is the transformer run's; `demo` says how the demo makes the rest.

The stages alone, as the demo runs them:
    python -m hyvideo_jax.data.synthetic --config=configs/demo.py --out=demo_data/videos
    python -m hyvideo_jax.data.prepare --config=configs/demo.py --videos=demo_data/videos \\
        --captions=demo_data/videos/captions.jsonl --out=demo_data/clips
    python -m hyvideo_jax.train --config=configs/demo.py --workdir=demo_data/run
"""

import ml_collections

from configs import tiny
from hyvideo_jax.data import synthetic


def get_config():
    config = tiny.get_config()
    config.model.update(hidden_size=128, rope_axes_dim=(8, 12, 12))   # 4 heads of 32
    config.text.words = synthetic.vocabulary()
    config.text.text_len = 16
    config.text.clip_len = 16
    config.data.source = "arrayrecord"
    config.data.path = "demo_data/clips"
    config.data.global_batch_size = 8
    config.data.text_len = config.text.text_len
    config.data.caption_dropout = 0.1        # the empty prompt, for true CFG when sampling
    config.data.eval_fraction = 0.05         # held-out training clips: the validation loss
    config.data.prepare.buckets = ((9, 32, 32),)
    config.data.prepare.records_per_shard = 64
    config.data.prepare.vae_batch_size = 8
    config.data.synthetic.update(num_videos=1024, sizes=((64, 64),), frames=(9,), fps=8.0)
    config.data.synthetic.shape_sizes = ("huge",)
    config.data.synthetic.speeds = ("quickly",)
    config.data.synthetic.backgrounds = ("black",)
    config.vae.loss.l2_weight = 1.0          # the squared error keeps the small shape's pixels in the gradient
    config.flow.shift = 12.0                 # σ drawn towards noise: where colour and direction are decided
    config.train.update(num_steps=3000, learning_rate=2e-3, warmup_steps=50, ema_decay=0.99, log_every_steps=25,
                        checkpoint_every_steps=500)
    config.sample.update(steps=20, shift=12.0, progress=False)   # true CFG 1: the colours stay the captioned ones
    config.demo = ml_collections.ConfigDict(dict(
        # The VAE: first on stills (one-frame videos of the same scenes), then, inflated to video
        # (vae.inflate_to_current_frame), on the training clips cut to `frames` (4k + 1; the causal VAE is
        # convolutional in time, so it codes the 9-frame clips as well); clips steps 0 keeps the inflated VAE.
        vae=ml_collections.ConfigDict(dict(
            stills=ml_collections.ConfigDict(dict(videos=1024, steps=1500, learning_rate=1e-3, batch_size=8)),
            clips=ml_collections.ConfigDict(dict(steps=300, learning_rate=5e-4, batch_size=4, frames=5)),
            log_every_steps=25, checkpoint_every_steps=200)),
        held_out_seed=1,       # the held-out videos' scenes (sizes, offsets); their combinations are fixed
        sample_seed=0,         # held-out sample n uses seed sample_seed + n
        # --fast: a shortened run (the tests'); the same keys as above.
        fast=ml_collections.ConfigDict(dict(
            data=dict(synthetic=dict(num_videos=256)),
            train=dict(num_steps=1000, warmup_steps=20, checkpoint_every_steps=500),
            demo=dict(vae=dict(stills=dict(videos=256, steps=800), clips=dict(steps=50)))))))
    return config
