"""Detection commands: train a detector, evaluate a trained one.

    python -m detection train --config=configs/detection.py:pooled_max --workdir=runs/det
    python -m detection train --config=configs/detection.py:pooled_max,builtin,rcnn ...
    python -m detection eval --workdir=runs/det --checkpoint=best
    python -m detection eval --workdir=runs/det --split=validation --validation_scenes=200 \
        --nms_iou=0.4          # a test-time setting tried on held-out scenes

`train` writes the workdir as train.py does (config.json, summary, metrics.jsonl,
TensorBoard, checkpoints/, best/, results.json) and resumes from its latest checkpoint when
rerun. `eval` reads the run read-only and writes WORKDIR/eval/<checkpoint>/eval.json (COCO
AP, AP50, AP75, per-class AP, VOC 2007 11-point mAP, test images/s). Test-time settings can
differ from the run's: `--nms_iou`, `--proposal_mode`, `--test_proposals`, and
`--validation_scenes` to evaluate on held-out scenes (training items, their own seed) of a run
trained without them; such an evaluation, or one of another split, goes to
eval_<split>[_nms<IoU>][_<mode>][_p<N>].json beside it, so eval.json (what the experiment's
report reads) stays the run's own. The work is done by `detection.train`; this
program only parses the flags.
"""

from training import runtime

runtime.configure_jax()  # before JAX is imported: XLA flags and the compilation cache

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import schema  # noqa: E402
from errors import UserError  # noqa: E402

config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/detection.py:pooled_max."
)
flags.DEFINE_string("workdir", None, "The run's folder.")
flags.DEFINE_string("checkpoint", "best", "eval: best, latest or a step number.")
flags.DEFINE_string("split", "test", "eval: test or validation (detection.validation_scenes).")
flags.DEFINE_float("nms_iou", None, "eval: the NMS IoU threshold instead of the run's.")
flags.DEFINE_integer(
    "validation_scenes", None, "eval: the held-out validation scenes instead of the run's."
)
flags.DEFINE_enum(
    "proposal_mode",
    None,
    ["fast", "quality"],
    "eval: selective search's mode instead of the run's.",
)
flags.DEFINE_integer(
    "test_proposals",
    None,
    "eval: the proposals scored per image instead of the run's (the per-image cap "
    "detection.max_proposals rises to it).",
)

COMMANDS = ("train", "eval")
SUMMARY = ("ap", "ap50", "ap75", "voc07_map", "images_per_s")


def _train() -> dict:
    from detection import train
    from training import loop

    if flags.FLAGS.config is None:
        raise app.UsageError("train needs --config (e.g. configs/detection.py:pooled_max)")
    try:
        results = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except loop.Preempted as e:  # SIGTERM or Ctrl-C: the checkpoint is saved
        logging.warning("%s", e)
        sys.exit(e.exit_code)
    return {
        k: results[k]
        for k in ("method", "model", "ap", "ap50", "ap75", "voc07_map", "test_images_per_s")
    }


def _eval() -> dict:
    from detection import train
    from evaluation import run as run_lib
    from training import checkpoint as ckpt_lib

    workdir = Path(flags.FLAGS.workdir).expanduser()
    config = run_lib.read_config(workdir)
    name, f = "eval", flags.FLAGS
    if f.split != "test":
        name += f"_{f.split}"
    if f.validation_scenes is not None:
        config.detection.validation_scenes = f.validation_scenes
    if f.nms_iou is not None:
        config.detection.nms_iou = f.nms_iou
        name += f"_nms{f.nms_iou:g}"
    if f.proposal_mode is not None:
        config.detection.proposal_mode = f.proposal_mode
        name += f"_{f.proposal_mode}"
    if f.test_proposals is not None:
        config.detection.test_proposals = f.test_proposals
        config.detection.max_proposals = max(config.detection.max_proposals, f.test_proposals)
        name += f"_p{f.test_proposals}"
    which = run_lib.parse_checkpoint(flags.FLAGS.checkpoint)
    checkpoints = ckpt_lib.Checkpoints(
        workdir, keep=config.training.keep_checkpoints, read_only=True
    )
    run = train.setup(
        config, restore=lambda abstract: checkpoints.restore(abstract, which), train=False
    )
    if flags.FLAGS.split not in run.scenes:
        raise UserError(f"--split={flags.FLAGS.split}: the run has scenes {', '.join(run.scenes)}")
    result = train.evaluate(run, run.state, flags.FLAGS.split)
    out = workdir / "eval" / str(flags.FLAGS.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "step": run.step,
        "split": flags.FLAGS.split,
        "checkpoint": flags.FLAGS.checkpoint,
        **{k: config.detection[k] for k in ("nms_iou", "proposal_mode", "test_proposals")},
        "commit": runtime.git_commit(),
        **result,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    return {"step": run.step, **{k: result[k] for k in SUMMARY}}


def main(argv):
    runtime.quiet_library_logs()
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m detection {{{'|'.join(COMMANDS)}}} --workdir=...")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    try:
        summary = _train() if argv[1] == "train" else _eval()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary))


def parse_flags(argv: list[str]) -> list[str]:
    """configs.schema.parse_flags (config mistakes in one line) when a config is given; eval
    reads the run's config.json and takes none."""
    if any(a.startswith("--config") for a in argv):
        return schema.parse_flags(argv)
    return flags.FLAGS(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
