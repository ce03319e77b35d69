"""Evaluates a trained run from its workdir: accuracy, loss, per-class accuracy, confusion
matrix, calibration, test-time cost, flip test-time augmentation, translation invariance, and
figures of what the layers do.

    python eval.py --workdir=runs/pooled [--checkpoint=latest|best|STEP] [--max_shift=8]
                   [--split=test] [--nofigures] [--tta|--notta]

Writes WORKDIR/eval/<checkpoint>/eval.json and the PNG figures next to it, and the scalars to
TensorBoard (WORKDIR/tensorboard/eval_<checkpoint>). The run may still be training: the
checkpoints are opened read-only (nothing there is created, cleaned up or deleted) and the
newest complete one is read.

Translation invariance (eval.json "shift"), measured in pixel space before normalisation:
- "shifts" 0..k and, for "circular" and "zero_fill" shifts, "accuracy" and "consistency" (the
  share of images whose top-1 class equals that of the unshifted image) when every image is
  moved by k pixels, example r of each eval batch in direction r mod 4: right, left, down, up
  (`evaluation.shift.DIRECTIONS`). Circular shifts wrap around (no information lost); zero-fill
  shifts bring in black pixels.
- "random_pair_consistency": the consistency of Zhang 2019 ("Making Convolutional Networks
  Shift-Invariant Again", arXiv 1904.11486): the probability that two random circular shifts
  (dy, dx) in [-k, k]^2 of one image get the same top-1 class (fixed seed, the same pairs for
  every model).
"""

from training import runtime

runtime.configure_jax()  # before JAX starts its backend

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import configs  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
from configs import schema  # noqa: E402
from errors import UserError  # noqa: E402
from evaluation import figures as figures_lib  # noqa: E402
from evaluation import internals  # noqa: E402
from evaluation import metrics as eval_metrics  # noqa: E402
from training import checkpoint as ckpt_lib  # noqa: E402
from training import state as state_lib  # noqa: E402
from training import steps as steps_lib  # noqa: E402

SPLITS = ("test", "validation", "train")
# Test images whose activation maps are drawn (the first ones of the split).
ACTIVATION_IMAGES = 2


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A restored training run: its config, data, model structure and state at `step`."""

    workdir: Path
    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    specs: list[models.LayerSpec]
    splits: data.Splits
    mesh: jax.sharding.Mesh
    graphdef: Any
    state: dict
    step: int

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


# --------------------------------------------------------------------------------------------
# Loading a run


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


def restore_state(config, info, mesh, workdir: Path, checkpoint: str | int):
    """Returns (graphdef, step, state) of the checkpoint `checkpoint` of `workdir`.

    The checkpoints are opened read-only, so a run that is still training is left alone.
    Raises UserError naming the cause: no checkpoint, a corrupt one, or a config.json whose
    model does not match the checkpoint's arrays.
    """
    which = parse_checkpoint(checkpoint)
    if not (workdir / "checkpoints").is_dir():
        raise UserError(
            f"{workdir} has no checkpoints yet; wait for train.py's first checkpoint "
            f"(every {config.training.checkpoint_every_steps} steps)."
        )
    graphdef, abstract = state_lib.abstract_train_state(config, info, mesh)
    checkpoints = ckpt_lib.Checkpoints(
        workdir, keep=config.training.keep_checkpoints, read_only=True
    )
    # The whole failure path (the metadata read and closing the managers included) runs with
    # stderr held back: Orbax's reader threads print their tracebacks while it unwinds.
    with _stderr_held_back():
        try:
            step, state, _ = checkpoints.restore(abstract, which)
        except UserError as error:
            differences = _config_mismatch(checkpoints, which, abstract)
            if differences:
                raise UserError(
                    f"{workdir / 'config.json'} does not match the checkpoint's arrays: "
                    + "; ".join(differences[:3])
                    + (f" (and {len(differences) - 3} more)" if len(differences) > 3 else "")
                    + ". Was config.json edited? Restore the config that trained this run."
                ) from error
            raise
        finally:
            checkpoints.close()
    return graphdef, step, state


def load_run(workdir: str | Path, checkpoint: str | int = "latest") -> Run:
    """Returns the run of `workdir` restored from `checkpoint` ('latest', 'best' or a step),
    with its data loaded. Raises UserError for a missing workdir, config or checkpoint."""
    workdir = Path(workdir)
    config = read_config(workdir)
    info, specs = schema.validate(config)
    mesh = runtime.make_mesh()
    graphdef, step, state = restore_state(config, info, mesh, workdir, checkpoint)
    splits = data.load(config.dataset, seed=config.seed)
    return Run(workdir, config, info, specs, splits, mesh, graphdef, state, step)


# --------------------------------------------------------------------------------------------
# Measurements


def _normalization(run: Run) -> dict[str, np.ndarray]:
    return {
        "mean": np.asarray(run.splits.mean, np.float32),
        "std": np.asarray(run.splits.std, np.float32),
    }


def apply_fn(run: Run) -> eval_metrics.ApplyFn:
    """Returns `predict` for `run`'s model as an `(state, images) -> logits` function."""
    return functools.partial(
        state_lib.predict, graphdef=run.graphdef, config=run.config, **_normalization(run)
    )


def timed_evaluation(run: Run, split: data.Split) -> dict[str, float]:
    """Returns {'loss', 'accuracy', 'count', 'images_per_s'} of `split` by steps_lib.eval_step.

    images/s: one pass over the split after compilation, host-to-device transfers included,
    in batches of config.training.eval_batch_size on every device of the mesh.
    """
    eval_fn = jax.jit(
        functools.partial(
            steps_lib.eval_step, graphdef=run.graphdef, config=run.config, **_normalization(run)
        )
    )
    first = next(
        data.eval_batches(
            split,
            global_batch_size=run.config.training.eval_batch_size,
            sharding=NamedSharding(run.mesh, P("data")),
        )
    )
    jax.block_until_ready(eval_fn(run.state, first))  # compile outside the timed pass
    start = time.perf_counter()
    result = steps_lib.evaluate_split(eval_fn, run.state, split, run.config, run.mesh)
    seconds = time.perf_counter() - start
    return {**result, "images_per_s": result["count"] / seconds}


def layer_internals(run: Run, split: data.Split, out_dir: Path) -> dict[str, Any]:
    """Draws the first layer's filters, the activation maps of each stage for the first
    ACTIVATION_IMAGES images, and the worked pooling window; returns what was drawn (JSON)."""
    model = state_lib.merge_model(run.graphdef, run.state)
    weights, description = internals.first_layer_filters(model, run.specs)
    figures_lib.filters(out_dir / "filters.png", weights, description)
    norm = _normalization(run)
    dtype = jnp.dtype(run.config.model.dtype)

    @jax.jit
    def capture(state, images):
        x = data.normalize(images, norm["mean"], norm["std"], dtype)
        return models.capture_activations(state_lib.merge_model(run.graphdef, state), x)[1]

    images = split.images[:ACTIVATION_IMAGES]
    activations = jax.device_get(capture(run.state, images))
    maps = []
    for i, image in enumerate(images):
        label = run.info.class_names[split.labels[i]]
        for spec in internals.activation_stages(run.specs):
            name = f"activations_{i}_{spec.name}.png"
            layer_maps = np.asarray(activations[spec.name][i])
            figures_lib.activation_maps(
                out_dir / name, image, spec.name, layer_maps, f"image {i}: {label}"
            )
            maps.append(
                {"image": i, "layer": spec.name, "shape": list(layer_maps.shape), "file": name}
            )
    example = internals.pooling_example(activations, run.specs)
    if example is not None:
        figures_lib.pooling_window(out_dir / "pooling_window.png", example)
    return {
        "first_layer": {"description": description, "file": "filters.png"},
        "activation_maps": maps,
        "pooling_example": example,
    }


def _write_tensorboard(workdir: Path, result: dict) -> None:
    """Writes the scalars of `result` at its checkpoint step to TensorBoard."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(workdir / "tensorboard" / f"eval_{result['checkpoint']}"))
    scalars = {
        key: result[key]
        for key in ("accuracy", "loss", "ece", "images_per_s", "tta_flip_accuracy")
        if result[key] is not None
    }
    scalars["random_pair_consistency"] = result["shift"]["random_pair_consistency"]
    for mode in eval_metrics.MODES:
        consistency = result["shift"][mode]["consistency"]
        scalars[f"{mode}_consistency_at_max_shift"] = consistency[-1]
    for key, value in scalars.items():
        writer.add_scalar(f"{result['split']}/{key}", value, result["step"])
    writer.close()


def evaluate_workdir(
    workdir: str | Path,
    checkpoint: str = "latest",
    *,
    max_shift: int = 8,
    figures: bool = True,
    split: str = "test",
    tta: bool | None = None,
) -> dict:
    """Evaluates the run in `workdir` at `checkpoint` ('latest', 'best' or a step) on `split`.

    Returns the results, also written to WORKDIR/eval/<checkpoint>/eval.json with the figures
    (when `figures`) beside it. `tta` (flip test-time augmentation): None measures it when the
    run trained with flips. Shift measures up to `max_shift` pixels (see the module docstring).
    Raises UserError for a missing workdir, config or checkpoint, a corrupt checkpoint, or a
    config that does not match the checkpoint.
    """
    if max_shift < 0:
        raise UserError(f"--max_shift={max_shift}: must be >= 0.")
    checkpoint = str(parse_checkpoint(checkpoint))
    run = load_run(workdir, checkpoint)
    examples = run.split(split)
    tta = run.config.dataset.augment_flip if tta is None else tta
    logging.info(
        "evaluating step %d of %s on %d %s images", run.step, workdir, len(examples), split
    )
    timed = timed_evaluation(run, examples)
    sums = eval_metrics.split_sums(
        apply_fn(run),
        run.state,
        examples,
        batch_size=run.config.training.eval_batch_size,
        mesh=run.mesh,
        num_classes=run.info.num_classes,
        max_shift=max_shift,
        tta=tta,
    )
    summary = eval_metrics.summarize(sums, max_shift)
    result = {
        "workdir": str(run.workdir),
        "checkpoint": checkpoint,
        "step": run.step,
        "split": split,
        "model": run.config.model.name,
        "dataset": run.config.dataset.name,
        "class_names": list(run.info.class_names),
        "count": timed["count"],
        "accuracy": timed["accuracy"],
        "loss": timed["loss"],
        **{k: summary[k] for k in ("per_class_accuracy", "confusion_matrix", "ece")},
        "calibration": summary["calibration"],
        "images_per_s": timed["images_per_s"],
        "batch_size": run.config.training.eval_batch_size,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "tta": bool(tta),
        "tta_flip_accuracy": summary["tta_flip_accuracy"],
        "shift": summary["shift"],
    }
    out_dir = run.workdir / "eval" / checkpoint
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):  # a previous evaluation's figures
        stale.unlink()
    if figures:
        figures_lib.confusion_matrix(
            out_dir / "confusion_matrix.png", summary["confusion_matrix"], run.info.class_names
        )
        figures_lib.shift_curves(out_dir / "shift_curves.png", summary["shift"])
        figures_lib.reliability(out_dir / "reliability.png", summary["calibration"], summary["ece"])
        result.update(layer_internals(run, examples, out_dir))
        result["figures"] = sorted(p.name for p in out_dir.glob("*.png"))
    # Written whole, then renamed: eval.json exists only complete (the runner skips runs with one).
    partial = out_dir / "eval.json.tmp"
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(out_dir / "eval.json")
    _write_tensorboard(run.workdir, result)
    return result


# --------------------------------------------------------------------------------------------
# Command line


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(result: dict) -> str:
    """Returns the terminal summary of an evaluation `result`."""
    shift = result["shift"]
    lines = [
        f"{result['workdir']}: checkpoint {result['checkpoint']} (step {result['step']}), "
        f"{result['split']} split, {result['count']} images",
        f"accuracy {_percent(result['accuracy'])}  loss {result['loss']:.4f}  "
        f"ECE {_percent(result['ece'])}  {result['images_per_s']:,.0f} images/s  "
        f"flip TTA accuracy {_percent(result['tta_flip_accuracy'])}",
        "shift (pixels)        " + "".join(f"{k:>7}" for k in shift["shifts"]),
    ]
    for mode in eval_metrics.MODES:
        for key in ("accuracy", "consistency"):
            label = f"{mode.replace('_', ' ')} {key}"
            lines.append(f"{label:<22}" + "".join(f"{_percent(v):>7}" for v in shift[mode][key]))
    lines.append(
        f"random-pair consistency (circular, |dy|, |dx| <= {shift['max_shift']}): "
        f"{_percent(shift['random_pair_consistency'])}"
    )
    per_class = ", ".join(
        f"{name} {_percent(a)}"
        for name, a in zip(result["class_names"], result["per_class_accuracy"], strict=True)
    )
    lines.append(f"per-class accuracy: {per_class}")
    return "\n".join(lines)


def define_flags() -> None:
    """Defines the command-line flags. Called only when eval.py runs as a program, so that
    importing eval as a library (the experiment runner, the tests) defines no flags."""
    flags.DEFINE_string("workdir", None, "The workdir of a training run (train.py).")
    flags.DEFINE_string("checkpoint", "latest", "latest | best | a step number.")
    flags.DEFINE_integer("max_shift", 8, "Largest shift k, in pixels, of the shift measures.")
    flags.DEFINE_enum("split", "test", list(SPLITS), "The split to evaluate.")
    flags.DEFINE_bool("figures", True, "Draw the PNG figures.")
    flags.DEFINE_bool(
        "tta", None, "Measure flip test-time augmentation (default: if the run trained with flips)."
    )


def main(argv):
    runtime.quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    try:
        result = evaluate_workdir(
            f.workdir,
            f.checkpoint,
            max_shift=f.max_shift,
            figures=f.figures,
            split=f.split,
            tta=f.tta,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        # After a failed checkpoint read, Orbax's reader threads may still print tracebacks at
        # interpreter exit; the line above is the whole story.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        sys.exit(1)
    print(format_report(result))
    out_dir = Path(result["workdir"]) / "eval" / result["checkpoint"]
    print(f"wrote {out_dir / 'eval.json'} and {len(result.get('figures', []))} figures")


if __name__ == "__main__":
    define_flags()
    app.run(main)
