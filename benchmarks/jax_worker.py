"""The JAX side of the benchmark: the project's real train and eval steps, in a worker process.

    python -m benchmarks.jax_worker --model=resnet20 [--batch_size=128] [--eval_batch_size=500]

It builds the state and compiles the steps exactly as train.py does (`training.setup.setup`:
the state's init program, then the steps compiled ahead of time, state donated), then answers
the coordinator's commands (benchmarks/protocol.py): `train` (steps on a batch already on the
device), `pipeline` (steps fed by the real input pipeline, `data.train_batches`), `eval` (eval
steps on one batch), `matmul` (a large float32 matmul, for the machine's peak). Each returns
the window's seconds.
XLA flags: the project's (`training.runtime.configure_jax`, as train.py sets them) on
top of $XLA_FLAGS, or with `--noproject_flags` only $XLA_FLAGS (JAX's defaults when unset).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from benchmarks import protocol
from training import runtime

# The builtin dataset of this size loads in well under a second and spans many batches, so
# the pipeline windows see fresh examples and epoch boundaries.
TRAIN_EXAMPLES = 4096
TEST_EXAMPLES = 1000
MATMUL_SIZE = 2048  # 17 GFLOP per product: ~0.1 s here, long enough to time, MKL/Eigen-sized


def benchmark_config(model: str, batch_size: int, eval_batch_size: int):
    """Returns the config the benchmark trains: configs/builtin.py's, at the given batch sizes,
    on a small builtin dataset (the data's content does not change the step's cost)."""
    from configs import builtin

    config = builtin.get_config(model)
    config.dataset.builtin_train_size = TRAIN_EXAMPLES
    config.dataset.builtin_test_size = TEST_EXAMPLES
    config.training.batch_size = batch_size
    config.training.eval_batch_size = eval_batch_size
    config.training.progress = "none"
    return config


def setup() -> tuple[dict, dict]:
    """Builds, compiles and warms up the steps; returns (ready report, command handlers)."""
    # As train.py does, before JAX starts; without the project's flags for the before/after
    # comparison of XLA flags. The coordinator turns the compilation cache off
    # ($JAX_ENABLE_COMPILATION_CACHE=false) unless it measures the cache itself.
    runtime.configure_jax(project_flags=flags.FLAGS.project_flags)
    start = time.perf_counter()
    from flax import nnx

    import models
    from models import summary
    from training import state as state_lib
    from training.setup import setup

    config = benchmark_config(
        flags.FLAGS.model, flags.FLAGS.batch_size, flags.FLAGS.eval_batch_size
    )
    import_seconds = time.perf_counter() - start
    # the before/after comparison of the init program's build: LLVM's optimisations on
    init_options = {} if flags.FLAGS.init_optimized else state_lib.INIT_COMPILER_OPTIONS
    start = time.perf_counter()
    s = setup(config, init_compiler_options=init_options)
    start += s.data_seconds  # time to the first step counts from the state's creation, as before
    handlers = _handlers(s)  # runs the first step
    first_step_seconds = time.perf_counter() - start
    info = s.splits.info
    real_params = summary.count_params(
        nnx.eval_shape(
            lambda: models.create_model(
                config.model, info.image_shape, info.num_classes, rngs=nnx.Rngs(0)
            )
        )
    )
    for window in handlers.values():
        window(1)  # warm-up: first calls allocate and fill caches
    sums = summary.to_json(s.specs)
    ready = {
        "framework": "jax",
        "model": flags.FLAGS.model,
        "params": sums["total_params"],
        "real_params": real_params,
        "flops_per_image": sums["total_flops"],
        "batch_size": config.training.batch_size,
        "eval_batch_size": config.training.eval_batch_size,
        "matmul_flops": 2 * MATMUL_SIZE**3,
        "import_seconds": import_seconds,
        "init_seconds": s.init_seconds,
        "compile_seconds": s.compile_seconds,
        "first_step_seconds": first_step_seconds,
        "cores": len(os.sched_getaffinity(0)),
        "environment": runtime.environment(),
    }
    return ready, handlers


def _handlers(s) -> dict:
    """Runs the first train step (until its result is ready) and returns the timed windows of
    the coordinator's commands: train, pipeline, eval, matmul."""
    import jax
    import jax.numpy as jnp

    import data

    batches = s.train_batches(start_step=0)
    batch = next(batches)
    box = {"state": s.train_step(s.state, batch)[0]}
    jax.block_until_ready(box["state"])
    eval_batch = next(
        data.eval_batches(
            s.splits.test,
            global_batch_size=s.config.training.eval_batch_size,
            sharding=s.batch_sharding,
        )
    )

    def train_window(steps: int) -> dict:
        def run():
            box["state"], metrics = s.train_step(box["state"], batch)
            return metrics

        return _window(jax, run, steps)

    def pipeline_window(steps: int) -> dict:
        def run():
            box["state"], metrics = s.train_step(box["state"], next(batches))
            return metrics

        return _window(jax, run, steps)

    def eval_window(steps: int) -> dict:
        return _window(jax, lambda: s.eval_step(box["state"], eval_batch), steps)

    matmul = jax.jit(jnp.dot)
    a = jnp.ones((MATMUL_SIZE, MATMUL_SIZE), jnp.float32)

    def matmul_window(steps: int) -> dict:
        return _window(jax, lambda: matmul(a, a), steps)

    return {
        "train": train_window,
        "pipeline": pipeline_window,
        "eval": eval_window,
        "matmul": matmul_window,
    }


def _window(jax, run, steps: int) -> dict:
    """Times `steps` asynchronous calls of `run` and the wait for all their results."""
    start = time.perf_counter()
    outputs = [run() for _ in range(steps)]
    jax.block_until_ready(outputs)
    return {"seconds": time.perf_counter() - start, "steps": steps}


def define_flags() -> None:
    """Defines the worker's command-line flags (only when it runs as a program)."""
    flags.DEFINE_string("model", None, "Model preset (models.PRESETS).", required=True)
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_integer("eval_batch_size", 500, "Eval batch size.")
    flags.DEFINE_integer("cores", 0, "Use only the first N CPUs (0: all).")
    flags.DEFINE_bool(
        "project_flags", True, "Add the project's default XLA flags (training/runtime.py)."
    )
    flags.DEFINE_bool(
        "init_optimized",
        False,
        "Compile the initialisation program with LLVM's optimisations (before the change to "
        "training.state.INIT_COMPILER_OPTIONS).",
    )


def main() -> None:
    flags.FLAGS(sys.argv)
    protocol.restrict_cores(flags.FLAGS.cores)
    protocol.serve(setup)


if __name__ == "__main__":
    define_flags()
    main()
