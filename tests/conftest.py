"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere) and deterministic torch."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

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
