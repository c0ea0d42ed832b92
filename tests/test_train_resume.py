"""Exact resume through the CLI: a run killed with SIGKILL, then stopped by SIGTERM after it resumed, restarted
each time, logs the same per-step losses, reads the same data and ends with bitwise the same state as an
uninterrupted run; a half-written checkpoint left in the folder is never restored."""

import contextlib
import glob
import os
import re
import shutil
import signal

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from hyvideo_jax import train
from hyvideo_jax.compilation import CacheCounter
from tests.cli_runs import final_state, overrides, run_here, signal_after, start

STEPS = 12


def run(workdir, cache_dir, stop_after=None, sig=signal.SIGKILL):
    """Run the CLI (cache_dir None: the run's default compilation cache, under the workdir); with `stop_after`,
    send `sig` once a step >= stop_after is logged. Returns (exit code, the last step logged when the signal went
    out)."""
    proc = start(workdir, cache_dir, overrides(STEPS))
    logged = None if stop_after is None else signal_after(proc, workdir, stop_after, sig)
    return proc.wait(timeout=300), logged


@contextlib.contextmanager
def programs_from(cache_dir):
    """JAX's persistent compilation cache at `cache_dir` while inside (whatever this process used before)."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    compilation_cache.reset_cache()   # JAX decides at its next compile whether (and where) it reads a cache
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


def test_killed_runs_resume_bitwise(tmp_path):
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    rc, first_kill = run(resumed, None, stop_after=4)
    assert rc == -signal.SIGKILL and first_kill < STEPS
    left_over = glob.glob(os.path.join(resumed, "checkpoints", "*.orbax-checkpoint-tmp*"))
    rc, terminated = run(resumed, None, stop_after=first_kill + 3, sig=signal.SIGTERM)
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(resumed, "checkpoints", "[0-9]*"))
                   if os.path.basename(p).isdigit())
    print(f"SIGKILL after step {first_kill} was logged (temporary checkpoint folders left: "
          f"{len(left_over)}), SIGTERM after step {terminated}: exit code {rc}, checkpoints {saved}")
    assert rc == 0 and saved[-1] >= terminated   # SIGTERM: the loop saves the step it reached and exits cleanly

    # A checkpoint whose writer died: Orbax's temporary folder for a later step, with its array files missing.
    latest = os.path.join(resumed, "checkpoints", str(saved[-1]))
    half = os.path.join(resumed, "checkpoints", f"{STEPS - 1}.orbax-checkpoint-tmp-1234567890")
    shutil.copytree(latest, half)
    shutil.rmtree(os.path.join(half, "state", "d"))
    assert run(resumed, None)[0] == 0
    compilation_report(tmp_path / "resumed.log")

    # Uninterrupted, in this process (the same flags, devices and XLA flags), with the programs the first start
    # compiled (read from its cache: the comparison below is of the runs, not of two compiles of one program).
    with programs_from(os.path.join(resumed, "compilation_cache")), CacheCounter() as cached:
        run_here(reference, overrides(STEPS))
    print(f"uninterrupted run: {cached.hits} programs read from the resumed run's compilation cache, "
          f"{cached.writes} compiled")

    ref_metrics, got = train.read_metrics(reference), train.read_metrics(resumed)
    ref_losses = [ref_metrics[s]["loss"] for s in range(1, STEPS + 1)]
    losses = [got[s]["loss"] for s in range(1, STEPS + 1)]
    print("per-step losses, uninterrupted:", [f"{x:.6f}" for x in ref_losses])
    assert losses == ref_losses   # exact float equality, step by step (the last log line of a step wins)
    ref_state, ref_data = final_state(reference, STEPS)
    state, data = final_state(resumed, STEPS)
    assert data == ref_data   # the data iterator stands at the same place
    leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref_state)
    assert len(leaves) == len(ref_leaves) and all(np.array_equal(a, b) for a, b in zip(leaves, ref_leaves))
    assert int(state.step) == STEPS and not os.path.exists(half)   # Orbax removed the unfinished folder


def compilation_report(log_path):
    """Each start compiled both bucket shapes before step 1; the first start compiled them, every restart read
    them (and every other program) from the workdir's compilation cache, and nothing compiled mid-run."""
    starts = open(log_path).read().split("Compilation cache: ")[1:]
    assert len(starts) == 3
    for i, text in enumerate(starts):
        shapes = re.findall(r"train step for latents \(8, 2, 4, (\d), 4\): [0-9.]+ s \((compiled|from the "
                            r"compilation cache)\)", text)
        assert [s for s, _ in shapes] == ["4", "8"]
        assert text.index("train step for latents") < text.index("Process 0 of 1")   # before the loop starts
        assert {how for _, how in shapes} == {"compiled" if i == 0 else "from the compilation cache"}
        if "Compilation: " in text:   # SIGKILLed starts never get to say it
            hits, writes, late = map(int, re.search(r"Compilation: (\d+) program\(s\) read from the compilation "
                                                     r"cache, (\d+) compiled and written to it; (\d+) train-step",
                                                     text).groups())
            print(f"start {i}: {hits} programs read from the compilation cache, {writes} compiled")
            assert late == 0 and (i == 0 or writes == 0) and (i == 0 or hits >= 2)
    assert "Compilation: " in starts[-1]
