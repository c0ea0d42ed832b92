"""Two processes × 4 devices whose sequence or tensor axis spans both processes (so both hold the same batch rows)
train the tiny config as one process with 8 devices does (to fp32 rounding: the meshes sum in other orders)."""

import jax
import numpy as np
import pytest

from hyvideo_jax import train
from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
from hyvideo_jax.parallel.sharding import batch_sharding, process_rows
from tests.cli_runs import final_state, free_port, overrides, run_here, start
from tests.test_multihost import wait_all

STEPS = 4
SHAPES = ((2, 4, 4),)
MESHES = {
    # (1, 2, 4, 1) with each sequence group of 4 made of 2 devices of each process (dcn blocks are processes)
    "sequence (1, 2, 4, 1) across": ["--config.mesh.ici=(1,2,2,1)", "--config.mesh.dcn=(1,1,2,1)"],
    # (1, 2, 1, 4): each tensor group of 4 spans both processes
    "tensor (1, 2, 1, 4) across": ["--config.mesh.ici=(1,2,1,2)", "--config.mesh.dcn=(1,1,1,2)"],
}


def test_the_meshes_make_processes_share_rows():
    """The premise of the runs below: which batch rows the devices of each process hold (with two processes of 4
    devices, process p holds devices 4p..4p+3, the order in which the mesh takes them)."""
    def rows(mesh_config, batch):
        mesh = create_mesh(mesh_config)
        sharding = batch_sharding(mesh)
        by_process = {}
        for device, index in sharding.devices_indices_map((batch,)).items():
            by_process.setdefault(device.id // 4, set()).update(range(*index[0].indices(batch)))
        return {p: sorted(r) for p, r in by_process.items()}
    assert rows(MeshConfig(ici=(1, 8, 1, 1)), 8) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert rows(MeshConfig(ici=(1, 1, 8, 1)), 2) == {0: [0, 1], 1: [0, 1]}
    assert rows(MeshConfig(ici=(1, 2, 2, 1), dcn=(1, 1, 2, 1)), 4) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert rows(MeshConfig(ici=(1, 4, 1, 1), dcn=(2, 1, 1, 1)), 8) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    one = process_rows(batch_sharding(create_mesh(MeshConfig(ici=(1, 8, 1, 1)))), 8)
    assert one.tolist() == list(range(8))       # one process holds every row


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process (this one), 8 devices, the tiny config's FSDP mesh."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    run_here(workdir, overrides(STEPS, SHAPES))
    return workdir


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_with_a_mesh_axis_across_them_train_as_one(tmp_path, mesh, reference):
    cache = str(tmp_path / "compilation_cache")
    flags = [*overrides(STEPS, SHAPES), *MESHES[mesh]]
    pair = str(tmp_path / "pair")
    address = f"localhost:{free_port()}"
    procs = [start(pair, cache, [*flags, f"--coordinator_address={address}", "--num_processes=2",
                                 f"--process_id={i}"], devices=4, log_name=f"process{i}.log") for i in range(2)]
    codes = wait_all(procs)
    assert codes == [0, 0], open(tmp_path / f"process{int(codes[0] == 0)}.log").read()[-3000:]
    ref, got = train.read_metrics(reference), train.read_metrics(pair)
    ref_losses = np.array([ref[s]["loss"] for s in range(1, STEPS + 1)])
    losses = np.array([got[s]["loss"] for s in range(1, STEPS + 1)])
    (ref_state, _), (state, _) = final_state(reference, STEPS, SHAPES), final_state(pair, STEPS, SHAPES)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(state.params),
                                                           jax.tree.leaves(ref_state.params)))
    print(f"{mesh}: losses {losses.round(5).tolist()}, relative error {np.max(np.abs(losses / ref_losses - 1)):.1e}, "
          f"largest parameter difference {err:.1e}")
    assert np.max(np.abs(losses / ref_losses - 1)) < 1e-5 and err < 1e-6
    assert ref_losses[-1] < ref_losses[0]
