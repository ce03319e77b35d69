"""Evaluating a trained run from its workdir: the chosen measures on one split, written to
WORKDIR/eval/<checkpoint>/eval.json (or another output folder) with the PNG figures beside it
and to TensorBoard (WORKDIR/tensorboard/eval_<checkpoint>), and the terminal report.

eval.json, TensorBoard and the report are made by going through the measures in order (see
`evaluation.base.Measure`): nothing here names a particular measure.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import logging

from errors import UserError
from evaluation import base, taps
from evaluation import measures as measures_lib
from evaluation.run import load_run, parse_checkpoint, read_config
from training import workdir as workdir_lib


def measure_names(measures: str | Sequence[str] | None, tta: bool | None) -> list[str]:
    """Returns the names of the measures to run: `measures` (a list, or one comma-separated
    string; None: `measures.DEFAULT`), with 'tta' added when `tta` asks for flip TTA.
    UserError for an unknown name."""
    if measures is None:
        names = list(measures_lib.DEFAULT)
    elif isinstance(measures, str):
        names = [n.strip() for n in measures.split(",") if n.strip()]
    else:
        names = list(measures)
    if tta and measures_lib.FlipTTA.name not in names:
        names.append(measures_lib.FlipTTA.name)
    if not names:
        raise UserError(f"--measures is empty; choose from {', '.join(base.REGISTRY)}.")
    return [m.name for m in base.select(names)]


def _header(run, checkpoint: str, split: str, count: int, names: list[str]) -> dict[str, Any]:
    """The fields of eval.json that describe what was evaluated, before the measures' own."""
    return {
        "workdir": str(run.workdir),
        "checkpoint": checkpoint,
        "step": run.step,
        "split": split,
        "model": run.config.model.name,
        "dataset": run.config.dataset.name,
        "class_names": list(run.info.class_names),
        "count": count,
        "measures": names,
    }


def evaluate_workdir(
    workdir: str | Path,
    checkpoint: str = "latest",
    *,
    max_shift: int = 8,
    figures: bool = True,
    split: str = "test",
    tta: bool | None = None,
    measures: str | Sequence[str] | None = None,
    output: str | Path | None = None,
    update: bool = False,
) -> dict:
    """Evaluates the run in `workdir` at `checkpoint` ('latest', 'best' or a step) on `split`.

    `measures`: the names of the measures to run (default `measures.DEFAULT`: all but the
    opt-in ones). `tta` (flip test-time augmentation): None measures it when the run trained
    with flips; True adds it to `measures`. Shift measures go up to `max_shift` pixels.
    `update`: add the measures' fields and figures to the eval.json already there for the same
    step and split (e.g. the opt-in measures after a default evaluation) instead of replacing
    it; without one, or for another step or split, it is replaced.
    Returns the results, also written to WORKDIR/eval/<checkpoint>/eval.json (or
    `output`/eval.json) with the figures (when `figures`) beside it, and their scalars to
    TensorBoard (WORKDIR/tensorboard/eval_<checkpoint>, or `output`/tensorboard).
    Raises UserError for an unknown measure, a missing workdir, config or checkpoint, a corrupt
    checkpoint, a config that does not match the checkpoint, or an output folder that cannot
    be written (checked before the work starts).
    """
    if max_shift < 0:
        raise UserError(f"--max_shift={max_shift}: must be >= 0.")
    checkpoint = str(parse_checkpoint(checkpoint))
    names = measure_names(measures, tta)
    chosen = base.select(names)
    workdir = Path(workdir).expanduser()
    read_config(workdir)  # a workdir that is not a run: say so first
    default = workdir / "eval" / checkpoint
    out_dir = _writable_folder(Path(output).expanduser() if output else default)
    tb_dir = out_dir / "tensorboard" if output else default.parent.parent / "tensorboard"
    _writable_folder(tb_dir / f"eval_{checkpoint}")
    run = load_run(workdir, checkpoint)
    examples = run.split(split)
    tta = run.config.dataset.augment_flip if tta is None else tta
    options = base.Options(run.info.num_classes, max_shift=max_shift, tta=bool(tta))
    logging.info(
        "evaluating step %d of %s on %d %s images: %s",
        *(run.step, workdir, len(examples), split, ", ".join(names)),
    )
    previous = _previous(out_dir, run.step, split) if update else {}
    if not previous:
        for stale in out_dir.glob("*.png"):  # a previous evaluation's figures
            stale.unlink()
    fields, context = base.measure_split(
        chosen,
        run.apply_fn(),
        run.state,
        examples,
        batch_size=run.config.training.eval_batch_size,
        mesh=run.mesh,
        options=options,
        tap=taps.Tap.of_run(run),
        run=run,
        split_name=split,
        out_dir=out_dir,
    )
    kept = list(dict.fromkeys([*previous.get("measures", []), *names]))
    result = {**previous, **_header(run, checkpoint, split, context.count, kept), **fields}
    if figures:
        for measure in chosen:
            result.update(measure.figures(result, context))
        result["figures"] = sorted(p.name for p in out_dir.glob("*.png"))
    # Written whole, then renamed: eval.json exists only complete (the runner skips runs with one).
    partial = out_dir / "eval.json.tmp"
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(out_dir / "eval.json")
    _write_tensorboard(tb_dir, result, chosen)
    return result


def _previous(out_dir: Path, step: int, split: str) -> dict[str, Any]:
    """The eval.json in `out_dir` when it measured `step` on `split` (else {}, with a log line
    when one is there for another step or split)."""
    path = out_dir / "eval.json"
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        previous = {}
    if previous.get("step") == step and previous.get("split") == split:
        return previous
    logging.info("%s measured another step or split: replaced, not updated", path)
    return {}


def _writable_folder(folder: Path) -> Path:
    """Creates `folder` and checks that a file can be written there; UserError otherwise."""
    return workdir_lib.require_writable(
        folder,
        "cannot write the evaluation to {folder} ({reason}); pass --output=DIR, a writable "
        "folder (e.g. for a read-only or full workdir).",
    )


def _write_tensorboard(tb_dir: Path, result: dict, chosen: Sequence[base.Measure]) -> None:
    """Writes the measures' scalars of `result` at its checkpoint step to TensorBoard, as
    '<split>/<name>', under `tb_dir`/eval_<checkpoint>."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tb_dir / f"eval_{result['checkpoint']}"))
    for measure in chosen:
        for key, value in measure.scalars(result).items():
            writer.add_scalar(f"{result['split']}/{key}", value, result["step"])
    writer.close()


def format_report(result: dict) -> str:
    """Returns the terminal summary of an evaluation `result`: what was evaluated, one line of
    the measures' headline items, then each measure's report lines."""
    chosen = base.select(result.get("measures", measures_lib.DEFAULT))
    lines = [
        f"{result['workdir']}: checkpoint {result['checkpoint']} (step {result['step']}), "
        f"{result['split']} split, {result['count']} images"
    ]
    headline = [item for measure in chosen for item in measure.headline(result)]
    if headline:
        lines.append("  ".join(headline))
    for measure in chosen:
        lines += measure.report(result)
    return "\n".join(lines)
