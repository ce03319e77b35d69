"""Evaluates a trained run from its workdir: accuracy, loss, per-class accuracy, confusion
matrix, calibration, test-time cost, flip test-time augmentation, translation invariance, and
figures of what the layers do.

    python eval.py --workdir=runs/pooled [--checkpoint=latest|best|STEP] [--max_shift=8]
                   [--split=test] [--nofigures] [--tta|--notta] [--output=DIR]
                   [--measures=accuracy,calibration,speed,tta,shift,layer_invariance,internals]
                   (opt-in, add: probes, top_patches) [--update]

Writes WORKDIR/eval/<checkpoint>/eval.json and the PNG figures next to it, and the scalars to
TensorBoard (WORKDIR/tensorboard/eval_<checkpoint>); with --output=DIR, DIR/eval.json, the
figures and DIR/tensorboard instead (for a read-only or full workdir). The folder is checked
before any work. The run may still be training: the checkpoints are opened read-only
(nothing there is created, cleaned up or deleted) and the newest complete one is read.

The measures (`evaluation.measures`; eval.json "measures" lists those that ran):
- accuracy: "accuracy" and "loss" of the eval step, "per_class_accuracy" and
  "confusion_matrix" (rows: true class, columns: predicted).
- calibration: "ece" (expected calibration error, 15 bins) and "calibration" (the bins).
- speed: "images_per_s" of the eval step over the split, with "batch_size" and "device".
- tta: "tta_flip_accuracy", the accuracy of the mean softmax of each image and its mirror
  image; by default measured only when the run trained with flips ("tta" says whether it was).
- shift: translation invariance (below).
- layer_invariance: invariance to circular shifts of 1..k pixels through the layers: per probe
  point (the input, each conv/dense activation, pooling, residual block, global pool, scores)
  the normalised cosine similarity of its output for an image and its shifted copy, globally
  pooled and as a whole map (`evaluation.invariance` has the formula); shares the shift pass.
- internals (with figures): the first layer's filters, activation maps, and pooling worked
  through: a spatial window (max, average, L2) and a channel window (depth) of a real map.
- probes (opt-in): linear probes per layer (Alain & Bengio 2016): a softmax classifier on each
  probe point's pooled features of 4096 training images, scored on the split; accuracy by depth
  and receptive field (`evaluation.probes`).
- top_patches (opt-in): for 6 units of up to 8 layers, the 6 images that activate each most,
  cropped to the unit's receptive field (`evaluation.patches`).

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

import os
import sys
from pathlib import Path

from absl import app, flags

from errors import UserError
from training import runtime

runtime.configure_jax()  # before JAX starts its backend

import evaluation  # noqa: E402
from evaluation import base, measures  # noqa: E402
from evaluation.run import SPLITS  # noqa: E402


def define_flags() -> None:
    """Defines the command-line flags. Called only when eval.py runs as a program, so that
    importing eval defines no flags."""
    flags.DEFINE_string("workdir", None, "The workdir of a training run (train.py).")
    flags.DEFINE_string("checkpoint", "latest", "latest | best | a step number.")
    flags.DEFINE_integer("max_shift", 8, "Largest shift k, in pixels, of the shift measures.")
    flags.DEFINE_enum("split", "test", list(SPLITS), "The split to evaluate.")
    flags.DEFINE_bool("figures", True, "Draw the PNG figures.")
    flags.DEFINE_bool(
        "tta", None, "Measure flip test-time augmentation (default: if the run trained with flips)."
    )
    flags.DEFINE_string(
        "output",
        None,
        "Folder for eval.json, the figures and TensorBoard scalars (default: "
        "WORKDIR/eval/<checkpoint>); checked before the work starts.",
    )
    flags.DEFINE_list(
        "measures",
        list(measures.DEFAULT),
        f"The measures to run, in order, from: {', '.join(base.REGISTRY)}.",
    )
    flags.DEFINE_bool(
        "update",
        False,
        "Add the measures to the eval.json there for the same step and split (e.g. "
        "--measures=probes,top_patches after a default evaluation) instead of replacing it.",
    )


def main(argv):
    runtime.quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    try:
        result = evaluation.evaluate_workdir(
            f.workdir,
            f.checkpoint,
            max_shift=f.max_shift,
            figures=f.figures,
            split=f.split,
            tta=f.tta,
            measures=f.measures,
            output=f.output,
            update=f.update,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        # After a failed checkpoint read, Orbax's reader threads may still print tracebacks at
        # interpreter exit; the line above is the whole story.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        sys.exit(1)
    print(evaluation.format_report(result))
    out_dir = Path(f.output or Path(result["workdir"]) / "eval" / result["checkpoint"])
    print(f"wrote {out_dir / 'eval.json'} and {len(result.get('figures', []))} figures")


if __name__ == "__main__":
    define_flags()
    app.run(main)
