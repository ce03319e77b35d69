"""Test set-up: the project's XLA flags, as every entry point sets them, before JAX starts;
and the tiny trained run that the evaluation tests measure (test_eval.py, test_probes.py)."""

from training import runtime

runtime.configure_jax()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny pooled (max) ConvNet trained for 12 steps: checkpoints at steps 6 and 12."""
    from test_train import tiny_config

    from training import loop

    config = tiny_config()
    # Adam at 5e-3 spreads the predictions over the classes within 12 steps (the class-score
    # layer starts at zero); a constant prediction would be trivially shift-invariant.
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 5e-3
    path = tmp_path_factory.mktemp("run")
    loop.train_and_evaluate(config, path)
    return path
