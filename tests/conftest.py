"""Test set-up: the project's XLA flags, as every entry point sets them, before JAX starts."""

from training import runtime

runtime.configure_jax()
