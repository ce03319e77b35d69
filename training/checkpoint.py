"""Orbax checkpoints of a run: the latest K for resuming, and the best by validation accuracy.

Layout in the workdir: `checkpoints/<step>/` (latest K) and `best/<step>/` (one). Orbax writes
each save into a temporary folder and renames it when complete, so a run killed mid-save leaves
the previous checkpoint intact and the partial one ignored. A step that cannot be read (a
truncated file, deleted metadata) is moved to `quarantine/` (outside what Orbax scans) with one
warning, and the run goes on from the previous one: the step is then saved again, not refused
as existing.
"""

import contextlib
import errno
import logging as std_logging
import shutil
import sys
import threading
import time
from pathlib import Path

import orbax.checkpoint as ocp
from absl import logging

from errors import UserError

QUARANTINE = "quarantine"

# Text by which a failed write says the disk is full: Orbax re-raises TensorStore's errors as
# ValueError('RESOURCE_EXHAUSTED: ... No space left on device [os_error_code=28]').
_DISK_FULL_MARKERS = ("No space left on device", "os_error_code='28'", "os_error_code=28")


def _disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(marker in str(error) for marker in _DISK_FULL_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False


class _LibraryNoise(std_logging.Filter):
    """Drops Orbax's log records that this module turns into its own one line: the notice that a
    read-only manager (eval beside a training) is read only, and, once a save found the disk
    full (`after_disk_full`), the errors and tracebacks of every writer thread and asyncio task
    of the failed saves (Checkpoints raises one UserError instead)."""

    after_disk_full = False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "orbax" not in record.pathname and record.name != "asyncio":
            return True
        message = record.getMessage()
        if record.levelno <= std_logging.WARNING and (
            "read only" in message or "read_only" in message
        ):
            return False
        if record.levelno < std_logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        disk_full = _disk_full(Exception(message)) or _disk_full(error)
        return not (disk_full or _LibraryNoise.after_disk_full)


def _quiet_closed_loop_callbacks() -> None:
    """TensorStore's write callbacks that arrive after Orbax closed its event loop (they do when
    a write failed, e.g. on a full disk), and the failed saves' threads that outlive them,
    print tracebacks through the unraisable/thread hooks; they carry nothing: drop those."""

    def noise(exc) -> bool:
        if _disk_full(exc):  # a writer thread's: the caller says it in one line
            return True
        text = str(exc) if isinstance(exc, RuntimeError) else ""
        return text == "Event loop is closed" or (
            _LibraryNoise.after_disk_full and text.startswith("cannot schedule new futures")
        )

    previous_unraisable, previous_thread = sys.unraisablehook, threading.excepthook
    if getattr(previous_unraisable, "_convnets", False):
        return

    def unraisable(args):
        if not noise(args.exc_value):
            previous_unraisable(args)

    def thread(args):
        if not noise(args.exc_value):
            previous_thread(args)

    unraisable._convnets = thread._convnets = True
    sys.unraisablehook, threading.excepthook = unraisable, thread


_noise_filter = _LibraryNoise()


def _install_filters() -> None:
    for name in ("absl", "asyncio"):
        logger = std_logging.getLogger(name)
        if _noise_filter not in logger.filters:
            logger.addFilter(_noise_filter)
    _quiet_closed_loop_callbacks()


def _is_chief() -> bool:
    import jax

    return jax.process_index() == 0


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """The two checkpoint managers of a workdir. Every process of a multi-host run calls these."""

    def __init__(self, workdir: str | Path, keep: int, *, read_only: bool = False):
        _install_filters()
        workdir = Path(workdir).absolute()
        self.workdir = workdir
        self.read_only = read_only
        self._disk_was_full = False
        if not read_only:  # a new run: what Orbax says is news again
            _LibraryNoise.after_disk_full = False
        self._saving: dict[int, int] = {}  # manager -> the step of its last save request

        def options(max_to_keep: int) -> ocp.CheckpointManagerOptions:
            if read_only:  # e.g. eval.py beside a running training: create and delete nothing
                return ocp.CheckpointManagerOptions(read_only=True)
            return ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
            )

        self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=options(keep))
        self.best = ocp.CheckpointManager(workdir / "best", options=options(1))

    def latest_step(self) -> int | None:
        """Returns the step of the newest complete checkpoint, or None."""
        return self.latest.latest_step()

    def save(self, step: int, state, meta: dict, *, best: bool = False) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON: the loop's bookkeeping) at
        `step`, also as the best checkpoint when `best`."""
        managers = [self.latest] + ([self.best] if best else [])
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        for manager in managers:
            self._clear_leftover(manager, step)
            if step in manager.all_steps():
                # written by an earlier attempt of this run that was resumed from an older
                # step (the best of a replayed step, or a step after a quarantine): the replay
                # computes the same state again, so the new save replaces it
                manager.delete(step)
            self._saving[id(manager)] = step
            try:
                manager.save(step, args=args, force=True)
            except Exception as e:
                self._raise_save_error(e, step)

    def _clear_leftover(self, manager: ocp.CheckpointManager, step: int) -> None:
        """A folder of `step` that Orbax does not list as a checkpoint (its metadata lost) would
        make the save fail as existing: it goes to quarantine first."""
        folder = Path(manager.directory) / str(step)
        if folder.exists() and step not in manager.all_steps():
            self._quarantine(manager, step, "not a complete checkpoint")

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        for manager in (self.latest, self.best):
            try:
                manager.wait_until_finished()
            except Exception as e:
                self._raise_save_error(e, self._saving.get(id(manager)))

    def _raise_save_error(self, error: Exception, step) -> None:
        if self._disk_was_full:  # already said; closing after it has nothing to add
            return
        if not _disk_full(error):
            raise error
        self._disk_was_full = _LibraryNoise.after_disk_full = True
        for manager in (self.latest, self.best):  # the other save may still be writing
            with contextlib.suppress(Exception):  # the same full disk: said below
                manager.wait_until_finished()
        for manager in (self.latest, self.best):  # free what the failed saves took
            if _is_chief():
                for partial in Path(manager.directory).glob("*.orbax-checkpoint-tmp*"):
                    shutil.rmtree(partial, ignore_errors=True)
            manager.reload()
        previous = self.latest.all_steps()
        if step in previous:  # its copy as the best checkpoint failed
            kept = f"the checkpoint of step {step} itself is intact"
        elif previous:
            kept = f"the previous checkpoint (step {max(previous)}) is intact"
        else:
            kept = "no earlier checkpoint exists"
        raise UserError(
            f"disk full while saving the checkpoint of step {step} in {self.workdir}; "
            f"{kept}. Free some space and rerun the same command to resume."
        ) from None

    def _quarantine(self, manager: ocp.CheckpointManager, step: int, reason: str) -> None:
        """Moves checkpoint `step` of `manager` to WORKDIR/quarantine/ with one warning line."""
        folder = Path(manager.directory) / str(step)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.workdir / QUARANTINE / f"{Path(manager.directory).name}-{step}-{stamp}"
        if _is_chief() and folder.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)
            logging.warning("checkpoint %s is damaged (%s); moved it to %s", folder, reason, target)
        _sync(f"quarantine {folder}")
        manager.reload()

    def restore(self, abstract_state, step: int | str = "latest"):
        """Returns (step, state, meta) restored onto the shardings of `abstract_state`.

        `step`: 'latest', 'best', or a step number. Raises UserError when nothing can be read.
        With 'latest' (training's resume), a checkpoint that cannot be read while an older one
        can is damaged: it is moved to quarantine/ with one warning line (unless read only) and
        the older one is returned. When none can be read and none failed for not fitting the
        config (another model's checkpoint), all are damaged: they are quarantined and
        `NoReadableCheckpoint` says to start afresh.
        """
        manager = self.best if step == "best" else self.latest
        steps = sorted(manager.all_steps(), reverse=True)
        if isinstance(step, int) or (isinstance(step, str) and step.isdigit()):
            steps = [s for s in steps if s == int(step)]
        if not steps:
            raise UserError(
                f"no {'best ' if step == 'best' else ''}checkpoint"
                f"{'' if step in ('latest', 'best') else f' at step {step}'} in "
                f"{manager.directory}; available steps: {sorted(manager.all_steps()) or 'none'}."
            )
        errors, damaged, foreign = [], [], False
        for s in steps:
            try:
                args = ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                )
                restored = manager.restore(s, args=args)
            except Exception as e:  # a truncated or foreign checkpoint
                reason = str(e).split(" See full TensorStore details")[0].splitlines()[0][:300]
                errors.append(f"step {s}: {type(e).__name__}: {reason}")
                damaged.append((s, f"{type(e).__name__}: {reason}"))
                foreign = foreign or _does_not_fit(e)
                if step != "latest":
                    break
                continue
            if damaged and not self.read_only:
                for bad, reason in damaged:  # an older step of the same run reads: damage
                    self._quarantine(manager, bad, reason)
            elif damaged:
                logging.warning("read step %d; newer checkpoints unreadable: %s", s, errors)
            return s, restored["state"], restored["meta"]
        if step == "latest" and not foreign and not self.read_only:
            for bad, reason in damaged:
                self._quarantine(manager, bad, reason)
            raise NoReadableCheckpoint(
                f"no checkpoint in {manager.directory} can be read ({'; '.join(errors)}); "
                f"moved them to {self.workdir / QUARANTINE}"
            )
        raise UserError(
            f"cannot read the checkpoint in {manager.directory} ({'; '.join(errors)}). It is "
            "corrupt or was written by a different config/model; point --workdir at the run "
            "that wrote it, or delete the folder to start afresh."
        )

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        self.wait()
        self.latest.close()
        self.best.close()


class NoReadableCheckpoint(UserError):
    """Every checkpoint of the workdir was damaged and moved to quarantine/: start afresh."""


def _does_not_fit(error: Exception) -> bool:
    """Whether a restore failed because the checkpoint's arrays do not fit the config's state
    (another model's checkpoint: not damage, so nothing is moved)."""
    text = str(error)
    return any(
        marker in text
        for marker in ("is not compatible with the stored shape", "tree structure", "Missing")
    )
