"""Orbax checkpoints of a run: the latest K for resuming, and the best by validation accuracy.

Layout in the workdir: `checkpoints/<step>/` (latest K) and `best/<step>/` (one). Orbax writes
each save into a temporary folder and renames it when complete, so a run killed mid-save leaves
the previous checkpoint intact and the partial one ignored.
"""

import errno
from pathlib import Path

import orbax.checkpoint as ocp
from absl import logging

from errors import UserError


def _disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


class Checkpoints:
    """The two checkpoint managers of a workdir. Every process of a multi-host run calls these."""

    def __init__(self, workdir: str | Path, keep: int, *, read_only: bool = False):
        workdir = Path(workdir).absolute()
        self.workdir = workdir

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
            try:
                manager.save(step, args=args, force=True)
            except Exception as e:
                self._raise_save_error(e, step)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        for manager in (self.latest, self.best):
            try:
                manager.wait_until_finished()
            except Exception as e:
                self._raise_save_error(e, manager.latest_step())

    def _raise_save_error(self, error: Exception, step) -> None:
        previous = self.latest.all_steps()
        kept = (
            f"the previous checkpoint (step {max(previous)}) is intact"
            if previous
            else ("no earlier checkpoint exists")
        )
        if _disk_full(error):
            raise UserError(
                f"disk full while saving the checkpoint of step {step} in {self.workdir}; "
                f"{kept}. Free some space and rerun the same command to resume."
            ) from error
        raise error

    def restore(self, abstract_state, step: int | str = "latest"):
        """Returns (step, state, meta) restored onto the shardings of `abstract_state`.

        `step`: 'latest' (falls back to older checkpoints, with a warning, when the newest is
        unreadable), 'best', or a step number. Raises UserError when nothing can be read.
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
        errors = []
        for s in steps:
            try:
                args = ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                )
                restored = manager.restore(s, args=args)
                if errors:
                    logging.warning(
                        "resumed from step %d; newer checkpoints unreadable: %s", s, errors
                    )
                return s, restored["state"], restored["meta"]
            except Exception as e:  # a truncated or foreign checkpoint
                reason = str(e).split(" See full TensorStore details")[0].splitlines()[0][:300]
                errors.append(f"step {s}: {type(e).__name__}: {reason}")
                if step != "latest":
                    break
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
