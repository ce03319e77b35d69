"""The PyTorch side of the benchmark: the reference network's steps, in a worker process.

    python -m benchmarks.torch_worker --model=resnet20 [--batch_size=128] [--cores=0]

Answers the coordinator's `train`, `eval` and `matmul` commands (benchmarks/protocol.py) with
the window's seconds. The reference trains on a fixed batch of normalised float images already
in memory (channels-last): it does none of our step's on-device augmentation.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from absl import flags

from benchmarks import protocol
from benchmarks.torch_reference import (
    Network,
    count_params,
    make_eval_step,
    make_train_step,
    to_nchw,
)

MATMUL_SIZE = 2048  # as the JAX worker's: 17 GFLOP per product


def define_flags() -> None:
    """Defines the worker's command-line flags (only when it runs as a program)."""
    flags.DEFINE_string("model", None, "Model preset (models.PRESETS).", required=True)
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_integer("eval_batch_size", 500, "Eval batch size.")
    flags.DEFINE_integer(
        "cores", 0, "Use only the first N CPUs (0: all); torch runs one thread per CPU, as XLA."
    )


def setup() -> tuple[dict, dict]:
    """Builds the reference network and warms its steps up; returns (report, handlers)."""
    import models
    from configs import builtin

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    config = builtin.get_config(flags.FLAGS.model)
    specs = models.architecture(config.model, (32, 32, 3), 10)
    model = Network(specs).to(memory_format=torch.channels_last)
    o = config.optimizer
    train_step = make_train_step(model, o.learning_rate, o.momentum, o.weight_decay)
    eval_step = make_eval_step(model)
    rng = np.random.default_rng(0)

    def images(n: int) -> torch.Tensor:
        x = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
        return to_nchw(x).contiguous(memory_format=torch.channels_last)

    x, x_eval = images(flags.FLAGS.batch_size), images(flags.FLAGS.eval_batch_size)
    labels = torch.from_numpy(rng.integers(0, 10, flags.FLAGS.batch_size))
    a = torch.ones(MATMUL_SIZE, MATMUL_SIZE)

    def window(run, steps: int) -> dict:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        return {"seconds": time.perf_counter() - start, "steps": steps}

    handlers = {
        "train": lambda steps: window(lambda: train_step(x, labels), steps),
        "eval": lambda steps: window(lambda: eval_step(x_eval), steps),
        "matmul": lambda steps: window(lambda: torch.mm(a, a), steps),
    }
    for handler in handlers.values():
        handler(1)  # warm-up: oneDNN picks and caches its kernels on first use
    ready = {
        "framework": "torch",
        "model": flags.FLAGS.model,
        "params": count_params(model),
        "batch_size": flags.FLAGS.batch_size,
        "eval_batch_size": flags.FLAGS.eval_batch_size,
        "matmul_flops": 2 * MATMUL_SIZE**3,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_format": "channels_last",
    }
    return ready, handlers


if __name__ == "__main__":
    define_flags()
    flags.FLAGS(sys.argv)
    protocol.restrict_cores(flags.FLAGS.cores)
    protocol.serve(setup)
