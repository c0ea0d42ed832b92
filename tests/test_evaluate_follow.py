"""The evaluate command beside a running job: `--follow` evaluates each checkpoint exactly once, in order, and stops
after the job's final step, writing only under WORKDIR/eval/."""

import json
import os

import numpy as np

from configs import tiny
from hyvideo_jax import evaluate, train
from tests.cli_runs import start

SHAPES = ((2, 4, 4),)
STEPS = 6


def job_config():
    """configs/tiny.py with the flags of `job_flags`."""
    config = tiny.get_config()
    config.data.random_latent_shapes = SHAPES
    config.data.random_records = 16
    config.data.eval_fraction = 0.25
    config.train.update(num_steps=STEPS, checkpoint_every_steps=2, keep_checkpoints=5)
    return config


def job_flags():
    return [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every_steps=2",
            "--config.train.keep_checkpoints=5", f"--config.data.random_latent_shapes={SHAPES}".replace(" ", ""),
            "--config.data.random_records=16", "--config.data.eval_fraction=0.25"]


def test_follow_evaluates_each_checkpoint_once_in_order(tmp_path):
    workdir = str(tmp_path / "run")
    job = start(workdir, str(tmp_path / "cache"), job_flags(), devices=1)
    reported = []
    try:
        results = evaluate.evaluate_workdir(job_config(), workdir, follow=True, samples=False, poll_seconds=0.2,
                                            idle_timeout=300, progress=False, report=reported.append)
        # It returned once the final step was evaluated: the job may still be finishing, never the evaluator.
        assert job.wait(timeout=300) == 0
    finally:
        if job.poll() is None:
            job.kill()
    print("\n".join(reported))
    assert list(results) == [2, 4, 6] and [int(r.split()[1][:-1]) for r in reported] == [2, 4, 6]
    lines = [json.loads(line) for line in open(os.path.join(workdir, evaluate.EVAL_DIR, train.METRICS_FILE))]
    assert [row["step"] for row in lines] == [2, 4, 6]
    # The job's own evaluation of its final state (on one device) gives the evaluator's number for its checkpoint
    # (on 8).
    in_loop = train.read_metrics(workdir)[STEPS]["eval/loss"]
    np.testing.assert_allclose(results[STEPS]["eval/loss"], in_loop, rtol=1e-5)
    assert results[2]["eval/loss"] != results[6]["eval/loss"]
    # Started again, it finds every checkpoint evaluated and returns at once; the checkpoints were not written to.
    assert evaluate.evaluate_workdir(job_config(), workdir, follow=True, samples=False, progress=False,
                                     report=reported.append) == {}
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    # The command line, with the run's own config.json: one step again, the same number.
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run([sys.executable, "-m", "hyvideo_jax.evaluate", f"--workdir={workdir}", "--step=4"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    import re
    printed = float(re.search(r"step 4: validation loss ([0-9.]+) over 4 clips", done.stdout).group(1))
    np.testing.assert_allclose(printed, results[4]["eval/loss"], rtol=1e-5)
    wrong = subprocess.run([sys.executable, "-m", "hyvideo_jax.evaluate", f"--workdir={workdir}", "--step=40"],
                           env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "has no checkpoint of step 40; it has steps [2, 4, 6]" in wrong.stderr
