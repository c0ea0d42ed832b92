"""Multi-host training with two local processes (4 CPU devices each, joined by `jax.distributed` on localhost and
gloo collectives), against one process with the same 8 devices (the test's own): the same per-step losses and final
state.

The two-process run is also preempted: SIGTERM reaches process 1 only, JAX's preemption service makes both agree
on one step, both save it and exit cleanly, and the restarted pair finishes as if never stopped."""

import os
import re
import signal

import jax
import numpy as np

from hyvideo_jax import train
from tests.cli_runs import final_state, free_port, overrides, run_here, signal_after, start

STEPS = 8
SHAPES = ((2, 4, 4),)   # one batch shape: one compile per run


def start_pair(workdir, cache_dir):
    address = f"localhost:{free_port()}"
    flags = [*overrides(STEPS, SHAPES), "--config.data.eval_fraction=0.25", f"--coordinator_address={address}",
             "--num_processes=2"]
    return [start(workdir, cache_dir, [*flags, f"--process_id={i}"], devices=4, log_name=f"process{i}.log")
            for i in range(2)]


def wait_all(procs, timeout=300):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def saved_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_two_processes_train_as_one_and_survive_preemption(tmp_path):
    cache = str(tmp_path / "compilation_cache")
    reference, pair = str(tmp_path / "reference"), str(tmp_path / "pair")
    run_here(reference, [*overrides(STEPS, SHAPES), "--config.data.eval_fraction=0.25"])   # one process, 8 devices

    procs = start_pair(pair, cache)
    preempted_after = signal_after(procs[1], pair, 2, signal.SIGTERM)
    codes = wait_all(procs)
    logs = [open(tmp_path / f"process{i}.log").read() for i in range(2)]
    assert codes == [0, 0], logs[int(codes[0] == 0)][-3000:]
    for i, log in enumerate(logs):   # really one run of two processes, each holding half the devices
        assert f"Process {i} of 2: 4 of 8 devices" in log
    stopped = saved_steps(pair)[-1]
    print(f"SIGTERM to process 1 after step {preempted_after} was logged: both exited 0, saved step {stopped}")
    assert preempted_after is not None and preempted_after <= stopped < STEPS
    for log in logs:   # each process left the loop at the agreed step, through the preemption path
        assert re.search(rf"Stop requested \(SIGTERM or preemption\): saved step {stopped}, exiting", log)

    assert wait_all(start_pair(pair, cache)) == [0, 0]
    assert all(f"from step {stopped}" in open(tmp_path / f"process{i}.log").read() for i in range(2))

    ref_metrics, got = train.read_metrics(reference), train.read_metrics(pair)
    ref_losses = np.array([ref_metrics[s]["loss"] for s in range(1, STEPS + 1)])
    losses = np.array([got[s]["loss"] for s in range(1, STEPS + 1)])
    loss_err = np.max(np.abs(losses - ref_losses) / np.abs(ref_losses))
    ref_state, ref_data = final_state(reference, STEPS, SHAPES)
    state, data = final_state(pair, STEPS, SHAPES)
    assert data == ref_data   # the data iterator stands at the same place
    leaves, ref_leaves = jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)
    param_err = (max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, ref_leaves))
                 / max(float(np.max(np.abs(b))) for b in ref_leaves))
    print(f"two processes vs one over {STEPS} steps: loss relative error {loss_err:.2e}, largest parameter "
          f"difference {param_err:.2e} of the largest parameter")
    # Cross-process all-reduces may sum in another order than one process's, so float rounding may differ; a wrong
    # shard of data or a missed reduction moves losses by ~1e-2.
    assert loss_err < 1e-5 and param_err < 1e-6
    # The final step's validation loss (held-out records) does not depend on the number of processes either.
    np.testing.assert_allclose(got[STEPS]["eval/loss"], ref_metrics[STEPS]["eval/loss"], rtol=1e-5)
    assert got[STEPS]["eval/clips"] == ref_metrics[STEPS]["eval/clips"] == 3
    assert int(state.step) == STEPS and int(state.skipped) == int(ref_state.skipped) == 0
