"""Exact resume through the CLI: a run killed with SIGKILL at two points (and stopped once by SIGTERM), restarted
each time, logs the same per-step losses, reads the same data and ends with bitwise the same state as an
uninterrupted run; a half-written checkpoint left in the folder is never restored."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import tiny
from hyvideo_jax import train
from hyvideo_jax.parallel.mesh import create_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
OVERRIDES = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every_steps=3",
             "--config.data.random_latent_shapes=((2,4,4),(2,4,8))", "--config.data.random_records=12"]


def start(workdir, cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DEFAULT_MATMUL_PRECISION="highest")
    log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "a")
    return subprocess.Popen([sys.executable, "-m", "hyvideo_jax.train", "--config=configs/tiny.py",
                             f"--workdir={workdir}", *OVERRIDES], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def run(workdir, cache_dir, stop_after=None, sig=signal.SIGKILL):
    """Run the CLI; with `stop_after`, send `sig` once a step >= stop_after is logged. Returns (exit code, the
    last step logged when the signal went out)."""
    proc = start(workdir, cache_dir)
    logged = None
    if stop_after is not None:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            steps = train.read_metrics(workdir) if os.path.exists(os.path.join(workdir, train.METRICS_FILE)) else {}
            if steps and max(steps) >= stop_after:
                proc.send_signal(sig)
                logged = max(steps)
                break
            time.sleep(0.02)
    return proc.wait(timeout=300), logged


def final_state(workdir):
    config = tiny.get_config()
    train_config = train.TrainConfig.from_config(dict(config.train, num_steps=STEPS))
    config.data.random_latent_shapes = ((2, 4, 4), (2, 4, 8))
    task = train.OBJECTIVES["flow"](config)
    tx = train.make_optimizer(train_config)
    abstract, _ = train.state_shardings(task, tx, train_config, create_mesh(config.mesh))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    assert manager.latest_step() == STEPS
    state, data = train.restore_checkpoint(manager, abstract)
    manager.close()
    return jax.device_get(state), data


def test_killed_runs_resume_bitwise(tmp_path):
    cache = str(tmp_path / "compilation_cache")
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    assert run(reference, cache)[0] == 0

    rc, first_kill = run(resumed, cache, stop_after=4)
    assert rc == -signal.SIGKILL and first_kill < STEPS
    rc, second_kill = run(resumed, cache, stop_after=first_kill + 3)
    assert rc == -signal.SIGKILL and second_kill < STEPS
    left_over = glob.glob(os.path.join(resumed, "checkpoints", "*.orbax-checkpoint-tmp*"))
    rc, terminated = run(resumed, cache, stop_after=second_kill + 2, sig=signal.SIGTERM)
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(resumed, "checkpoints", "[0-9]*"))
                   if os.path.basename(p).isdigit())
    print(f"SIGKILL after steps {first_kill} and {second_kill} were logged (temporary checkpoint folders left: "
          f"{len(left_over)}), SIGTERM after step {terminated}: exit code {rc}, checkpoints {saved}")
    assert rc == 0 and saved[-1] >= terminated   # SIGTERM: the loop saves the step it reached and exits cleanly

    # A checkpoint whose writer died: Orbax's temporary folder for a later step, with its array files missing.
    latest = os.path.join(resumed, "checkpoints", str(saved[-1]))
    half = os.path.join(resumed, "checkpoints", f"{STEPS - 1}.orbax-checkpoint-tmp-1234567890")
    shutil.copytree(latest, half)
    shutil.rmtree(os.path.join(half, "state", "d"))
    assert run(resumed, cache)[0] == 0

    ref_metrics, got = train.read_metrics(reference), train.read_metrics(resumed)
    ref_losses = [ref_metrics[s]["loss"] for s in range(1, STEPS + 1)]
    losses = [got[s]["loss"] for s in range(1, STEPS + 1)]
    print("per-step losses, uninterrupted:", [f"{x:.6f}" for x in ref_losses])
    assert losses == ref_losses   # exact float equality, step by step (the last log line of a step wins)
    ref_state, ref_data = final_state(reference)
    state, data = final_state(resumed)
    assert data == ref_data   # the data iterator stands at the same place
    leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref_state)
    assert len(leaves) == len(ref_leaves) and all(np.array_equal(a, b) for a, b in zip(leaves, ref_leaves))
    assert int(state.step) == STEPS and not os.path.exists(half)   # Orbax removed the unfinished folder
