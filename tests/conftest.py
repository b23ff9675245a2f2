"""Test-wide settings: CPU only, 8 fake devices, cheap XLA compiles, full-precision matmuls."""

import os
import sys

# Shared test code (helpers.py, tfds_fakes.py) is imported by module name from here,
# whatever pytest's import mode.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite is dominated by compiling many small programs on 2 cores: XLA's backend
# optimisations roughly double compile time and buy nothing at test sizes.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

# Eight fake CPU devices, so sharded code runs as on a multi-device host.
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
