"""noah-jax: the NOAH classification head and its model zoo in JAX/Flax linen."""

__version__ = "0.1.0"
