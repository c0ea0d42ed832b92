"""Cached sampling on the demo's trained model: speed-up against quality for several thresholds of each cache.

The demo's 24 held-out captions (hyvideo_jax/demo.py) are sampled as one batch, uncached and then with the
first-block cache and MagCache (ratios calibrated here on the same captions, as `--calibrate_mag` does) at each
threshold. Per row: the steps computed, the denoising wall time against the uncached run's (each kind's program
compiled first, then timed best of --repeats), the PSNR of the decoded frames against the uncached videos, and the
caption following read back from the pixels (hyvideo_jax.caption_following).

    python -m hyvideo_jax.demo --workdir=demo_run
    python -m benchmarks.demo_cache --workdir=demo_run [--first_block=0.05,0.1,0.2] [--mag=0.03,0.06,0.12]
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from hyvideo_jax import demo  # noqa: E402
from hyvideo_jax.caption_following import caption_following  # noqa: E402
from hyvideo_jax.convert.flax_io import run_config  # noqa: E402
from hyvideo_jax.sample import Sampler  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="demo_run", help="a finished demo's workdir")
    parser.add_argument("--first_block", type=floats, default=floats("0.05,0.1,0.2"))
    parser.add_argument("--mag", type=floats, default=floats("0.03,0.06,0.12"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()
    config = run_config(args.workdir)
    scenes = demo.held_out_scenes(config)
    prompts = [s.caption for s in scenes]
    seeds = [config.demo.sample_seed + i for i in range(len(scenes))]
    sampler = Sampler.from_config(config, workdir=args.workdir)

    def timed(**overrides):
        results = [sampler.generate(prompts, seeds=seeds, **overrides) for _ in range(args.repeats)]
        return min(results, key=lambda r: r.seconds["denoise"])

    sampler.generate(prompts[:1], seeds=seeds[:1])   # compile the uncached program
    reference = timed()
    base = reference.seconds["denoise"]
    ratios = sampler.generate(prompts, seeds=seeds, calibrate_mag=True).mag_ratios
    runs = [("first_block", t, {}) for t in args.first_block]
    runs += [("mag", t, {"mag_ratios": tuple(float(r) for r in ratios[0])}) for t in args.mag]
    rows = [dict(cache="none", threshold=0.0, computed=1.0, speedup=1.0, psnr_db=float("inf"),
                 **_following(reference.videos, scenes))]
    compiled = set()
    for kind, threshold, extra in runs:
        if kind not in compiled:   # the kind's one program, compiled before timing
            sampler.generate(prompts, seeds=seeds, cache=kind, cache_threshold=threshold, **extra)
            compiled.add(kind)
        result = timed(cache=kind, cache_threshold=threshold, **extra)
        rows.append(dict(cache=kind, threshold=threshold, computed=float(result.computed.mean()),
                         speedup=base / result.seconds["denoise"],
                         psnr_db=demo.psnr(result.videos, reference.videos), **_following(result.videos, scenes)))
    steps = sampler.config.steps
    print(f"demo model ({args.workdir}), {len(prompts)} held-out captions, {steps} steps, uncached denoising "
          f"{base:.2f} s")
    print("| cache | threshold | steps computed | speed-up | PSNR vs uncached (dB) | colour | direction |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['cache']} | {r['threshold']:g} | {r['computed'] * steps:.1f} / {steps} | {r['speedup']:.2f}× | "
              f"{r['psnr_db']:.1f} | {r['colour']:.2f} | {r['direction']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _following(videos, scenes) -> dict[str, float]:
    rates = caption_following(np.asarray(videos), scenes)
    return {"colour": rates["colour"], "direction": rates["direction"]}


if __name__ == "__main__":
    main()
