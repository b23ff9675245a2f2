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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(workdir, final evaluation) of the tiny demo run (helpers.demo_config) with an EMA
    of its parameters, trained once per test process for the tests that load it."""
    from helpers import demo_config
    from noah_jax.train import trainer

    workdir = tmp_path_factory.mktemp("demo_run")
    results = trainer.train_and_evaluate(demo_config(ema_decay=0.5), str(workdir))
    return workdir, results


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory):
    """(folder, paths, labels) of the demo's 360 test digits as PNG files
    (helpers.write_test_digits)."""
    from helpers import write_test_digits

    folder = tmp_path_factory.mktemp("test_digits")
    paths, labels = write_test_digits(folder)
    return folder, paths, labels
