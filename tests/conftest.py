"""Test-wide settings: CPU only, cheap XLA compiles, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite is dominated by compiling many small programs on 2 cores: XLA's backend
# optimisations roughly double compile time and buy nothing at test sizes.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
