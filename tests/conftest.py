"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere) and deterministic torch.

XLA:CPU compiles with LLVM's optimisation level 0 and its elemental fusion emitter instead of the MLIR fusion
emitters: the tests run tiny models, so compiling dominates their time (level 0 cuts the suite's by about a quarter;
the elemental emitter a test of two train-step compiles from 51 to 37 s) and the arithmetic is the same (XLA disables
fast-math either way). At the default level 2 that emitter can be far slower to compile (minutes for a VAE's
initializer), so the flag is the tests' only: subprocesses that run as a user would (the demo) clear XLA_FLAGS.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in flags:
    flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = flags.strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # so tests can import configs/*.py

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402
    torch.manual_seed(0)
    torch.set_num_threads(2)
except ImportError:  # torch is a test dependency; tests that need it import it themselves
    pass


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_clips(tmp_path_factory):
    """The demo's data at test size (tests/demo_data.py), prepared once per test process."""
    from tests.demo_data import make_demo_clips
    return make_demo_clips(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 2-step training run of configs/tiny.py that keeps an EMA (decay 0.5; learning rate 0.05, so that EMA and
    raw parameters differ clearly) on random latents of one shape, and a converted folder of the raw parameters it
    returned: {"workdir", "converted"}. Trained once for all test processes (pytest-xdist workers share
    the session's temporary folder; a file lock makes one of them train while the others wait). Tests read it only
    (a test that writes into a run copies it first)."""
    from filelock import FileLock

    from hyvideo_jax import train
    from hyvideo_jax.convert.flax_io import save_flax_model
    from hyvideo_jax.models.dit import DiTConfig
    from configs import tiny

    config = tiny.get_config()
    config.train.num_steps = 2
    config.train.ema_decay = 0.5
    config.train.learning_rate = 0.05
    config.data.random_latent_shapes = ((2, 4, 4),)
    config.data.random_records = 8
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent   # the session's folder, above each worker's own
    root = shared / "tiny_run"
    with FileLock(str(shared / "tiny_run.lock")):
        if not (root / "done").exists():
            config.train.compilation_cache_dir = str(root / "compilation_cache")   # outside the run's folder
            state = jax.device_get(train.train_and_evaluate(config, str(root / "run")))
            save_flax_model(str(root / "converted"), "dit", DiTConfig.from_config(config.model).to_dict(),
                            state.params)
            (root / "done").write_text("")
    return dict(workdir=str(root / "run"), converted=str(root / "converted"))


# Test files by their time on 2 CPU cores, longest first (CI durations; the demo's shortened run alone takes
# minutes). pytest.ini's `--dist loadfile` hands each file whole to one xdist worker (a module's fixtures are built
# once), in collection order: starting the long files first lets both workers finish together. Files not named here
# take under a minute and follow in their usual order.
SLOW_FILES = ("test_demo.py", "test_vae_tiling.py", "test_train.py", "test_multihost.py", "test_vae_training.py",
              "test_aot.py", "test_multihost_mesh.py", "test_parallel.py", "test_sample_cli.py", "test_train_i2v.py",
              "test_sample_i2v.py", "test_lora.py", "test_train_resume.py", "test_sample.py", "test_train_init.py",
              "test_train_numerics.py", "test_evaluate.py", "test_evaluate_follow.py", "test_vae.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file keeps its order
