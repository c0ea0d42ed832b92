"""Text → video trained from scratch on this machine, every stage with the project's own code, in minutes.

    python -m hyvideo_jax.demo --workdir=demo_run            # configs/demo.py; about 15 minutes on 2 CPU cores
    python -m hyvideo_jax.demo --workdir=demo_run --fast     # the shortened run (demo.fast)

Stages, one progress line each (everything logged goes to WORKDIR/demo.log):
  1. videos   captioned videos of moving shapes (data.synthetic) that never show the held-out (shape, colour,
              direction) combinations, one-frame stills of the same kind, and one real video per held-out caption;
  2. vae      the VAE trained by the trainer (objective "vae"): on the stills, then inflated to video
              (`vae.inflate_to_current_frame`) and trained on the clips; its PSNR on the held-out videos;
  3. clips    the training videos encoded with that VAE and the demo text encoders (data.prepare);
  4. dit      the transformer trained by flow matching (Grain, Orbax, CLU), with WORKDIR as its workdir;
  5. samples  one video per held-out caption from the sampler, and how well they follow their captions: the shape's
              colour and direction read back from the pixels (hyvideo_jax.caption_following).

WORKDIR is the transformer's training workdir, so `python -m hyvideo_jax.sample --workdir=WORKDIR`, the Colab
notebook and `python -m hyvideo_jax.convert to-torch WORKDIR ...` take it as it is. Running the command again resumes
the unfinished stage (training runs from their last checkpoint) and skips the finished ones; a workdir made with
another config is refused. The held-out captions are the 24 (colour, direction) pairs, each with a shape never
shown in that pair, so a caption's words were all seen in training, but never together.
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

SUMMARY = "summary.json"
STATE = "demo.json"
LOG = "demo.log"
SHEET = "contact_sheet.png"
CURVES = "loss.png"
STAGES = ("videos", "vae", "clips", "dit", "samples")


# ------------------------------------------------------------------------------------------------------------ data
def held_out_combinations() -> tuple[tuple[str, str, str], ...]:
    """(shape, colour, direction) for each (colour, direction) pair: shapes taken in turn, so each shape is held out
    with every colour and every direction; training sees each pair with the two other shapes."""
    from hyvideo_jax.data.synthetic import COLOURS, DIRECTIONS, SHAPES
    return tuple((SHAPES[(c + d) % len(SHAPES)], colour, direction)
                 for c, colour in enumerate(COLOURS) for d, direction in enumerate(DIRECTIONS))


def synthetic_configs(config) -> dict[str, dict[str, Any]]:
    """data.synthetic for the training clips, the stills and the held-out videos."""
    clips = dict(config.data.synthetic.to_dict(), exclude=held_out_combinations())
    stills = dict(clips, num_videos=config.demo.vae.stills.videos, frames=(1,), seed=clips["seed"] + 1000)
    held = dict(clips, exclude=(), combinations=held_out_combinations(), num_videos=len(held_out_combinations()),
                seed=config.demo.held_out_seed)
    return {"videos": clips, "stills": stills, "held_out": held}


def held_out_scenes(config):
    from hyvideo_jax.data.synthetic import SyntheticConfig, scene_of
    held = SyntheticConfig.from_config(synthetic_configs(config)["held_out"])
    return [scene_of(held, i)[0] for i in range(held.num_videos)]


def read_videos(folder: str, config) -> np.ndarray:
    """float32 [N, T, H, W, 3] in [-1, 1]: the folder's videos in caption order, decoded as data.prepare does."""
    from hyvideo_jax.data.prepare import PrepareConfig, decode_clip, read_captions
    prepare = PrepareConfig.from_config(config.data.prepare)
    names = sorted(read_captions(os.path.join(folder, "captions.jsonl")))
    return np.stack([decode_clip(os.path.join(folder, n), prepare)[0] for n in names])


def uint8_frames(video: np.ndarray) -> np.ndarray:
    return np.round(np.clip(video / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0 ** 2 / mse))


# ------------------------------------------------------------------------------------------------------- progress
class ProgressBar:
    """A tqdm bar over a run's steps that the trainer feeds as a CLU writer (it logs every train.log_every_steps)."""

    def __init__(self, label: str, total: int, initial: int):
        from tqdm import tqdm

        from hyvideo_jax.metrics import ScalarWriter
        self.bar = tqdm(total=total, initial=initial, desc=f"  {label}", unit="step", leave=False, file=sys.stdout,
                        dynamic_ncols=True, mininterval=1.0)
        bar = self.bar

        class Writer(ScalarWriter):
            def write_scalars(self, step, scalars):
                bar.update(int(step) - bar.n)
                if "loss" in scalars:
                    bar.set_postfix(loss=f"{float(scalars['loss']):.4f}")
        self.writer = Writer()

    def close(self):
        self.bar.close()


def latest_step(workdir: str) -> int:
    from hyvideo_jax.convert.flax_io import checkpoint_steps
    steps = checkpoint_steps(workdir)
    return steps[-1] if steps else 0


def train_run(config, workdir: str, label: str):
    """The trainer on `config` in `workdir` up to train.num_steps (resumed; nothing to do when it got there)."""
    from hyvideo_jax import train
    done = latest_step(workdir)
    if done >= config.train.num_steps:
        return
    progress = ProgressBar(label, config.train.num_steps, done)
    try:
        state = train.train_and_evaluate(config, workdir, writers=[progress.writer])
    finally:
        progress.close()
    if int(state.step) < config.train.num_steps:   # stopped by SIGTERM: saved, so the next start resumes there
        raise SystemExit(f"{label}: stopped at step {int(state.step)} of {config.train.num_steps} (saved); run the "
                         f"same command again to resume")


# ------------------------------------------------------------------------------------------------------------ stages
@dataclasses.dataclass
class Demo:
    """The stages over one config and workdir; each returns what it measured (kept in WORKDIR/demo.json)."""
    config: Any
    workdir: str

    def path(self, *names) -> str:
        return os.path.join(self.workdir, *names)

    def videos(self) -> dict:
        from hyvideo_jax.data.synthetic import write_dataset
        counts = {}
        for name, synthetic in synthetic_configs(self.config).items():
            write_dataset(self.path(name), synthetic)
            counts[name] = synthetic["num_videos"]
        return counts

    def vae_config(self, part: str):
        """The run config of a VAE stage: `part` "stills" (one-frame bucket) or "clips" (the clips' buckets)."""
        settings = self.config.demo.vae[part]
        config = self.config.copy_and_resolve_references()
        config.train.update(objective="vae", num_steps=settings.steps, learning_rate=settings.learning_rate,
                            warmup_steps=0, ema_decay=0.0, eval_every_steps=0,
                            log_every_steps=self.config.demo.vae.log_every_steps,
                            checkpoint_every_steps=self.config.demo.vae.checkpoint_every_steps,
                            init_from=self.path("vae_stills") if part == "clips" else "",
                            compilation_cache_dir=self.path("compilation_cache"))
        config.data.update(source="videos", path=self.path("stills" if part == "stills" else "videos"),
                           global_batch_size=settings.batch_size, eval_fraction=0.0, caption_dropout=0.0,
                           video_index=self.path(f"vae_{part}_run", "video_index.json"))
        frames = 1 if part == "stills" else settings.frames
        config.data.prepare.buckets = tuple((frames, h, w) for _, h, w in config.data.prepare.buckets)
        return config

    def export_vae(self, run: str, folder: str, inflate: bool = False):
        import jax

        from hyvideo_jax.convert.flax_io import save_flax_model, training_params
        from hyvideo_jax.models.vae import VAEConfig, inflate_to_current_frame, init_params
        vae = VAEConfig.from_config(self.config.vae.model)
        targets = jax.eval_shape(lambda: init_params(vae, jax.random.PRNGKey(0)))
        params, _ = training_params(run, targets)
        save_flax_model(folder, "vae", vae.to_dict(), inflate_to_current_frame(params) if inflate else params)

    def vae(self) -> dict:
        from hyvideo_jax.convert.flax_io import is_flax_model
        stills, clips = self.vae_config("stills"), self.vae_config("clips")
        train_run(stills, self.path("vae_stills_run"), "VAE on stills")
        if not is_flax_model(self.path("vae_stills")):
            self.export_vae(self.path("vae_stills_run"), self.path("vae_stills"), inflate=True)
        if clips.train.num_steps:
            train_run(clips, self.path("vae_clips_run"), "VAE on clips")
            self.export_vae(self.path("vae_clips_run"), self.path("vae"))
        else:   # demo.vae.clips.steps 0: the inflated stills VAE is the video VAE
            self.export_vae(self.path("vae_stills_run"), self.path("vae"), inflate=True)
        return self.vae_quality()

    def vae_quality(self) -> dict:
        """PSNR of the VAE's reconstructions of the held-out videos, and the caption following read from them."""
        import jax

        from hyvideo_jax.caption_following import caption_following
        from hyvideo_jax.convert.vae import load_vae
        from hyvideo_jax.models.vae import HunyuanVideoVAE
        from hyvideo_jax.models.vae_tiling import decode_latents, encode_video
        vae_config, params = load_vae(self.path("vae"))
        model = HunyuanVideoVAE(vae_config)
        roundtrip = jax.jit(lambda p, v: decode_latents(model, p, encode_video(model, p, v)))
        videos = read_videos(self.path("held_out"), self.config)
        real = uint8_frames(videos)
        recon = np.concatenate([uint8_frames(np.asarray(roundtrip(params, v[None]), np.float32)) for v in videos])
        rates = caption_following(recon, held_out_scenes(self.config))
        return {"psnr_db": psnr(recon, real), "colour": rates["colour"], "direction": rates["direction"]}

    def run_config(self):
        """The transformer run's config: the demo's, reading the prepared clips and the trained VAE."""
        config = self.config.copy_and_resolve_references()
        config.data.path = self.path("clips")
        config.data.prepare.vae_checkpoint = self.path("vae")
        config.train.compilation_cache_dir = self.path("compilation_cache")
        return config

    def clips(self) -> dict:
        from hyvideo_jax.data import prepare
        summary = prepare.prepare_videos(self.path("videos"), self.path("videos", "captions.jsonl"),
                                         self.path("clips"), self.run_config(), progress=False)
        if summary["written"] + summary.get("already_prepared", 0) == 0:
            raise RuntimeError(f"no clip was prepared from {self.path('videos')}: {summary['skipped'][:3]}")
        return {k: summary[k] for k in ("videos", "written", "already_prepared") if k in summary}

    def dit(self) -> dict:
        from hyvideo_jax.metrics import read_metrics
        config = self.run_config()
        train_run(config, self.workdir, "transformer")
        rows = read_metrics(self.workdir)
        losses = [rows[s]["loss"] for s in sorted(rows) if "loss" in rows[s]]
        out = {"steps": config.train.num_steps, "first_loss": losses[0], "final_loss": losses[-1]}
        final = rows.get(config.train.num_steps, {})
        if "eval/loss" in final:
            out["validation_loss"] = final["eval/loss"]
        return out

    def samples(self) -> dict:
        from hyvideo_jax.caption_following import caption_following
        from hyvideo_jax.sample import Sampler, write_outputs
        config = self.run_config()
        scenes = held_out_scenes(self.config)
        sampler = Sampler.from_config(config, workdir=self.workdir)
        seeds = [self.config.demo.sample_seed + i for i in range(len(scenes))]
        result = sampler.generate([s.caption for s in scenes], seeds=seeds, videos_per_prompt=1)
        write_outputs(result, self.path("samples", "sample.mp4"), sampler.config.fps, save_latents=True)
        rates = caption_following(result.videos, scenes)
        real = uint8_frames(read_videos(self.path("held_out"), self.config))
        write_contact_sheet(self.path(SHEET), real, result.videos, scenes, rates["read"])
        write_curves(self.path(CURVES), self.workdir)
        return {"colour": rates["colour"], "direction": rates["direction"], "videos": rates["videos"],
                "read": rates["read"], "captions": [s.caption for s in scenes]}


# ------------------------------------------------------------------------------------------------------- pictures
def write_contact_sheet(path: str, real: np.ndarray, sampled: np.ndarray, scenes, read, columns: int = 5):
    """A PNG: per held-out caption, frames of the real video beside the sampled one's, labelled with the caption's
    colour / direction and what was read from the sample."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hyvideo_jax.evaluate import contact_sheet
    gap = np.full((real.shape[0] * real.shape[2], 4, 3), 255, np.uint8)
    sheet = np.concatenate([contact_sheet(real, columns), gap, contact_sheet(sampled, columns)], axis=1)
    height = real.shape[2]
    fig, ax = plt.subplots(figsize=(sheet.shape[1] / 40 + 3.0, sheet.shape[0] / 40 + 0.8), dpi=100)
    ax.imshow(sheet, interpolation="nearest")
    ax.set_yticks([height * (i + 0.5) for i in range(len(scenes))])
    ax.set_yticklabels([f"{s.colour} {s.shape} {s.direction}  →  {c or '?'} {d or '?'}"
                        for s, (c, d) in zip(scenes, read)], fontsize=7)
    ax.set_xticks([sheet.shape[1] * 0.25, sheet.shape[1] * 0.75])
    ax.set_xticklabels(["real (held-out caption)", "sampled"])
    ax.tick_params(length=0)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_curves(path: str, workdir: str):
    """A PNG of the training losses: the VAE's two runs and the transformer's (with its validation loss)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hyvideo_jax.metrics import read_metrics

    def curve(ax, rows, key, label, offset=0, style="-"):
        steps = sorted(s for s, row in rows.items() if key in row)
        if steps:
            ax.plot([s + offset for s in steps], [rows[s][key] for s in steps], style, label=label)
        return steps[-1] if steps else 0

    fig, (vae_ax, dit_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    last = curve(vae_ax, read_metrics(os.path.join(workdir, "vae_stills_run")), "loss", "stills")
    curve(vae_ax, read_metrics(os.path.join(workdir, "vae_clips_run")), "loss", "clips", offset=last)
    vae_ax.set(title="VAE", xlabel="step", ylabel="loss", yscale="log")
    rows = read_metrics(workdir)
    curve(dit_ax, rows, "loss", "training")
    curve(dit_ax, rows, "eval/loss", "validation (held-out clips)", style="o")
    dit_ax.set(title="transformer (flow matching)", xlabel="step", ylabel="loss")
    for ax in (vae_ax, dit_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ driver
def merge(config, overrides: dict):
    """`overrides` (nested dicts) written into `config` key by key; an unknown key fails."""
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"demo.fast: {key} is not a config field")
        if isinstance(value, dict):
            merge(config[key], value)
        else:
            config[key] = value


def demo_config(config, fast: bool):
    config = config.copy_and_resolve_references()
    if fast:
        merge(config, config.demo.fast.to_dict())
    return config


def check_workdir(workdir: str, config) -> dict:
    """The workdir's stage record; a workdir started with another config is refused (naming what differs)."""
    from etils import epath

    from hyvideo_jax.train import flatten
    path = epath.Path(workdir) / STATE
    wanted = json.loads(json.dumps(config.to_dict(), default=list))
    if not path.exists():
        return {"config": wanted, "stages": {}}
    state = json.loads(path.read_text())
    before, now = flatten(state["config"]), flatten(wanted)
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in differ[:6])
        raise SystemExit(f"{workdir} was started with another config ({shown}{', ...' if len(differ) > 6 else ''}); "
                         f"give a new --workdir or the same config")
    return state


@contextlib.contextmanager
def logs_to(path: str):
    """Logging (absl, Python, warnings) and everything written to the process's stderr (XLA's and TensorFlow's C++
    logs too) into `path` instead of the terminal, for the duration; stdout stays the terminal's."""
    import logging as py_logging

    from absl import logging
    handler = logging.get_absl_handler()
    stream = open(path, "a")
    previous = handler.python_handler.stream
    handler.python_handler.stream = stream
    logging.set_verbosity(logging.INFO)
    py_logging.captureWarnings(True)
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    os.dup2(stream.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        handler.python_handler.stream = previous
        py_logging.captureWarnings(False)
        stream.close()


def run(config, workdir: str, *, fast: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Every stage in `workdir` (resuming); returns the summary also written to WORKDIR/summary.json."""
    from etils import epath

    from hyvideo_jax.compilation import use_compilation_cache
    config = demo_config(config, fast)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    state = check_workdir(workdir, config)
    demo = Demo(config, os.path.abspath(workdir))   # absolute: the run's config.json names the VAE and the clips
    echo(f"hyvideo_jax demo{' (fast)' if fast else ''} in {workdir}; details in {os.path.join(workdir, LOG)}")
    start = time.perf_counter()
    with logs_to(os.path.join(workdir, LOG)):
        use_compilation_cache(demo.path("compilation_cache"))
        for number, name in enumerate(STAGES, 1):
            label = f"[{number}/{len(STAGES)}] {name:<8}"
            if name in state["stages"]:
                echo(f"{label} done earlier ({state['stages'][name]['seconds']:.0f} s): "
                     f"{describe(name, state['stages'][name])}")
                continue
            echo(f"{label} ...")
            began = time.perf_counter()
            result = getattr(demo, name)()
            result["seconds"] = time.perf_counter() - began
            state["stages"][name] = result
            epath.Path(workdir, STATE).write_text(json.dumps(state, indent=1))
            echo(f"{label} {result['seconds']:.0f} s: {describe(name, result)}")
    summary = {"workdir": workdir, "fast": fast, "seconds": {k: v["seconds"] for k, v in state["stages"].items()},
               "this_run_seconds": time.perf_counter() - start,
               "vae": state["stages"]["vae"], "dit": state["stages"]["dit"],
               "caption_following": {k: state["stages"]["samples"][k] for k in ("colour", "direction", "videos")},
               "artifacts": artifacts(workdir)}
    epath.Path(workdir, SUMMARY).write_text(json.dumps(summary, indent=1))
    echo(f"done in {sum(summary['seconds'].values()) / 60:.1f} min of stages "
         f"({summary['this_run_seconds'] / 60:.1f} min this run). Artifacts:")
    for what, where in summary["artifacts"].items():
        echo(f"  {what:<22} {where}")
    return summary


def describe(stage: str, result: dict) -> str:
    if stage == "videos":
        return (f"{result['videos']} training videos, {result['stills']} stills, {result['held_out']} held-out "
                f"captions")
    if stage == "vae":
        return (f"held-out reconstructions {result['psnr_db']:.1f} dB PSNR, colour {result['colour']:.2f}, "
                f"direction {result['direction']:.2f}")
    if stage == "clips":
        return f"{result['written'] + result.get('already_prepared', 0)} clips"
    if stage == "dit":
        extra = f", validation {result['validation_loss']:.4f}" if "validation_loss" in result else ""
        return f"{result['steps']} steps, loss {result['first_loss']:.4f} → {result['final_loss']:.4f}{extra}"
    return (f"held-out captions followed: colour {result['colour']:.2f}, direction {result['direction']:.2f} "
            f"({result['videos']} videos)")


def artifacts(workdir: str) -> dict[str, str]:
    return {"sampled videos": os.path.join(workdir, "samples", "sample_000.mp4") + " ...",
            "contact sheet": os.path.join(workdir, SHEET), "loss curves": os.path.join(workdir, CURVES),
            "TensorBoard logs": workdir, "checkpoint (workdir)": os.path.join(workdir, "checkpoints"),
            "trained VAE": os.path.join(workdir, "vae"), "summary": os.path.join(workdir, SUMMARY),
            "log": os.path.join(workdir, LOG)}


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run(flags.FLAGS.config, flags.FLAGS.workdir, fast=flags.FLAGS.fast)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", "demo_run", "Folder of every stage's output; the transformer's training workdir.")
    flags.DEFINE_bool("fast", False, "The shortened run (the config's demo.fast), as the tests run it.")
    config_flags.DEFINE_config_file("config", "configs/demo.py", "The demo's config (configs/demo.py).")
    app.run(main)
