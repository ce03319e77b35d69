"""The one set-up sequence every caller shares: config -> devices -> data -> state -> steps.

    s = setup(config, workdir=path)      # train.py: resumes from the workdir's checkpoint
    s = setup(config, restore=fn)        # eval: the state from a chosen checkpoint
    s = setup(config)                    # a fresh state (benchmarks, test workers)
    state, metrics = s.train_step(s.state, next(s.train_batches()))

Everything is checked before anything is built or compiled (`configs.schema.validate`), so a
mistake costs one line in the first second.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
import models
from configs import schema
from errors import UserError
from training import checkpoint as ckpt_lib
from training import runtime
from training import state as state_lib
from training import steps as steps_lib
from training import workdir as workdir_lib

# restore(abstract state) -> (step, state, meta): how a caller chooses the checkpoint to read
Restore = Callable[[Any], tuple[int, Any, dict]]


@dataclasses.dataclass
class Setup:
    """What a run needs, ready: the checked config, devices, data, state and compiled steps.

    `step` and `meta` come from the restored checkpoint (0 and {} for a fresh state);
    `checkpoints` is the workdir's (None without a workdir); a step not compiled is None.
    """

    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    specs: list[models.LayerSpec]
    mesh: jax.sharding.Mesh
    splits: data.Splits
    graphdef: Any
    state: Any
    step: int
    meta: dict
    train_step: Callable | None
    eval_step: Callable | None
    data_seconds: float
    init_seconds: float
    compile_seconds: float
    workdir: Path | None = None
    checkpoints: ckpt_lib.Checkpoints | None = None
    lock: workdir_lib.WorkdirLock | None = None  # held by process 0 of a training run

    @property
    def batch_sharding(self) -> NamedSharding:
        """Batches are split along their first axis over the mesh's 'data' axis."""
        return NamedSharding(self.mesh, P("data"))

    def train_batches(self, start_step: int | None = None) -> Iterator[dict]:
        """The training batches from `start_step` (default: the restored step) on."""
        return data.train_batches(
            self.splits.train,
            global_batch_size=self.config.training.batch_size,
            seed=self.config.seed,
            start_step=self.step if start_step is None else start_step,
            sharding=self.batch_sharding,
        )

    def eval_split(self) -> data.Split:
        """The split the periodic evaluation uses (config.dataset.eval_split)."""
        validation = self.config.dataset.eval_split == "validation"
        return self.splits.validation if validation else self.splits.test

    def evaluate(self, state, split: data.Split) -> dict:
        """Returns {'loss', 'accuracy', 'count'} of `state` over `split` by the eval step."""
        return steps_lib.evaluate_split(self.eval_step, state, split, self.config, self.mesh)


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Raises UserError unless both batch sizes divide evenly over the devices."""
    t = config.training
    for field in ("batch_size", "eval_batch_size"):
        if t[field] % jax.device_count():
            raise UserError(
                f"config.training.{field}={t[field]} is not divisible by the {jax.device_count()} "
                f"devices; use a multiple of {jax.device_count()}."
            )


def setup(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | Path | None = None,
    restore: Restore | None = None,
    steps: tuple[str, ...] = steps_lib.STEPS,
    distributed: bool = True,
    init_compiler_options: dict | None = None,
) -> Setup:
    """Checks `config`, then builds what a run needs, in this order: jax.distributed (when
    `distributed` and the config or the cluster asks for it), the workdir, the device mesh,
    the data, the train state, the compiled `steps` (train and/or eval).

    With `workdir` (training): the workdir is created or checked against its config.json, its
    static files written, and the state restored from its latest checkpoint when there is one.
    With `restore`: the state is what `restore(abstract_state)` returns. Otherwise a fresh
    state (its init program built with `init_compiler_options`, see training.state).
    Raises UserError naming the first problem.
    """
    if distributed:
        runtime.maybe_initialize_distributed(config.distributed)
    info, specs = schema.validate(config)
    check_batch_sizes(config)
    lock = None
    if workdir is not None:
        workdir, lock = workdir_lib.prepare(config, workdir, lock=jax.process_index() == 0)
    try:
        s = _build(config, info, specs, workdir, restore, steps, init_compiler_options)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    s.lock = lock
    return s


def _build(config, info, specs, workdir, restore, steps, init_compiler_options) -> Setup:
    mesh = runtime.make_mesh()
    start = time.perf_counter()
    splits = data.load(
        config.dataset,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    data_seconds = time.perf_counter() - start
    checkpoints = None
    if workdir is not None:
        if jax.process_index() == 0:
            workdir_lib.write_run_files(workdir, config, specs)
        checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.training.keep_checkpoints)
        if checkpoints.latest_step() is not None:
            restore = checkpoints.restore
    start = time.perf_counter()
    step, meta, state = 0, {}, None
    if restore is not None:  # no initial state to compute
        graphdef, abstract = state_lib.abstract_train_state(config, info, mesh)
        try:
            step, state, meta = restore(abstract)
        except ckpt_lib.NoReadableCheckpoint as e:  # every checkpoint damaged: start afresh
            logging.warning("%s; starting from step 0", e)
    if state is None:
        graphdef, state = state_lib.create_train_state(
            config, info, mesh, compiler_options=init_compiler_options
        )
        jax.block_until_ready(state)
    init_seconds = time.perf_counter() - start
    train_fn, eval_fn, compile_seconds = steps_lib.compile_steps(
        config, graphdef, state, splits, mesh, steps
    )
    return Setup(
        config=config,
        info=info,
        specs=specs,
        mesh=mesh,
        splits=splits,
        graphdef=graphdef,
        state=state,
        step=step,
        meta=meta,
        train_step=train_fn,
        eval_step=eval_fn,
        data_seconds=data_seconds,
        init_seconds=init_seconds,
        compile_seconds=compile_seconds,
        workdir=workdir,
        checkpoints=checkpoints,
    )
