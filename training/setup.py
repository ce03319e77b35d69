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
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
import models
from configs import schema
from data import batches as batches_lib
from errors import UserError
from models import summary as model_summary
from training import checkpoint as ckpt_lib
from training import runtime
from training import state as state_lib
from training import steps as steps_lib
from training import workdir as workdir_lib

# restore(abstract state) -> (step, state, meta): how a caller chooses the checkpoint to read
Restore = Callable[[Any], tuple[int, Any, dict]]
R = TypeVar("R")


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
    # config.dataset.on_device resolved: the training split (and each evaluated split's
    # batches, on first use) held on the devices; the train step cuts its batch there
    on_device: bool = False
    device_train: dict | None = None
    device_eval: dict = dataclasses.field(default_factory=dict)
    # the loop's task members (training.loop): the best checkpoint is the most accurate
    best_measures: ClassVar[tuple[str, ...]] = ("accuracy", "loss")

    @property
    def batch_sharding(self) -> NamedSharding:
        """Batches are split along their first axis over the mesh's 'data' axis."""
        return NamedSharding(self.mesh, P("data"))

    def train_batches(self, start_step: int | None = None) -> Iterator[dict]:
        """The train step's inputs from `start_step` (default: the restored step) on: the
        batches, or with the dataset on the devices, the dataset and the epoch's order (the
        step cuts the same batch from them)."""
        start = self.step if start_step is None else start_step
        if self.on_device:
            return batches_lib.device_train_inputs(
                self.device_train,
                global_batch_size=self.config.training.batch_size,
                seed=self.config.seed,
                start_step=start,
                sharding=NamedSharding(self.mesh, P()),
            )
        return data.train_batches(
            self.splits.train,
            global_batch_size=self.config.training.batch_size,
            seed=self.config.seed,
            start_step=start,
            sharding=self.batch_sharding,
        )

    def eval_split(self) -> data.Split:
        """The split the periodic evaluation uses (config.dataset.eval_split)."""
        validation = self.config.dataset.eval_split == "validation"
        return self.splits.validation if validation else self.splits.test

    def test_split(self) -> data.Split:
        return self.splits.test

    @property
    def throughput(self) -> tuple[str, int]:
        """The training rate the loop logs: images per second, batch_size per step."""
        return "images_per_s", self.config.training.batch_size

    def train_fields(self, values: list[dict], step: int) -> dict:
        """The train record's epoch, loss and accuracy from the train steps' metrics."""
        batch_size = self.config.training.batch_size
        return {
            "epoch": step * batch_size / len(self.splits.train.labels),
            "loss": float(np.mean([v["loss"] for v in values])),
            "accuracy": float(np.sum([v["correct"] for v in values])) / (len(values) * batch_size),
        }

    def results(self, step: int, record, final_eval: dict, final_test: dict, best_test: dict):
        """results.json: the final and best evaluations, size, cost and speed of the run."""
        config, split = self.config, self.config.dataset.eval_split
        summary = model_summary.to_json(self.specs)
        return {
            "model": config.model.name,
            "dataset": config.dataset.name,
            "seed": config.seed,
            "steps": step,
            "eval_split": split,
            "final": {split: final_eval, "test": final_test},
            "best": {
                "step": record.best["step"],
                split: {k: record.best[k] for k in ("accuracy", "loss")},
                "test": best_test,
            },
            "test_accuracy": final_test["accuracy"],
            "params": summary["total_params"],
            "flops_per_image": summary["total_flops"],
            "train_seconds": record.train_seconds,
            "images_per_s": statistics.median(record.rates) if record.rates else None,
            "compile_seconds": self.compile_seconds,
            "skipped_updates": record.skipped_updates,
        }

    def evaluate(self, state, split: data.Split) -> dict:
        """Returns {'loss', 'accuracy', 'count'} of `state` over `split` by the eval step.
        With the dataset on the devices, the split's batches are sent once and kept there."""
        batches = None
        if self.on_device:
            key = id(split)
            if key not in self.device_eval:
                self.device_eval[key] = (split, list(self._eval_batches(split)))
            batches = self.device_eval[key][1]
        return steps_lib.evaluate_split(
            self.eval_step, state, split, self.config, self.mesh, batches=batches
        )

    def _eval_batches(self, split: data.Split) -> Iterator[dict]:
        return data.eval_batches(
            split,
            global_batch_size=self.config.training.eval_batch_size,
            sharding=self.batch_sharding,
        )


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Raises UserError unless both batch sizes divide evenly over the devices."""
    t = config.training
    for field in ("batch_size", "eval_batch_size"):
        if t[field] % jax.device_count():
            raise UserError(
                f"config.training.{field}={t[field]} is not divisible by the {jax.device_count()} "
                f"devices; use a multiple of {jax.device_count()}."
            )


# auto: the dataset goes on the devices when its splits take at most this share of one device's
# memory (the rest is for the model, its gradients and activations)
ON_DEVICE_MEMORY_SHARE = 0.25
# ... or, when the backend does not report its memory, at most this many bytes
ON_DEVICE_DEFAULT_BYTES = 2 << 30


def resolve_on_device(setting: str, splits: data.Splits, device=None) -> tuple[bool, str]:
    """Whether the dataset is held on the devices (config.dataset.on_device), and why.

    'on' / 'off' as set; 'auto': on for an accelerator (GPU, TPU) whose memory holds the splits
    within ON_DEVICE_MEMORY_SHARE, off on the CPU (where host and device memory are one: the
    host pipeline is the tested default there, and the speed is the same).
    """
    if setting in ("on", "off"):
        return setting == "on", f"config.dataset.on_device={setting}"
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return False, "auto: the CPU backend"
    needed = batches_lib.dataset_bytes(splits.train, splits.validation, splits.test)
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    allowed = ON_DEVICE_MEMORY_SHARE * limit if limit else ON_DEVICE_DEFAULT_BYTES
    fits = needed <= allowed
    return fits, (
        f"auto: the splits take {needed / 2**20:.0f} MiB, "
        f"{'within' if fits else 'more than'} {allowed / 2**20:.0f} MiB of {device.device_kind}"
    )


def setup(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | Path | None = None,
    restore: Restore | None = None,
    steps: tuple[str, ...] = steps_lib.STEPS,
    distributed: bool = True,
    init_compiler_options: dict | None = None,
    splits: data.Splits | None = None,
) -> Setup:
    """Checks `config`, then builds what a run needs, in this order: jax.distributed (when
    `distributed` and the config or the cluster asks for it), the workdir, the device mesh,
    the data, the train state, the compiled `steps` (train and/or eval).

    With `workdir` (training): the workdir is created or checked against its config.json, its
    static files written, and the state restored from its latest checkpoint when there is one.
    With `restore`: the state is what `restore(abstract_state)` returns. Otherwise a fresh
    state (its init program built with `init_compiler_options`, see training.state).
    `splits`: the config's data, already loaded (a benchmark timing many configs of one
    dataset); by default `data.load` reads it. Raises UserError naming the first problem.
    """
    if "detection" in config:  # configs/detection.py: would train a classifier, silently
        raise UserError(
            "this is a detection config (configs/detection.py): train it with `python -m "
            "detection train`, or its experiment with `python -m experiments.detection run`"
        )
    if distributed:
        runtime.maybe_initialize_distributed(config.distributed)
    info, specs = schema.validate(config)
    check_batch_sizes(config)
    runtime.warn_about_hardware(config.model.dtype)
    return with_workdir(
        config,
        workdir,
        lambda path: _build(
            config, info, specs, path, restore, steps, init_compiler_options, splits
        ),
    )


def with_workdir(
    config: ml_collections.ConfigDict, workdir: str | Path | None, build: Callable[[Path | None], R]
) -> R:
    """Returns `build(workdir)` with the workdir created or checked against its config.json
    and locked by process 0 (training.workdir); the lock is the result's `lock` (released
    when the run ends), released at once if `build` fails. No workdir: build(None)."""
    lock = None
    if workdir is not None:
        workdir, lock = workdir_lib.prepare(config, workdir, lock=jax.process_index() == 0)
    try:
        run = build(workdir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def open_checkpoints(
    config: ml_collections.ConfigDict, workdir: Path | None, specs, restore: Restore | None
) -> tuple[ckpt_lib.Checkpoints | None, Restore | None]:
    """Returns (checkpoints, restore) of a training run: with a workdir, its run files written
    (process 0), its Checkpoints, and the restore of its latest checkpoint when it has one
    (else `restore`); without one, (None, `restore`)."""
    if workdir is None:
        return None, restore
    if jax.process_index() == 0:
        workdir_lib.write_run_files(workdir, config, specs)
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.training.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        restore = checkpoints.restore
    return checkpoints, restore


def initial_state(
    restore: Restore | None, abstract: Callable[[], Any], create: Callable[[], Any]
) -> tuple[int, Any, dict]:
    """Returns (step, state, meta): what `restore(abstract())` reads, or (0, create(), {})
    without `restore` or when every checkpoint is damaged (a warning: training starts
    afresh). `abstract` and `create` are only called when needed."""
    if restore is not None:  # no initial state to compute
        try:
            return restore(abstract())
        except ckpt_lib.NoReadableCheckpoint as e:
            logging.warning("%s; starting from step 0", e)
    return 0, create(), {}


def _build(config, info, specs, workdir, restore, steps, init_compiler_options, splits) -> Setup:
    mesh = runtime.make_mesh()
    start = time.perf_counter()
    if splits is None:
        splits = data.load(
            config.dataset,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    data_seconds = time.perf_counter() - start
    checkpoints, restore = open_checkpoints(config, workdir, specs, restore)
    start = time.perf_counter()
    graphdefs = []  # the model's structure, from whichever of the two is called last

    def abstract():
        graphdef, abstract_state = state_lib.abstract_train_state(config, info, mesh)
        graphdefs.append(graphdef)
        return abstract_state

    def create():
        graphdef, state = state_lib.create_train_state(
            config, info, mesh, compiler_options=init_compiler_options
        )
        graphdefs.append(graphdef)
        return jax.block_until_ready(state)

    step, state, meta = initial_state(restore, abstract, create)
    graphdef = graphdefs[-1]
    init_seconds = time.perf_counter() - start
    on_device, why = resolve_on_device(config.dataset.get("on_device", "auto"), splits)
    logging.info("dataset on the devices: %s (%s)", "yes" if on_device else "no", why)
    device_train = None
    if on_device and "train" in steps:
        start = time.perf_counter()
        device_train = batches_lib.device_dataset(splits.train, NamedSharding(mesh, P()))
        data_seconds += time.perf_counter() - start
    train_fn, eval_fn, compile_seconds = steps_lib.compile_steps(
        config, graphdef, state, splits, mesh, steps, on_device=on_device
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
        on_device=on_device,
        device_train=device_train,
    )
