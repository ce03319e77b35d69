"""The claims report: one section per claim of the project's notes (translation invariance,
hierarchical features, parameter sharing), each with its measurement, its figure and a
sentence on what the numbers say, generated from the runs' eval.json (the per-layer measures
of `evaluation.invariance`, `evaluation.probes` and `evaluation.patches`).

    python -m experiments.claims run seed_claims:small     # train and evaluate what is missing
    python -m experiments.claims report seed_claims:small  # from finished, evaluated runs
    [--output=DIR]                                         # default runs/NAME_VARIANT
    [--runs=DIR] [--seeds=..]                              # as for python -m experiments

`run` trains and evaluates what is missing through the experiment runner (eval's default
measures), adds the experiment's opt-in measures (`seed_claims.MEASURES`) to each run's
eval.json, writes the runner's report.md, then claims.md, claims.json and the claims_*.png
figures beside it. Sentences are computed from the numbers (a fall of probe accuracy with
depth is stated, never assumed away).
"""

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from errors import UserError
from evaluation import invariance as invariance_lib
from evaluation import probes as probes_lib
from evaluation.measures import percent
from experiments import Experiment, seed_claims
from experiments import report as report_lib
from experiments.claims_figures import invariance_panels, probe_panels
from experiments.runner import EVALUATED, TRAINED, run_dir

ROOT = Path(__file__).resolve().parent.parent


def evaluate_missing(
    experiment: Experiment, output: Path, measures=seed_claims.MEASURES
) -> list[Path]:
    """Adds the `measures` that a finished, evaluated run's eval.json lacks to it (`eval.py
    --update`); returns the workdirs it evaluated."""
    import evaluation  # deferred: importing JAX is slow

    touched = []
    for run in experiment.runs:
        for seed in experiment.seeds:
            workdir = run_dir(output, run, seed)
            if not (workdir / TRAINED).exists() or not (workdir / EVALUATED).exists():
                continue
            done = json.loads((workdir / EVALUATED).read_text()).get("measures", [])
            missing = [m for m in measures if m not in done]
            if missing:
                evaluation.evaluate_workdir(
                    workdir, max_shift=experiment.max_shift, measures=missing, update=True
                )
                touched.append(workdir)
    return touched


def collect(experiment: Experiment, output: Path) -> list[dict[str, Any]]:
    """One row per run with finished seeds: {'name', 'evals' (the seeds' eval.json), 'results'
    (their results.json), 'workdirs'}."""
    runs = {run.name: run for run in experiment.runs}
    rows = []
    for row in report_lib.collect(experiment, output):
        seeds = [s for s in row["seeds"] if s["eval"]]
        rows.append(
            {
                "name": row["name"],
                "evals": [s["eval"] for s in seeds],
                "results": [s["results"] for s in seeds],
                "workdirs": [run_dir(output, runs[row["name"]], s["seed"]) for s in seeds],
            }
        )
    return rows


def mean_layers(evals: list[dict], field: str) -> list[dict[str, Any]] | None:
    """The layers of `field` ('probes' or 'layer_invariance') of the first seed, with every
    number averaged over the seeds that measured it (None when none did)."""
    measured = [e[field] for e in evals if field in e]
    if not measured:
        return None

    def average(*values):
        if isinstance(values[0], dict):
            return {k: average(*(v[k] for v in values)) for k in values[0]}
        if isinstance(values[0], list) and values[0] and not isinstance(values[0][0], str):
            return [average(*column) for column in zip(*values, strict=True)]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) == len(values) and not isinstance(values[0], int):
            return statistics.fmean(numbers)
        return values[0]

    return [average(*layers) for layers in zip(*(m["layers"] for m in measured), strict=True)]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def invariance_section(rows: list[dict], output: Path, max_shift: int) -> tuple[str, dict]:
    """Claim 1, translation invariance: the output's consistency (eval's shift measure) and
    the invariance of every layer (layer_invariance), a figure and a sentence per model."""
    models, lines, summary = [], [], {}
    table = [
        f"| run | random-pair consistency | whole-map invariance, shift {max_shift}: first "
        "layer -> last hidden | rises most at | globally pooled, shift "
        f"{max_shift}: lowest |",
        "|---|---:|---|---|---|",
    ]
    for row in rows:
        layers = mean_layers(row["evals"], "layer_invariance")
        if not layers or max_shift < 1:
            continue
        models.append((row["name"], layers))
        pair = statistics.fmean(e["shift"]["random_pair_consistency"] for e in row["evals"])
        hidden = [layer for layer in layers if layer["kind"] not in ("input", "output")]
        first, last = (hidden[0], hidden[-1]) if hidden else (layers[0], layers[-1])
        gain = invariance_lib.invariance_gain(layers, "map")
        pooled = [(layer["pooled"]["invariance"][-1], layer["layer"]) for layer in layers]
        low, low_layer = min((v, n) for v, n in pooled if v is not None)
        start, end = first["map"]["invariance"][-1], last["map"]["invariance"][-1]
        rise = f"{gain['layer']} ({gain['kind']})" if gain else "-"
        table.append(
            f"| {row['name']} | {percent(pair)} | {start:.2f} ({first['layer']}) -> {end:.2f} "
            f"({last['layer']}) | {rise} | {low:.2f} ({low_layer}) |"
        )
        summary[row["name"]] = {"first": start, "last_hidden": end, "rises_most_at": gain}
        lines.append(
            f"- **{row['name']}**: an image and its copy shifted by {max_shift} pixels are "
            f"{'more' if end > start else 'less'} alike in the last hidden layer "
            f"({end:.2f}) than in the first ({start:.2f}); invariance rises most at {rise}; "
            f"globally pooled features are least invariant at {low_layer} ({low:.2f})."
        )
    if not models:
        return "## 1. Translation invariance\n\nNot measured (no layer_invariance).\n", {}
    invariance_panels(output / "claims_invariance.png", models, max_shift)
    text = "\n".join(
        [
            "## 1. Translation invariance",
            "",
            "Where in each network is invariance to shifts built? For each probe point, the "
            "cosine similarity of its output for an image and for the image shifted "
            "circularly, normalised so that 1 = unchanged and 0 = no more alike than two "
            "different images (`evaluation/invariance.py`), as a whole map and globally "
            "pooled; the output's random-pair consistency (Zhang 2019) beside it.",
            "",
            *table,
            "",
            *lines,
            "",
            "![invariance through the layers](claims_invariance.png)",
            "",
        ]
    )
    return text, summary


def _top_patches(row: dict, output: Path) -> str | None:
    """Copies the first seed's top_patches.png next to the report; returns its file name."""
    for workdir in row["workdirs"]:
        source = workdir / "eval" / "latest" / "top_patches.png"
        if source.is_file():
            name = f"claims_top_patches_{_slug(row['name'])}.png"
            shutil.copyfile(source, output / name)
            return name
    return None


def hierarchy_section(rows: list[dict], output: Path) -> tuple[str, dict]:
    """Claim 2, hierarchical features: the linear probes' accuracy by depth and receptive
    field (probes), with the trend stated from the numbers, and the top-patch grids."""
    models, lines, summary, grids = [], [], {}, []
    table = [
        "| run | input | first hidden | best | last hidden | Spearman rho (depth, accuracy) "
        "| falls |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    chance = None
    for row in rows:
        layers = mean_layers(row["evals"], "probes")
        if not layers:
            continue
        measured = [e["probes"] for e in row["evals"] if "probes" in e]
        chance = measured[0]["majority_class_accuracy"]
        probes = {**measured[0], "layers": layers}
        probes["trend"] = probes_lib.trend(layers, probes["test_examples"])
        models.append((row["name"], layers))
        t = probes["trend"]
        hidden = [layer for layer in layers if layer["kind"] not in ("input", "output")]
        first = percent(hidden[0]["test_accuracy"]) if hidden else "-"
        last = percent(t["last_hidden"]["accuracy"]) if t["last_hidden"] else "-"
        rho = "-" if t["spearman"] is None else f"{t['spearman']:+.2f}"
        falls = ", ".join(f"{f['from']} -> {f['to']}" for f in t["falls"]) or "none"
        table.append(
            f"| {row['name']} | {percent(t['first']['accuracy'])} | {first} | "
            f"{percent(t['best']['accuracy'])} ({t['best']['layer']}) | {last} | {rho} | "
            f"{falls} |"
        )
        lines.append(f"- **{row['name']}**: {probes_lib.trend_sentence(probes)}")
        summary[row["name"]] = t
        grid = _top_patches(row, output)
        if grid:
            grids += [f"**{row['name']}**", "", f"![top patches of {row['name']}]({grid})", ""]
    if not models:
        return "## 2. Hierarchical features\n\nNot measured (no probes).\n", {}
    probe_panels(output / "claims_probes.png", models, chance)
    examples = measured[0]
    text = "\n".join(
        [
            "## 2. Hierarchical features",
            "",
            "How linearly decodable is the class from each layer? A softmax classifier per "
            f"probe point on its globally pooled output, fitted on {examples['train_examples']} "
            f"training images and scored on {examples['test_examples']} {examples['split']} "
            "images (Alain & Bengio 2016; `evaluation/probes.py`); a fall counts when it is "
            "larger than twice its standard error.",
            "",
            *table,
            "",
            *lines,
            "",
            "![probe accuracy by depth and receptive field](claims_probes.png)",
            "",
            "What the units respond to: for a few units per layer (rows), the test images that "
            "activate each most, cropped to the unit's receptive field (Zeiler & Fergus 2014; "
            "`evaluation/patches.py`).",
            "",
            *grids,
        ]
    )
    return text, summary


def _sharing_arithmetic(rows: list[dict]) -> list[str]:
    """What sharing saves in the plain ConvNet, from its summary.json: the params of its conv
    layers as they are and as locally connected layers (one filter bank per position)."""
    from models.shapes import local_params

    plain = next((row for row in rows if row["name"] == "plain" and row["workdirs"]), None)
    summary_file = plain["workdirs"][0] / "summary.json" if plain else None
    if summary_file is None or not summary_file.is_file():
        return []
    summary = json.loads(summary_file.read_text())
    convs = [layer for layer in summary["layers"] if layer["kind"] == "conv"]
    shared = sum(layer["params"] for layer in convs)
    local = sum(
        sum(
            local_params(
                *layer["out_shape"][:2],
                layer["kernel_size"],
                layer["in_shape"][2],
                layer["out_shape"][2],
                layer["use_bias"],
            )
        )
        for layer in convs
    )
    total = summary["total_params"]
    return [
        f"The plain ConvNet's {len(convs)} conv layers hold {shared:,} parameters; the same "
        f"layers without sharing (locally connected: the same receptive fields, one filter "
        f"bank per output position) would hold {local:,} ({local / shared:,.0f}x), the whole "
        f"net {total - shared + local:,} instead of {total:,}.",
        "",
    ]


def _weight_sharing_results(output: Path, variant: str) -> tuple[Path, list[dict]] | None:
    """The weight_sharing experiment's results.json beside this report, or committed in
    experiments/results/, with its folder."""
    for folder in (
        output.parent / f"weight_sharing_{variant}",
        ROOT / "experiments" / "results" / f"weight_sharing_{variant}",
    ):
        if (folder / "results.json").is_file():
            return folder, json.loads((folder / "results.json").read_text())
    return None


def sharing_section(rows: list[dict], output: Path, variant: str) -> tuple[str, dict]:
    """Claim 3, parameter sharing: the arithmetic on the plain ConvNet, and the weight_sharing
    experiment's measurements (parameters, accuracy, shift consistency) when they exist."""
    lines = ["## 3. Parameter sharing", "", *_sharing_arithmetic(rows)]
    found = _weight_sharing_results(output, variant)
    if found is None:
        lines.append(
            f"The measured comparison is the weight_sharing experiment's: run `python -m "
            f"experiments run weight_sharing:{variant} --output={output.parent}/"
            f"weight_sharing_{variant}` and this section shows its numbers."
        )
        return "\n".join(lines) + "\n", {}
    folder, results = found
    lines += [
        f"Measured by the weight_sharing experiment ({os.path.relpath(folder, output)}):",
        "",
        "| run | params | test accuracy | shift consistency | plateaued |",
        "|---|---:|---:|---:|---:|",
    ]
    summary = {}
    rising = []
    for r in results:
        accuracy = statistics.fmean(r["test_accuracy"])
        consistency = statistics.fmean(r["shift_consistency"]) if r["shift_consistency"] else None
        # per seed, whether its last evaluations were flat (results.json written before
        # the plateau check have no such field)
        flat = sum(r["plateaued"]) if "plateaued" in r else None
        summary[r["name"]] = {"params": r["params"], "test_accuracy": accuracy, "plateaued": flat}
        seeds = len(r["test_accuracy"])
        if flat is not None and flat < seeds:
            rising.append(r["name"])
        lines.append(
            f"| {r['name']} | {r['params']:,} | {percent(accuracy)} | {percent(consistency)} | "
            f"{'?' if flat is None else f'{flat}/{seeds}'} |"
        )
    if rising:
        lines += [
            "",
            f"Not plateaued in every seed: {', '.join(rising)}; their accuracy is that of the "
            "budget, not where they would end, so the comparison below is provisional.",
        ]
    shared = next((r for r in results if r["name"].startswith("plain (")), None)
    local = next((r for r in results if r["name"].startswith("plain_local")), None)
    if shared and local:
        difference = statistics.fmean(shared["test_accuracy"]) - statistics.fmean(
            local["test_accuracy"]
        )
        direction = "higher than" if difference > 0 else "lower than" if difference else "as"
        lines += [
            "",
            f"Without sharing the same layers need {local['params'] / shared['params']:,.0f}x "
            f"the parameters; the shared net's test accuracy is {100 * abs(difference):.1f} "
            f"points {direction} the locally connected one's.",
        ]
    for figure in ("accuracy_vs_params.png", "shift_consistency.png"):
        if (folder / figure).is_file():
            lines += ["", f"![{figure[:-4]}]({os.path.relpath(folder / figure, output)})"]
    return "\n".join(lines) + "\n", summary


def write(experiment: Experiment, output: Path, spec: str, runs: Path | None = None) -> str:
    """Writes claims.md, claims.json (the numbers behind the sentences) and the claims_*.png
    figures into `output` from the runs in `runs` (default: `output`); returns the Markdown.
    UserError when no run is finished."""
    output = Path(output)
    runs = Path(runs) if runs is not None else output
    flags = report_lib.command_flags(experiment, spec, output, runs)
    rows = collect(experiment, runs)
    if not any(row["evals"] for row in rows):
        raise UserError(
            f"no finished, evaluated run of {spec} in {runs} yet: nothing to report. Run "
            f"`python -m experiments.claims run {spec}{flags}` first."
        )
    output.mkdir(parents=True, exist_ok=True)
    variant = spec.partition(":")[2] or "small"
    first, invariance = invariance_section(rows, output, experiment.max_shift)
    second, hierarchy = hierarchy_section(rows, output)
    third, sharing = sharing_section(rows, output, variant)
    seeds = ", ".join(f"{row['name']} {len(row['evals'])}" for row in rows)
    text = "\n".join(
        [
            f"# The notes' claims, measured: `{spec}`",
            "",
            f"**Question.** {experiment.question}",
            "",
            f"Seeds per run: {seeds} (numbers are means over seeds). The runs, their accuracy "
            "and shift curves: [report.md](report.md).",
            "",
            first,
            second,
            third,
            f"Produced by `python -m experiments.claims run {spec}{flags}`.",
            "",
        ]
    )
    (output / "claims.md").write_text(text)
    numbers = {"invariance": invariance, "hierarchy": hierarchy, "sharing": sharing}
    (output / "claims.json").write_text(json.dumps(numbers, indent=2))
    return text


def main(argv):
    import sys

    from absl import app, logging

    from training import runtime

    runtime.quiet_library_logs()
    actions = ("run", "report")
    if len(argv) != 3 or argv[1] not in actions:
        raise app.UsageError("usage: python -m experiments.claims {run|report} NAME[:VARIANT]")
    action, spec = argv[1], argv[2]
    import experiments
    from experiments import runner
    from training import loop

    try:
        experiment = experiments.get(spec)
        if _SEEDS.value:
            experiment = experiments.with_seeds(experiment, _SEEDS.value)
        output = Path(_OUTPUT.value or Path("runs") / spec.replace(":", "_"))
        runs = Path(_RUNS.value) if _RUNS.value else output
        if action == "run":
            runner.run(experiment, runs, jobs=runner.parse_jobs(_JOBS.value))
            evaluate_missing(experiment, runs)
            report_lib.write(experiment, output, spec, runs)
        write(experiment, output, spec, runs)
    except (loop.Preempted, runner.Stopped) as e:  # SIGTERM or Ctrl-C: checkpoints saved
        logging.warning("%s", e)
        sys.exit(e.exit_code)
    except UserError as e:
        sys.exit(f"error: {e}")
    logging.info("claims report written to %s", output / "claims.md")
    print(f"report: {output / 'report.md'}\nclaims: {output / 'claims.md'}")


if __name__ == "__main__":
    from training import runtime

    # The imports above load JAX but start no backend: the flags are still read in time.
    runtime.configure_jax()
    from absl import app, flags

    _OUTPUT = flags.DEFINE_string("output", None, "Output folder (default: runs/NAME_VARIANT).")
    _RUNS = flags.DEFINE_string("runs", None, "Folder of the runs (default: the output folder).")
    _SEEDS = flags.DEFINE_list("seeds", [], "Seeds instead of the experiment's own (e.g. 0).")
    from experiments.runner import JOBS_HELP

    _JOBS = flags.DEFINE_string("jobs", "auto", JOBS_HELP)
    app.run(main)
