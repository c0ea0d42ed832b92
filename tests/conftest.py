"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere) and deterministic torch.

XLA:CPU compiles with LLVM's optimisation level 0: the tests run tiny models, so compiling dominates their time
(level 0 cuts the suite's by about a quarter) and the arithmetic is the same (XLA disables fast-math either way).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
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
