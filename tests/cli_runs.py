"""Helpers for tests that run the training CLI in subprocesses: start it (or run its config in this process), signal it
once a step is logged, read its final checkpoint."""

import os
import re
import socket
import subprocess
import sys
import time

import jax
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from hyvideo_jax import train
from hyvideo_jax.parallel.mesh import create_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((2, 4, 4), (2, 4, 8))


def overrides(steps: int, shapes=SHAPES) -> list[str]:
    """Flags for a short run of configs/tiny.py on random clips of latent `shapes` (one compile each)."""
    return [f"--config.train.num_steps={steps}", "--config.train.checkpoint_every_steps=3",
            f"--config.data.random_latent_shapes={tuple(shapes)}".replace(" ", ""), "--config.data.random_records=12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir: str, cache_dir: str | None, args: list[str], devices: int = 8, log_name: str | None = None):
    """`python -m hyvideo_jax.train` on configs/tiny.py with `devices` simulated CPU devices (and the test
    process's other XLA flags), compiled programs cached in `cache_dir` (None: the run's default, under the workdir)
    however fast they compile; output appended to WORKDIR.log (or `log_name` beside the workdir)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    log = open(os.path.join(os.path.dirname(workdir), log_name or os.path.basename(workdir) + ".log"), "a")
    return subprocess.Popen([sys.executable, "-m", "hyvideo_jax.train", "--config=configs/tiny.py",
                             f"--workdir={workdir}", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_here(workdir: str, args: list[str]):
    """What `start(workdir, None, args)` runs, in this process (its 8 simulated devices and XLA flags; no interpreter
    to start, and programs this process compiled before are reused): the same command-line flags parsed into
    configs/tiny.py, then `train.train_and_evaluate`. Returns the final TrainState."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["train", f"--config={ROOT}/configs/tiny.py", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Training configuration.", flag_values=values, lock_config=True,
                                    sys_argv=argv)   # the overrides to define as flags
    values(argv)
    assert jax.device_count() == 8
    return train.train_and_evaluate(values.config, workdir)


def signal_after(proc, workdir: str, step: int, sig, timeout: float = 300) -> int | None:
    """Send `sig` to `proc` once WORKDIR's metrics log a step >= `step`; returns that logged step (None if the run
    ended first)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        steps = train.read_metrics(workdir) if os.path.exists(os.path.join(workdir, train.METRICS_FILE)) else {}
        if steps and max(steps) >= step:
            proc.send_signal(sig)
            return max(steps)
        time.sleep(0.02)
    return None


def final_state(workdir: str, steps: int, shapes=SHAPES):
    """(TrainState as host arrays, data iterator state) of WORKDIR's checkpoint of step `steps`."""
    config = tiny.get_config()
    train_config = train.TrainConfig.from_config(dict(config.train, num_steps=steps))
    config.data.random_latent_shapes = tuple(shapes)
    task = train.OBJECTIVES["flow"](config)
    tx = train.make_optimizer(train_config)
    abstract, _ = train.state_shardings(task, tx, train_config, create_mesh(config.mesh))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    assert manager.latest_step() == steps
    state, data = train.restore_checkpoint(manager, abstract)
    manager.close()
    return jax.device_get(state), data


def encoders_built_once() -> pytest.MonkeyPatch:
    """`convert.vae.load_vae` and `TextEncoders.from_config` memoized by their arguments (the same random weights
    for the same config and seed; a --vae_weights file keyed by its path), for tests that build many samplers:
    building them dominates each sampler's time. Undo the returned patch when done."""
    from hyvideo_jax import text
    from hyvideo_jax.convert import vae
    memo = {}

    def once(key, build):
        memo[key] = memo[key] if key in memo else build()
        return memo[key]
    load_vae, encoders = vae.load_vae, text.TextEncoders.from_config.__func__
    patch = pytest.MonkeyPatch()
    patch.setattr(vae, "load_vae", lambda *a, **k: once(("vae", repr(a), repr(k)), lambda: load_vae(*a, **k)))
    patch.setattr(text.TextEncoders, "from_config", classmethod(lambda cls, config, *, mesh=None: once(
        ("text", repr(config), repr(mesh)), lambda: encoders(cls, config, mesh=mesh))))
    return patch
