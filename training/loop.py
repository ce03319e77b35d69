"""The training loop: steps, logs, evaluations and checkpoints until `training.num_steps`.

    results = train_and_evaluate(config, workdir)   # resumes from the workdir's checkpoint
    results = train_and_evaluate(config, workdir, prepare=detection.train.setup)

The loop's bookkeeping is one small record (`LoopRecord`), saved with every checkpoint, so a
resumed run ends with the same totals as an uninterrupted one; `itstime` says when to log,
evaluate and checkpoint.

The loop trains a *run*: what `prepare(config, workdir=...)` returns, `training.setup.Setup`
for classification (`detection.train.Run` for detection). Besides Setup's config, step, meta,
workdir, checkpoints, lock and compile_seconds, a run provides what differs between tasks:

    train_step(state, inputs) -> (state, metrics)   metrics hold at least loss and nonfinite
    train_batches()                     the train step's inputs, from the run's step on
    eval_split(), test_split()          what `evaluate` takes: the periodic and final splits
    evaluate(state, split) -> dict      the measures; their numbers go to metrics.jsonl
    best_measures                       (name, ...): the first, higher is better, picks the
                                        best checkpoint; all are kept in the loop record
    throughput                          (name, examples per step) of the logged rate
    train_fields(values, step) -> dict  the train record's fields from the steps' metrics
    results(step, record, final_eval, final_test, best_test) -> dict   results.json
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from errors import UserError
from training import metrics as metrics_lib
from training import optim, runtime
from training.setup import setup
from training.state import abstract_like

# what the loop trains: training.setup.Setup, or another task's run (see the module docstring)
Run = Any


class Diverged(UserError):
    """The loss became NaN or Inf and the config says to stop."""


class Preempted(Exception):
    """SIGTERM (a cluster's preemption) or SIGINT (Ctrl-C) arrived; the checkpoint of `step` is
    saved. `exit_code`: the shell's convention for the signal (143, 130)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(
            f"stopped by {runtime.signal_name(signum)} after saving the checkpoint of step {step}; "
            "rerun the same command to resume"
        )
        self.step, self.signum, self.exit_code = step, signum, 128 + signum


def itstime(step: int, every: int, total: int) -> bool:
    """True every `every` steps, and at the last step (as big_vision's `u.itstime`)."""
    return step == total or (every > 0 and step % every == 0)


@dataclasses.dataclass
class LoopRecord:
    """The loop's bookkeeping, also each checkpoint's metadata: the images/s of each logged
    interval, the best evaluation so far, the updates skipped for a non-finite loss, and the
    seconds spent training (evaluations and compilation excluded)."""

    rates: list[float] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"accuracy": -1.0, "step": None})
    skipped_updates: int = 0
    train_seconds: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict) -> LoopRecord:
        """The record saved in a checkpoint's metadata ({} for a fresh run)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)


class Preemption:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks, so it can save a
    checkpoint and exit. A second Ctrl-C interrupts at once (KeyboardInterrupt), unsaved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None  # the signal that arrived
        self._previous = {}
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt  # pressed twice: stop now
        self.requested = signum
        if signum == signal.SIGINT:
            logging.warning("Ctrl-C: saving a checkpoint, then stopping (Ctrl-C again: now)")

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class TrainLog:
    """Collects the step metrics between logs (read with one host sync at `flush`), and turns
    them into metrics.jsonl's train records; stops on a non-finite loss if the config says so."""

    def __init__(self, s: Run, record: LoopRecord):
        self.s, self.record = s, record
        self.schedule = optim.make_schedule(s.config)
        self.pending: list[tuple[int, dict]] = []
        self.pause(s.step)

    def pause(self, step: int) -> None:
        """Starts a new timing interval at `step` (what happened before is not training)."""
        self.tick, self.tick_step = time.perf_counter(), step

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, step: int, last_saved: int) -> dict:
        """Returns the train record of the steps since the last flush."""
        t = self.s.config.training
        values = jax.device_get([m for _, m in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        for s, v in zip(steps, values, strict=True):
            if v["nonfinite"]:
                if t.on_nonfinite_loss == "stop":
                    where = (
                        f"The last good checkpoint is step {last_saved} in "
                        f"{self.s.workdir / 'checkpoints'}; to change the config, use a new "
                        "--workdir"
                        if last_saved
                        else "No checkpoint was saved, so this workdir takes a changed config"
                    )
                    raise Diverged(
                        f"the loss became {v['loss']} at step {s}; training stopped. {where}: "
                        "lower optimizer.learning_rate, add schedule.warmup_steps or "
                        "optimizer.grad_clip_norm, or set training.on_nonfinite_loss=skip."
                    )
                self.record.skipped_updates += 1
        now = time.perf_counter()
        self.record.train_seconds += now - self.tick
        name, per_step = self.s.throughput
        rate = (step - self.tick_step) * per_step / max(now - self.tick, 1e-9)
        self.pause(step)
        self.record.rates.append(rate)
        good = [v for v in values if not v["nonfinite"]] or values
        return {
            "step": step,
            "split": "train",
            **self.s.train_fields(good, step),
            "learning_rate": float(self.schedule(step - 1)),
            name: rate,
            "wall_time": time.time(),
            "skipped_updates": self.record.skipped_updates,
        }


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    prepare: Callable[..., Run] = setup,
) -> dict:
    """Trains and evaluates the configured model; returns the results also written to
    results.json. Resumes from the latest checkpoint in `workdir` when there is one. The
    workdir is locked for this run (another run there gets one line naming this one).
    `prepare(config, workdir=)`: the task's set-up (default: classification's)."""
    s = prepare(config, workdir=workdir)
    try:
        return _train(s)
    finally:
        if s.lock is not None:
            s.lock.release()


def _numbers(result: dict) -> dict:
    """The measures of an evaluation that metrics.jsonl and TensorBoard take: its numbers."""
    return {k: v for k, v in result.items() if isinstance(v, int | float)}


def _train(s: Run) -> dict:
    config = s.config
    if s.step:
        logging.info("resuming from the checkpoint of step %d", s.step)
    logging.info("compiled the train and eval steps in %.1f s", s.compile_seconds)
    t, chief = config.training, jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(s.workdir, enabled=chief)
    writer.truncate_after(s.step)
    progress = metrics_lib.Progress(t.num_steps, s.step, mode=t.progress, enabled=chief)
    record = LoopRecord.from_meta(s.meta)
    best_key = s.best_measures[0]
    log, batches, preemption = TrainLog(s, record), s.train_batches(), Preemption()
    state, step, last_saved, final_eval = s.state, s.step, s.step, None
    try:
        while step < t.num_steps:
            state, step_metrics = s.train_step(state, next(batches))
            step += 1
            log.add(step, step_metrics)
            checkpoint_due = itstime(step, t.checkpoint_every_steps, t.num_steps)
            stopping = preemption.requested  # read once: a signal mid-step counts from the next
            if itstime(step, t.log_every_steps, t.num_steps) or checkpoint_due or stopping:
                train_record = log.flush(step, last_saved)
                writer.write(train_record)
                shown = {k: train_record[k] for k in ("loss", "accuracy") if k in train_record}
                progress.update(step, **shown)
            is_best = False
            if itstime(step, t.eval_every_steps, t.num_steps):
                final_eval = s.evaluate(state, s.eval_split())
                writer.write(
                    {
                        "step": step,
                        "split": config.dataset.eval_split,
                        **_numbers(final_eval),
                        "wall_time": time.time(),
                    }
                )
                is_best = final_eval[best_key] > record.best.get(best_key, -np.inf)
                if is_best:
                    record.best = {k: final_eval[k] for k in s.best_measures} | {"step": step}
                log.pause(step)  # evaluation time is not training time
            if checkpoint_due or stopping or is_best:
                s.checkpoints.save(step, state, record.to_meta(), best=is_best)
                last_saved = step
            if stopping and step < t.num_steps:
                raise Preempted(step, stopping)
    except BaseException:
        _close_after_error(s, writer, progress)
        raise
    finally:
        preemption.restore()  # from here on, Ctrl-C interrupts at once
    progress.close()
    return finish(s, state, step, record, final_eval, writer)


def _close_after_error(s: Run, writer, progress) -> None:
    """Whatever stops the loop, checkpoints already started must reach the disk."""
    try:
        s.checkpoints.close()
    except Exception as e:  # the original error matters more
        logging.error("while closing checkpoints: %s", e)
    writer.close()
    progress.close()


def _best_state(s: Run, state, record: LoopRecord):
    """The best checkpoint's state; when its own copy is missing or unreadable (a full disk
    while copying it, a damaged file), the same step among the latest checkpoints."""
    try:
        return s.checkpoints.restore(abstract_like(state), "best")[1]
    except UserError as e:
        if record.best["step"] not in s.checkpoints.latest.all_steps():
            raise
        logging.warning("%s; reading the best step from checkpoints/ instead", e)
        return s.checkpoints.restore(abstract_like(state), record.best["step"])[1]


def finish(s: Run, state, step: int, record: LoopRecord, final_eval, writer) -> dict:
    """Evaluates the final and the best state on the test split; returns the results and
    writes them to results.json (and the final test record to metrics.jsonl)."""
    s.checkpoints.wait()
    if final_eval is None:  # killed after the last checkpoint, before results.json
        final_eval = s.evaluate(state, s.eval_split())
    if s.config.dataset.eval_split == "test":
        final_test = final_eval
    else:
        final_test = s.evaluate(state, s.test_split())
    best_state = _best_state(s, state, record)
    best_test = s.evaluate(best_state, s.test_split())
    s.checkpoints.close()
    results = s.results(step, record, final_eval, final_test, best_test)
    # when eval_split is 'test', the last periodic evaluation already wrote this record
    writer.write({"step": step, "split": "test", **_numbers(final_test), "wall_time": time.time()})
    writer.close()
    if record.skipped_updates:
        logging.warning(
            "skipped %d of %d updates for a non-finite loss (training.on_nonfinite_loss=skip); "
            "the results come from the others",
            record.skipped_updates,
            step,
        )
    if jax.process_index() == 0:
        (s.workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results
