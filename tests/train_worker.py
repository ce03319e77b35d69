"""Runs a few real train steps and saves the resulting parameters: for the multi-device tests.

    python tests/train_worker.py OUT.npz PRESET STEPS [PROCESS_ID NUM_PROCESSES PORT]

The device count comes from the environment (XLA_FLAGS=--xla_force_host_platform_device_count).
With the three last arguments it joins a jax.distributed cluster on 127.0.0.1.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import runtime  # noqa: E402

runtime.configure_jax()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import builtin  # noqa: E402
from training.setup import setup  # noqa: E402


def small_config(preset: str):
    """A config small enough for a few steps in seconds, with BatchNorm and augmentation on."""
    config = builtin.get_config(preset)
    config.dataset.builtin_train_size = 512
    config.dataset.builtin_test_size = 64
    config.training.batch_size = 32
    config.training.eval_batch_size = 32
    return config


def main(out: str, preset: str, steps: int, *cluster: str) -> None:
    config = small_config(preset)
    if cluster:
        process_id, num_processes, port = (int(x) for x in cluster)
        config.distributed.initialize = "on"
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.num_processes = num_processes
        config.distributed.process_id = process_id
    s = setup(config, steps=("train",))
    state, batches = s.state, s.train_batches()
    losses = []
    for _ in range(steps):
        state, metrics = s.train_step(state, next(batches))
        losses.append(metrics["loss"])
    leaves = jax.tree.leaves({"params": state["params"], "batch_stats": state["batch_stats"]})
    arrays = {f"leaf{i}": np.asarray(x.addressable_data(0)) for i, x in enumerate(leaves)}
    arrays["losses"] = np.asarray([np.asarray(x.addressable_data(0)) for x in losses])
    arrays["devices"] = np.asarray(jax.device_count())
    if jax.process_index() == 0:
        np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
