"""Loading a trained run from its workdir for evaluation: its config, the chosen checkpoint
(read-only, so a run that is still training is left alone), its data and compiled eval step,
all built by `training.setup.setup`, the one set-up sequence every caller shares.

Every failure is a UserError naming the cause: no workdir, no config.json, no checkpoint, a
corrupt checkpoint, or a config.json whose model does not match the checkpoint's arrays.
"""

import contextlib
import dataclasses
import functools
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import configs
import data
from errors import UserError
from training import checkpoint as ckpt_lib
from training import setup as setup_lib
from training import state as state_lib

SPLITS = ("test", "validation", "train")


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A restored training run: its workdir and its `Setup` (config, data, model structure,
    the state at `step`, and the compiled eval step)."""

    workdir: Path
    setup: setup_lib.Setup

    config = property(lambda self: self.setup.config)
    info = property(lambda self: self.setup.info)
    specs = property(lambda self: self.setup.specs)
    splits = property(lambda self: self.setup.splits)
    mesh = property(lambda self: self.setup.mesh)
    graphdef = property(lambda self: self.setup.graphdef)
    state = property(lambda self: self.setup.state)
    step = property(lambda self: self.setup.step)

    def split(self, name: str) -> data.Split:
        """Returns the split `name` (test | validation | train); UserError when it is empty."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}.")
        split = getattr(self.splits, name)
        if split is None:
            raise UserError(
                f"the run {self.workdir} holds no validation split (its config has "
                "dataset.validation_size = 0); use --split=test."
            )
        return split

    def normalization(self) -> dict[str, np.ndarray]:
        """The training set's per-channel {'mean', 'std'} the model's inputs are scaled by."""
        return {
            "mean": np.asarray(self.splits.mean, np.float32),
            "std": np.asarray(self.splits.std, np.float32),
        }

    def apply_fn(self):
        """Returns `predict` for the model as an `(state, uint8 images) -> logits` function."""
        return functools.partial(
            state_lib.predict, graphdef=self.graphdef, config=self.config, **self.normalization()
        )

    def timed_evaluation(self, split: data.Split) -> dict[str, float]:
        """Returns {'loss', 'accuracy', 'count', 'images_per_s'} of `split` by the compiled
        eval step.

        images/s: one pass over the split, host-to-device transfers included, in batches of
        config.training.eval_batch_size on every device of the mesh, after one untimed batch
        (so that one-time costs stay out of the timing).
        """
        first = next(
            data.eval_batches(
                split,
                global_batch_size=self.config.training.eval_batch_size,
                sharding=self.setup.batch_sharding,
            )
        )
        jax.block_until_ready(self.setup.eval_step(self.state, first))
        start = time.perf_counter()
        result = self.setup.evaluate(self.state, split)
        seconds = time.perf_counter() - start
        return {**result, "images_per_s": result["count"] / seconds}


def read_config(workdir: Path) -> ml_collections.ConfigDict:
    """Returns the config saved in `workdir` (config.json); UserError when there is none."""
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist; pass the --workdir of a train.py run.")
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(
            f"{workdir} has no config.json, so it is not the workdir of a train.py run; "
            "pass the --workdir given to train.py."
        )
    try:
        return configs.from_json(path.read_text())
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot read {path} ({e}); it is not a train.py config.") from e


def parse_checkpoint(checkpoint: str | int) -> str | int:
    """Returns 'latest', 'best' or a step number; UserError for anything else."""
    text = str(checkpoint)
    if text in ("latest", "best"):
        return text
    if text.isdigit():
        return int(text)
    raise UserError(f"--checkpoint={text!r}: use latest, best or a step number.")


def _shape_differences(abstract, stored) -> list[str]:
    """Returns 'path: checkpoint shape vs config shape' for every array that differs."""

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape for p, x in leaves}

    # Parameters first: they name the layers; the optimizer's copies repeat them.
    order = lambda path: (not path.startswith("params/"), path)
    want = dict(sorted(shapes(abstract).items(), key=lambda kv: order(kv[0])))
    have = shapes(stored)
    out = [
        f"{k}: {tuple(have[k])} in the checkpoint, {tuple(want[k])} from config.json"
        for k in want
        if k in have and tuple(have[k]) != tuple(want[k])
    ]
    out += [f"{k}: missing from the checkpoint" for k in want if k not in have]
    out += [f"{k}: in the checkpoint, not in the config's model" for k in have if k not in want]
    return out


def _config_mismatch(checkpoints: ckpt_lib.Checkpoints, which: str | int, abstract) -> list[str]:
    """Returns how the arrays of the checkpoint `which` differ from `abstract` (empty when they
    match, or when the checkpoint's metadata is unreadable: then it is corrupt, not foreign)."""
    manager = checkpoints.best if which == "best" else checkpoints.latest
    steps = manager.all_steps()
    step = which if isinstance(which, int) else (max(steps) if steps else None)
    if step not in steps:
        return []
    # Checkpoints are saved as Composite(state=StandardSave, meta=JsonSave): `<step>/state`.
    path = Path(str(manager.directory)) / str(step) / "state"
    try:
        with ocp.StandardCheckpointer() as reader:
            stored = reader.metadata(path).item_metadata
        return _shape_differences(abstract, stored)
    except Exception:  # unreadable metadata: the restore error says more
        return []


_SETTLE_SECONDS = 0.25  # after a failed read, the wait for TensorStore's threads to go quiet


@contextlib.contextmanager
def _stderr_held_back():
    """Holds back what the process writes to stderr (file descriptor 2, so native threads too)
    while the block runs: replayed when it succeeds, dropped when it raises.

    When a checkpoint is corrupt, Orbax's reader threads print tracebacks (an event loop
    already closed, coroutines never awaited) after the read has failed; the UserError raised
    then says what matters in one line.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            gc.collect()  # finalise the failed read's coroutines while their output is held
            # Reads already in flight finish on TensorStore's threads within milliseconds and
            # then print; let them, so that their output lands here and not after the error.
            time.sleep(_SETTLE_SECONDS)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                sys.stderr.buffer.write(held.read())
                sys.stderr.flush()


def read_only_restore(config, workdir: Path, checkpoint: str | int) -> setup_lib.Restore:
    """Returns the `restore` for `setup`: it reads the checkpoint `checkpoint` of `workdir`
    into the abstract state it is given and returns (step, state, meta).

    The checkpoints are opened read-only, so a run that is still training is left alone. The
    checks that need no arrays (the checkpoint's name, a checkpoints folder) run now; the
    restore raises UserError naming the cause: no such checkpoint, a corrupt one, or a
    config.json whose model does not match the checkpoint's arrays.
    """
    which = parse_checkpoint(checkpoint)
    if not (workdir / "checkpoints").is_dir():
        raise UserError(
            f"{workdir} has no checkpoints yet; wait for train.py's first checkpoint "
            f"(every {config.training.checkpoint_every_steps} steps)."
        )

    def restore(abstract):
        checkpoints = ckpt_lib.Checkpoints(
            workdir, keep=config.training.keep_checkpoints, read_only=True
        )
        # The whole failure path (the metadata read and closing the managers included) runs
        # with stderr held back: Orbax's reader threads print their tracebacks while it unwinds.
        with _stderr_held_back():
            try:
                return checkpoints.restore(abstract, which)
            except UserError as error:
                differences = _config_mismatch(checkpoints, which, abstract)
                if differences:
                    more = len(differences) - 3
                    raise UserError(
                        f"{workdir / 'config.json'} does not match the checkpoint's arrays: "
                        + "; ".join(differences[:3])
                        + (f" (and {more} more)" if more > 0 else "")
                        + ". Was config.json edited? Restore the config that trained this run."
                    ) from error
                raise
            finally:
                checkpoints.close()

    return restore


def load_run(workdir: str | Path, checkpoint: str | int = "latest") -> Run:
    """Returns the run of `workdir` restored from `checkpoint` ('latest', 'best' or a step),
    with its data loaded and its eval step compiled. Raises UserError for a missing workdir,
    config or checkpoint, a corrupt checkpoint, or a config that does not match it."""
    workdir = Path(workdir)
    config = read_config(workdir)
    restore = read_only_restore(config, workdir, checkpoint)
    setup = setup_lib.setup(config, restore=restore, steps=("eval",), distributed=False)
    return Run(workdir, setup)
