"""detection: R-CNN against Fast R-CNN on the same scenes, proposals, network and budget.

    python -m experiments.detection run detection:small           # built-in scenes, CPU minutes
    python -m experiments.detection run detection:fashion_mnist   # Fashion-MNIST scenes (CPU hours)
    python -m experiments.detection report detection:small        # from finished runs
    [--output=DIR] [--runs=DIR] [--seeds=0,1] [--only=rcnn]       # default runs/NAME_VARIANT
    [--jobs=auto|N]            # runs side by side on the CPU cores, as `python -m experiments`

Both methods train the `pooled_max` preset on the same scenes. On Fashion-MNIST scenes both
start from the same classifier, as the papers start from ImageNet classifiers: the families
experiment's `pooled_max` run of the same seed (the pooled ConvNet with BatchNorm, trained on
the Fashion-MNIST items at 28 x 28; its BatchNorm layers frozen in the detectors, `BACKBONES`
says why), found in (or first trained into) the runs folder, `--runs` (default: the output
folder), so `--runs=runs/fashion_mnist` reuses the classification runs. On the built-in
scenes they start from random weights (families:small's classifiers see 16-pixel images
without clutter). Both use the same selective-search proposals, optimizer, number of steps
and 128 RoIs per step, 25 % of them foreground (R-CNN's 32 + 96, Fast R-CNN's 2 x 64), and
are tested on the same test scenes with the same per-class NMS and AP code. What
differs is the method: R-CNN warps every proposal to the classifier's input (32 x 32 on the
built-in scenes, 28 x 28 on Fashion-MNIST's) and runs the whole network on each; Fast R-CNN
runs the convolutional layers once per image and RoI-max-pools every proposal from the map.

Detection runs are not classification runs, so this module trains and reports them itself
(`detection.train`; the generic `python -m experiments` refuses a detection config). The
report (report.md, results.json, ap.png) has the AP figures (COCO AP@[.5:.95], AP50, AP75,
VOC 2007 11-point mAP, per-class AP), the test images/s of each method and their ratio, and
the training RoIs/s and images/s.
"""

import json
import statistics
import sys
from pathlib import Path

from errors import UserError
from experiments import Experiment, Run, report, runner, stats, with_seeds
from experiments.runner import TRAINED, build_config, config_mismatch, run_dir

QUESTION = (
    "On the same scenes, proposals, network and training budget, how do R-CNN (every "
    "proposal warped and classified on its own) and Fast R-CNN (one feature map per image, "
    "RoI max pooling) compare in detection AP, and how much faster is Fast R-CNN at test time "
    "(the paper's target here: at least 20x)?"
)
PRESET = "pooled_max"
METHODS = {"rcnn": "R-CNN", "fast_rcnn": "Fast R-CNN"}  # detection.mode: label
# Fast R-CNN with an image pyramid (Girshick 2015 section 5.2, "scale invariance: to brute
# force or finesse?"; `detection.pyramid_scales`): the backbone at half, 1/sqrt(2), full and
# sqrt(2) times the scene's size, each RoI pooled from the level that shows it at about the
# size R-CNN's warp gives the classifier (24 px on Fashion-MNIST's 28)
PYRAMID = {"detection.pyramid_scales": (0.5, 0.71, 1.0, 1.41)}
# RoIAlign (He et al. 2017) in place of RoI max pooling: the regions not rounded to cells
ALIGN = {"detection.roi_pool": "align"}
# each RoI pooled with the context R-CNN's warp gives the classifier (its box scaled by 28/24
# on Fashion-MNIST's scenes; not in the paper): does seeing the region as R-CNN sees it close
# the gap?
CONTEXT = {"detection.roi_context": True}
# the rows: name -> (label, detection.mode, overrides on the variant's budget)
ROWS = {
    "rcnn": (METHODS["rcnn"], "rcnn", {}),
    "fast_rcnn": (METHODS["fast_rcnn"], "fast_rcnn", {}),
    "fast_rcnn_pyramid": ("Fast R-CNN, image pyramid", "fast_rcnn", PYRAMID),
    "fast_rcnn_align": ("Fast R-CNN, RoIAlign", "fast_rcnn", ALIGN),
    "fast_rcnn_align_pyramid": ("Fast R-CNN, RoIAlign + pyramid", "fast_rcnn", ALIGN | PYRAMID),
    "fast_rcnn_context": ("Fast R-CNN, R-CNN's context", "fast_rcnn", CONTEXT),
    "fast_rcnn_align_pyramid_context": (
        "Fast R-CNN, RoIAlign + pyramid + R-CNN's context",
        "fast_rcnn",
        ALIGN | PYRAMID | CONTEXT,
    ),
}
LABELS = {name: label for name, (label, _, _) in ROWS.items()}
SCENES = {"small": "builtin", "fashion_mnist": "fashion_mnist"}
BUDGETS = {
    # ~3 CPU minutes per method on 2 cores, plus ~0.3 s per scene once for the proposals
    "small": {
        "detection.train_scenes": 200,
        "detection.test_scenes": 50,
        "training.num_steps": 400,
        "training.eval_every_steps": 200,
        "training.checkpoint_every_steps": 200,
        "training.log_every_steps": 50,
        "schedule.warmup_steps": 20,
    },
    # the config's scenes (1,000 train, 200 test) and proposals (upscaled 2x: recall@0.5 0.99).
    # Fast R-CNN keeps the classifier's layers after its last pooling, as the paper keeps
    # VGG16's fc6 and fc7: the RoI pooling gives the 3 x 3 map that pooled_max's class layer
    # reads at 28 x 28 (28 -> 14 -> 7 -> 3), and no new hidden layers. Measured on seed 0 with
    # the config's default head instead (7 x 7 RoIs, two new 256-wide FC layers, dropout 0.5,
    # trained from scratch on 2 scenes a step): AP50 0.750 at 3,000 steps (0.740 at 2,500).
    # Measured on seed 0 with this head at 3,000 steps: AP50 0.771 (R-CNN 0.836), Fast R-CNN
    # still rising at the end; hence 6,000 steps, and inputs normalised as the classifier
    # learned them (`input_stats`).
    "fashion_mnist": {
        "training.num_steps": 6_000,
        "training.eval_every_steps": 1_000,
        "training.checkpoint_every_steps": 1_000,
        "detection.roi_size": 3,
        "detection.hidden_widths": (),
        "detection.input_stats": "backbone",
        # the backbone classifier's (BACKBONES) BatchNorm, frozen; its model section is the
        # classifier's (`get_experiment` copies the row's model.* overrides)
        "detection.batchnorm": "frozen",
    },
}
SEEDS = {"small": (0,), "fashion_mnist": (0, 1, 2)}
# the rows of each variant (the small variant's scenes have objects of 14-32 px, about
# R-CNN's 27-px warp already, and its CI time is counted: the two methods only)
VARIANT_ROWS = {"small": ("rcnn", "fast_rcnn"), "fashion_mnist": tuple(ROWS)}
# The classification row whose best checkpoint of the same seed starts both detectors, per
# variant: (experiment, row) in the same runs folder. Fashion-MNIST: families' pooled ConvNet,
# with BatchNorm, frozen in the detectors (`detection.batchnorm`): a detector trains on two
# scenes a step (Fast R-CNN) or 128 warped regions (R-CNN), mostly background, whose batch
# statistics are not the classifier's, so both normalise with the classifier's running
# statistics. It was recipe's BatchNorm-free `no_batchnorm` row (91.45 % against 91.91 % on
# Fashion-MNIST) until measured on seed 0 (commit 8e388f9, same budget): R-CNN test AP50 0.855
# against 0.839, Fast R-CNN 0.801 against 0.784 (the three-seed report of 99de003).
BACKBONES = {"fashion_mnist": ("families", "pooled_max")}
VARIANTS = tuple(BUDGETS)  # no cifar10: there are no CIFAR scenes
# the papers' VOC 2007 test mAP (with bounding-box regression), for the report
PAPERS = {
    "rcnn": "58.5 (AlexNet, ImageNet pre-training; Girshick et al. 2014, table 1)",
    "fast_rcnn": "66.9 (VGG16, ImageNet pre-training; Girshick 2015, table 1)",
}


def get_experiment(variant: str = "small", runs: Path | None = None) -> Experiment:
    """The experiment's runs on `variant` (small: built-in scenes; fashion_mnist); with the
    runs folder `runs`, the variant's detectors start from its backbone classifier there."""
    if variant not in BUDGETS:
        raise UserError(f"unknown variant detection:{variant}; choose one of {', '.join(BUDGETS)}")
    overrides = dict(BUDGETS[variant])
    if variant in BACKBONES:
        row = backbone_run(variant)
        # the detectors' layers are the classifier's, so its checkpoint fits them
        overrides.update({k: v for k, v in row.overrides.items() if k.startswith("model.")})
        if runs is not None:
            overrides["detection.backbone_workdir"] = str(Path(runs) / row.name / "seed_{seed}")
    runs_ = []
    for name in VARIANT_ROWS[variant]:
        _, mode, changes = ROWS[name]
        config = f"configs/detection.py:{PRESET},{SCENES[variant]},{mode}"
        runs_.append(Run(name, config, {**overrides, **changes}))
    return Experiment("detection", QUESTION, tuple(runs_), SEEDS[variant], task="detection")


def backbone_run(variant: str) -> Run | None:
    """The classification run (a row of another experiment) that starts the detectors of
    `variant`, or None (random initialisation)."""
    if variant not in BACKBONES:
        return None
    import experiments

    source, row = BACKBONES[variant]
    return next(r for r in experiments.get(f"{source}:{variant}").runs if r.name == row)


def prerequisite(variant: str, seeds: tuple[int, ...]) -> Experiment | None:
    """The backbone classifiers of `variant`'s detectors, one per seed, as an experiment of
    their own (None: the detectors start from random weights)."""
    row = backbone_run(variant)
    if row is None:
        return None
    return Experiment(BACKBONES[variant][0], "", (row,), tuple(seeds), max_shift=4)


def train_backbones(
    variant: str, seeds: tuple[int, ...], runs: Path, jobs: int | None = 1
) -> list[Path]:
    """Trains and evaluates the backbone classifier of each seed that `runs` lacks (the
    classification runner: skipped when finished, resumed when interrupted; `jobs` as
    `runner.run`)."""
    classifiers = prerequisite(variant, seeds)
    return [] if classifiers is None else runner.run(classifiers, runs, jobs=jobs)


def run_missing(
    experiment: Experiment, output: Path, only: tuple[str, ...] = (), jobs: int | None = 1
) -> list[Path]:
    """The runner's `run` with detection's training (which evaluates its runs); `jobs` as
    `runner.run` (1: one after another in this process)."""
    from detection import train as detection_train

    return runner.run(experiment, output, only, jobs, train=detection_train.train_and_evaluate)


# what a re-evaluation of the final state replaces in a run's results.json
RETESTED = {
    "ap": "ap",
    "ap50": "ap50",
    "ap75": "ap75",
    "voc07_map": "voc07_map",
    "test_images_per_s": "images_per_s",
    "test_proposals_per_image": "proposals_per_image",
    "test_flops_per_image": "flops_per_image",
}


def seed_results(workdir: Path) -> dict:
    """The run's results.json; when the final checkpoint was evaluated again since
    (`python -m detection eval --workdir=WORKDIR --checkpoint=latest`, e.g. to time the test
    pass with later evaluation code), its final test measures are that evaluation's, marked
    'retested' with its commit."""
    from training import metrics as metrics_lib

    results = json.loads((workdir / TRAINED).read_text())
    split = json.loads((workdir / "config.json").read_text())["dataset"]["eval_split"]
    results["curve"] = [  # the held-out AP50 at each evaluation during training
        (r["step"], r["ap50"])
        for r in metrics_lib.read_records(workdir / "metrics.jsonl")
        if r.get("split") == split and "ap50" in r
    ]
    again = workdir / runner.EVALUATED
    if again.exists():
        test = json.loads(again.read_text())
        if test.get("step") == results["steps"] and test.get("split") == "test":
            results = {
                **results,
                **{key: test.get(field) for key, field in RETESTED.items()},
                "final": {**results["final"], "test": test},
                "retested": test.get("commit", "?"),
            }
    return results


def collect(experiment: Experiment, output: Path) -> list[dict]:
    """One row per run with finished seeds: its name and each seed's results (seed_results)."""
    rows = []
    for run in experiment.runs:
        seeds = []
        for seed in experiment.seeds:
            path = run_dir(output, run, seed) / TRAINED
            if path.exists() and not config_mismatch(path.parent, run, seed):
                seeds.append(seed_results(path.parent))
        if seeds:
            rows.append({"name": run.name, "config": run.config, "seeds": seeds})
    return rows


MEASURES = (  # (results.json key, column, scale, digits)
    ("ap50", "AP50", 100, 1),
    ("ap", "AP@[.5:.95]", 100, 1),
    ("ap75", "AP75", 100, 1),
    ("voc07_map", "VOC07 mAP", 100, 1),
    ("test_images_per_s", "test images/s", 1, 1),
    ("test_flops_per_image", "test GFLOPs/image", 1e-9, 2),
    ("train_rois_per_s", "train RoIs/s", 1, 0),
    ("train_images_per_s", "train images/s", 1, 1),
    ("params", "params", 1, 0),
    ("train_seconds", "train s", 1, 0),
)


# A detection run has plateaued when its last stats.PLATEAU_EVALS held-out AP50 figures lie
# within this of each other: 2 AP50 points, about 1.3 standard errors of an AP50 measured on
# the 200 Fashion-MNIST test scenes (~600 objects: sqrt(0.85 x 0.15 / 600) = 1.5 points), where
# classification's half point is about one standard error of an accuracy on 5,000 images.
AP_PLATEAU_TOLERANCE = 0.02


def plateaued(seed: dict) -> bool:
    """Whether one seed's run ended on a plateau of its held-out AP50 (AP_PLATEAU_TOLERANCE)."""
    return stats.plateau(seed["curve"], tolerance=AP_PLATEAU_TOLERANCE).flat


def _interval(row: dict) -> str:
    """The 95 % t-interval of the row's mean AP50 (in points), or 'n = 1'."""
    s = stats.summarize([seed["ap50"] for seed in row["seeds"]])
    return "n = 1" if s.n == 1 else f"[{100 * s.low:.1f}, {100 * s.high:.1f}]"


def _mean(row: dict, key: str) -> float:
    return statistics.fmean(seed[key] for seed in row["seeds"])


def _cell(row: dict, key: str, scale: float, digits: int) -> str:
    values = [scale * seed[key] for seed in row["seeds"]]
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{mean:,.{digits}f}{spread}"


def markdown_table(rows: list[dict]) -> str:
    """The rows' mean (± sample std over seeds) of every measure, as a Markdown table, with
    AP50's 95 % interval and how many seeds' runs plateaued after the AP50 column."""
    names = [m[1] for m in MEASURES]
    head = "| method | seeds | " + " | ".join(
        [names[0], "AP50 95 % interval", "plateaued", *names[1:]]
    )
    lines = [head + " |", "|" + "---|" * (len(MEASURES) + 4)]
    for row in rows:
        cells = [_cell(row, key, scale, digits) for key, _, scale, digits in MEASURES]
        flat = f"{sum(map(plateaued, row['seeds']))}/{len(row['seeds'])}"
        cells[1:1] = [_interval(row), flat]
        label = LABELS.get(row["name"], row["name"])
        lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio(rows: list[dict], key: str, fast: str = "fast_rcnn") -> float | None:
    """The mean `key` of the Fast R-CNN row `fast` over R-CNN's (None unless both ran)."""
    by_name = {row["name"]: row for row in rows}
    if not {fast, "rcnn"} <= set(by_name):
        return None
    return _mean(by_name[fast], key) / _mean(by_name["rcnn"], key)


def plot(rows: list[dict], output: Path) -> Path:
    """ap.png: per-class VOC 2007 AP of each method (mean over seeds), and their AP50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(rows[0]["seeds"][0]["final"]["test"]["per_class_voc07_ap"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        per_class = [
            statistics.fmean(s["final"]["test"]["per_class_voc07_ap"][c] for s in row["seeds"])
            for c in classes
        ]
        label = LABELS.get(row["name"], row["name"])
        left.bar([j + i * width for j in range(len(classes))], per_class, width, label=label)
        right.bar(i, _mean(row, "ap50"), 0.6, label=label)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes, rotation=45)
    left.set_ylabel("VOC 2007 AP (IoU 0.5)")
    left.set_ylim(0, 1)
    left.legend()
    right.set_xticks(range(len(rows)), [LABELS.get(row["name"], row["name"]) for row in rows])
    right.set_ylabel("AP50 (COCO)")
    right.set_ylim(0, 1)
    fig.tight_layout()
    path = Path(output) / "ap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RECALL_COUNTS = (10, 50, 100, 300, 500)


def recall_section(proposals: list, truth: list) -> str:
    """The Markdown table of the test scenes' proposal recall at IoU 0.5 and 0.7 against the
    number of proposals kept per image (`detection.proposals.recall`)."""
    from detection import proposals as proposals_lib

    found = proposals_lib.recall(proposals, truth, counts=RECALL_COUNTS)
    mean = sum(map(len, proposals)) / max(len(proposals), 1)
    head = " | ".join(f"{n}" for n in RECALL_COUNTS)
    lines = [
        f"Proposal recall on the {len(proposals)} test scenes (selective search, {mean:.0f} "
        "proposals per scene on average): the fraction of the objects that one of a scene's "
        "first N proposals covers at IoU >= 0.5 / 0.7.",
        "",
        f"| IoU | {head} |",
        "|---|" + "---:|" * len(RECALL_COUNTS),
    ]
    for t, by_count in found.items():
        lines.append(f"| {t} | " + " | ".join(f"{by_count[n]:.3f}" for n in RECALL_COUNTS) + " |")
    return "\n".join(lines)


def draw_figures(experiment: Experiment, runs: Path, output: Path) -> str:
    """Draws, from the first seed's runs, each method's detections on the first test scenes,
    the proposals of the first test scene, and both methods' precision-recall curves
    (`detection.figures`) into `output`; returns their Markdown ('' for runs that predate the
    figures)."""
    from detection import figures, regions

    seed, test, curves, lines = experiment.seeds[0], None, {}, []
    for run in experiment.runs:
        path = run_dir(runs, run, seed) / TRAINED
        final = seed_results(path.parent)["final"]["test"] if path.exists() else {}
        if "examples" not in final:
            continue
        config = build_config(run, seed)
        if test is None:
            test = regions.load_scenes(config, splits=("test",))["test"]
            found = regions.proposal_cache(config.detection).get_all(test.images)
            figures.proposals_figure(
                output / "proposals.png", test.images[0], found[0], test.objects(0)[0]
            )
            lines.append(recall_section(found, [test.objects(i)[0] for i in range(len(test))]))
            lines.append("![the proposals of a test scene](proposals.png)")
        examples = final["examples"]
        truth = [test.objects(i) for i in range(len(examples))]
        name = f"detections_{run.name}.png"
        label = LABELS.get(run.name, run.name)
        figures.detections_grid(
            output / name,
            test.images[: len(examples)],
            truth,
            examples,
            test.class_names,
            title=f"{label}, seed {seed}: detections (solid) and ground truth (dashed)",
        )
        lines.append(f"![{label}'s detections]({name})")
        curves[label] = final["pr50"]
    if curves:
        figures.pr_curves(output / "pr_curves.png", curves)
        lines.append("![precision-recall curves at IoU 0.5](pr_curves.png)")
    return "\n\n".join(lines)


def write_report(experiment: Experiment, output: Path, spec: str, runs: Path | None = None) -> str:
    """Writes report.md, results.json (the collected numbers) and ap.png into `output` from
    the runs in `runs` (default: `output`); returns the table and the speed-up line."""
    output = Path(output)
    runs = Path(runs) if runs is not None else output
    flags = report.command_flags(experiment, spec, output, runs)
    rows = collect(experiment, runs)
    if not rows:
        raise UserError(
            f"no finished run of {spec} in {runs} yet: nothing to report. Run "
            f"`python -m experiments.detection run {spec}{flags}` first."
        )
    output.mkdir(parents=True, exist_ok=True)
    speed, flops = ratio(rows, "test_images_per_s"), ratio(rows, "test_flops_per_image")
    verdict = (
        f"Fast R-CNN tests **{speed:.1f}x** as many images per second as R-CNN (target: >= "
        f"20x; {'met' if speed >= 20 else 'not met'}), with {1 / flops:.1f}x fewer FLOPs per "
        "image."
        if speed is not None
        else "Speed-up: needs both methods' runs."
    )
    for name in (row["name"] for row in rows if row["name"] not in METHODS):
        faster = ratio(rows, "test_images_per_s", name)
        if faster:
            verdict += (
                f" {LABELS.get(name, name)}: {faster:.1f}x as many, "
                f"{1 / ratio(rows, 'test_flops_per_image', name):.1f}x fewer FLOPs."
            )
    retested = {}  # commit: the runs evaluated again at it
    for row in rows:
        for seed in row["seeds"]:
            if seed.get("retested"):
                retested.setdefault(seed["retested"], []).append(f"{row['name']} {seed['seed']}")
    total = sum(len(row["seeds"]) for row in rows)
    if retested:
        groups = [
            f"{'every run' if len(runs_) == total else ', '.join(runs_)} at {commit[:7]}"
            for commit, runs_ in sorted(retested.items())
        ]
        verdict += (
            " Test measures of " + "; ".join(groups) + ": the final checkpoint evaluated "
            "again by `python -m detection eval --checkpoint=latest` at that commit (same "
            "weights, later evaluation code; run and seed)."
        )
    table = markdown_table(rows) + "\n\n" + verdict
    plot(rows, output)
    drawn = draw_figures(experiment, runs, output)
    envs = report.run_environments(experiment, runs, rows)
    env = envs[0] if envs else {}
    machine = (
        f"{env.get('device_count', '?')} x {env.get('device_kind', '?')} "
        f"({env.get('platform', '?')}, {env.get('cpu_count', '?')} CPU cores)"
    )
    papers = "\n".join(f"- {METHODS[name]}: VOC 2007 mAP {text}" for name, text in PAPERS.items())
    first = build_config(experiment.runs[0], experiment.seeds[0])
    d = first.detection
    start = (
        f"the classifier in `{d.backbone_workdir}` (its best checkpoint; the class and box "
        "layers new)"
        if d.backbone_workdir
        else "random weights"
    )
    text = f"""# Experiment `{spec}`

**Question.** {experiment.question}

{table}

![AP per class and AP50](ap.png)

{drawn}

AP on the {d.test_scenes} test scenes ({first.dataset.name}, {d.image_size}x{d.image_size})
of the final model: AP50, AP75 and AP@[.5:.95] by pycocotools, VOC07 mAP the PASCAL VOC 2007
11-point AP at IoU 0.5 (the papers' measure); mean ± sample std over seeds, and AP50's 95 %
confidence interval of the mean (Student t). Plateaued: the seeds whose last
{stats.PLATEAU_EVALS} held-out AP50 evaluations during training ({first.dataset.eval_split}
scenes) lie within {100 * AP_PLATEAU_TOLERANCE:.0f} points of each other (about 1.3 standard
errors of an AP50 on the 200 Fashion-MNIST test scenes). Test images/s:
network, box decoding and per-class NMS over each image's proposals (its first
{d.test_proposals}; both methods skip the padding of images with fewer), the proposals
computed beforehand (as the papers time it). Test GFLOPs/image: the networks' arithmetic from
their layer specs for the proposals scored (R-CNN: every layer once per proposal; Fast R-CNN:
the conv layers once per image (and pyramid level, at its size), the RoI pooling (at every
level) and the layers after it once per proposal).
Their ratio is about the speed-up that running both at the same FLOP/s would give: at this
image size and proposal count it bounds what Fast R-CNN's sharing of the convolutions can
buy. Training: 128
RoIs per step in both methods; train images/s counts what goes through the network (Fast
R-CNN: scenes, R-CNN: warped regions); the median over logging intervals, compilation and
evaluation excluded.

The papers, for scale (not comparable: ImageNet pre-training, VOC's 20 classes and natural
images at ~500 px, 2,000 proposals per image):

{papers}

Here both methods start from {start} and train on {d.train_scenes} training scenes, with
{first.training.num_steps} steps of {first.optimizer.name} and box regression trained
jointly (R-CNN's paper fits linear SVMs and ridge box regressors on the fine-tuned features;
here its softmax scores and a box layer are fine-tuned with the same multi-task loss as Fast
R-CNN).

Produced by `python -m experiments.detection run {spec}{flags}` on {machine},
{report.commits_line(envs)}.
"""
    (output / "report.md").write_text(text)
    summary = [
        {
            "name": row["name"],
            "config": row["config"],
            "seeds": [s["seed"] for s in row["seeds"]],
            **{key: _mean(row, key) for key, *_ in MEASURES},
            "ap50_per_seed": [s["ap50"] for s in row["seeds"]],
            "plateaued": [plateaued(s) for s in row["seeds"]],
        }
        for row in rows
    ]
    (output / "results.json").write_text(
        json.dumps({"runs": summary, "fast_over_rcnn_test_speed": speed}, indent=2)
    )
    return table


ACTIONS = ("run", "report")


def main(argv: list[str]) -> None:
    """python -m experiments.detection {run|report} detection[:VARIANT] [--output=DIR]
    [--seeds=..] [--only=ROW,..] [--jobs=auto|N]"""
    from absl import logging

    from training import loop

    args = [a for a in argv[1:] if not a.startswith("--")]
    options = dict(a[2:].partition("=")[::2] for a in argv[1:] if a.startswith("--"))
    if len(args) != 2 or args[0] not in ACTIONS or not args[1].startswith("detection"):
        sys.exit(
            f"usage: python -m experiments.detection {{{'|'.join(ACTIONS)}}} detection[:VARIANT]"
        )
    unknown = set(options) - {"output", "runs", "seeds", "only", "jobs"}
    if unknown:
        sys.exit(
            f"error: unknown flag --{sorted(unknown)[0]}; flags: --output, --runs, --seeds, "
            "--only, --jobs"
        )
    action, spec = args
    try:
        name, _, variant = spec.partition(":")
        if name != "detection":
            raise UserError(f"{spec}: this program runs the detection experiment only")
        output = Path(options.get("output") or Path("runs") / spec.replace(":", "_"))
        runs = Path(options.get("runs") or output)
        experiment = get_experiment(variant or "small", runs)
        if options.get("seeds"):
            experiment = with_seeds(experiment, options["seeds"].split(","))
        if action == "run":
            only = tuple(filter(None, options.get("only", "").split(",")))
            jobs = runner.parse_jobs(options.get("jobs", "auto"))
            train_backbones(variant or "small", experiment.seeds, runs, jobs)
            run_missing(experiment, runs, only, jobs)
        table = write_report(experiment, output, spec, runs)
    except (loop.Preempted, runner.Stopped) as e:  # SIGTERM or Ctrl-C: checkpoints saved
        logging.warning("%s", e)
        sys.exit(e.exit_code)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"\n{experiment.question}\n\n{table}\n\nreport: {output / 'report.md'}")


if __name__ == "__main__":
    from training import runtime

    runtime.configure_jax()  # before JAX starts its backend
    runtime.quiet_library_logs()
    main(sys.argv)
