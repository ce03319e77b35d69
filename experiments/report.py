"""Collects an experiment's results.json, eval.json and metrics.jsonl into a Markdown report
with a table (mean ± std over seeds) and plots."""

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from absl import logging  # noqa: E402

from errors import UserError  # noqa: E402
from experiments import Experiment, stats  # noqa: E402
from experiments.runner import (  # noqa: E402
    EVALUATED,
    TRAINED,
    config_mismatch,
    run_dir,
    runs_flag,
)
from training import metrics as metrics_lib  # noqa: E402

PLOTS = (
    "learning_curves.png",
    "accuracy_vs_params.png",
    "accuracy_vs_flops.png",
    "shift_consistency.png",
)


def collect(experiment: Experiment, output: Path) -> list[dict]:
    """Returns one row per run: its name and the per-seed results, evals and metric records."""
    rows = []
    for run in experiment.runs:
        seeds = []
        for seed in experiment.seeds:
            workdir = run_dir(output, run, seed)
            if not (workdir / TRAINED).exists() or not _is_run(workdir, run, seed):
                continue
            evaluated = workdir / EVALUATED
            seeds.append(
                {
                    "seed": seed,
                    "results": json.loads((workdir / TRAINED).read_text()),
                    "eval": json.loads(evaluated.read_text()) if evaluated.exists() else None,
                    "metrics": metrics_lib.read_records(workdir / "metrics.jsonl"),
                }
            )
        if seeds:
            rows.append(
                {
                    "name": run.name,
                    "config": run.config,
                    "overrides": dict(run.overrides),
                    "seeds": seeds,
                }
            )
    return rows


def _is_run(workdir: Path, run, seed: int) -> bool:
    """Whether `workdir` holds `run` with `seed`; a folder of another config is left out of
    the report with one warning line."""
    try:
        differences = config_mismatch(workdir, run, seed)
    except UserError as e:
        differences = [str(e)]
    if differences:
        logging.warning(
            "left out of the report: %s holds another config than %s seed %d (%s)",
            workdir,
            run.name,
            seed,
            "; ".join(differences),
        )
    return not differences


def mean_std(values: list[float]) -> tuple[float, float]:
    """Returns the mean and the sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "–"
    m, s = mean_std([v * scale for v in values])
    if len(values) == 1:  # one seed: no spread to show
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(row: dict) -> dict:
    """Returns the table's numbers for one row (lists are per seed)."""
    results = [s["results"] for s in row["seeds"]]
    evals = [s["eval"] for s in row["seeds"] if s["eval"]]
    return {
        "name": row["name"],
        "seeds": len(results),
        "test_accuracy": [r["test_accuracy"] for r in results],
        "params": results[0]["params"],
        "flops": results[0]["flops_per_image"],
        "train_seconds": [r["train_seconds"] for r in results],
        "images_per_s": [r["images_per_s"] for r in results if r["images_per_s"]],
        "shift_consistency": [e["shift"]["random_pair_consistency"] for e in evals],
        "tta_accuracy": [e["tta_flip_accuracy"] for e in evals if e.get("tta_flip_accuracy")],
        "plateaued": [stats.plateau(_curve(s)).flat for s in row["seeds"]],
    }


def _curve(seed: dict) -> list[tuple[int, float]]:
    """The held-out accuracy curve [(step, accuracy)] of one seed's run."""
    split = seed["results"]["eval_split"]
    return [(r["step"], r["accuracy"]) for r in seed["metrics"] if r["split"] == split]


def _interval(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    s = stats.summarize(values)
    return "n = 1" if s.n == 1 else f"[{scale * s.low:.2f}, {scale * s.high:.2f}]"


def comparison(rows: list[dict]) -> str:
    """Returns the report's comparison of the rows' test accuracies: the ranking (a row's rank:
    one more than the rows whose 95 % interval lies entirely above its own), and each ordered
    pair."""
    summaries = {
        row["name"]: stats.summarize([s["results"]["test_accuracy"] for s in row["seeds"]])
        for row in rows
    }
    ranks = ", ".join(f"{rank}. {name}" for rank, name in stats.ranking(summaries))
    pairs = sorted(stats.order(summaries))
    ordered = "; ".join(f"{a} > {b}" for a, b in pairs) or "none: every pair is tied"
    return (
        f"**Ranking by test accuracy** (a row's rank is one more than the number of rows whose "
        f"95 % interval lies entirely above its own): {ranks}."
        f"\n\nPairs told apart (intervals disjoint): {ordered}."
    )


def _verdict(ordering, here: str) -> str:
    if here == "tied":
        return "yes" if ordering.tied else "not resolved: tied here"
    if here == "above":
        return "no" if ordering.tied else "yes"
    return "no"


def published_section(experiment: Experiment, rows: list[dict]) -> str:
    """Returns the report's comparison with published results ('' when the experiment names
    none): each row's mean test accuracy beside its published one, and each published ordering
    of two rows beside this experiment's, where rows are told apart only by disjoint 95 %
    intervals (as in the ranking) and are otherwise tied."""
    if not experiment.published and not experiment.orderings:
        return ""
    accuracies = {
        row["name"]: [s["results"]["test_accuracy"] for s in row["seeds"]] for row in rows
    }
    lines = ["## Against published results", ""]
    if experiment.published:
        lines += [
            "| run | here: test accuracy (%) | published (%) | here minus published (points) "
            "| published result |",
            "|---|---:|---:|---:|---|",
        ]
        for name, ref in experiment.published.items():
            values = accuracies.get(name)
            here = f"{100 * statistics.fmean(values):.2f}" if values else "not run yet"
            diff = f"{100 * (statistics.fmean(values) - ref.accuracy):+.2f}" if values else "–"
            lines.append(f"| {name} | {here} | {100 * ref.accuracy:.2f} | {diff} | {ref.source} |")
        lines.append("")
    if experiment.orderings:
        summaries = {name: stats.summarize(v) for name, v in accuracies.items()}
        told = stats.order(summaries)
        lines += [
            "| published ordering | as published | here (mean test accuracy %) | agrees |",
            "|---|---|---|---|",
        ]
        for o in experiment.orderings:
            claim = f"{o.above} ≈ {o.below}" if o.tied else f"{o.above} > {o.below}"
            if o.above not in summaries or o.below not in summaries:
                lines.append(f"| {claim} | {o.published} | not run yet | – |")
                continue
            a, b = summaries[o.above], summaries[o.below]
            if (o.above, o.below) in told:
                here, relation = "above", ">"
            elif (o.below, o.above) in told:
                here, relation = "below", "<"
            else:
                here, relation = "tied", "tied with"
            lines.append(
                f"| {claim} | {o.published} | {o.above} {100 * a.mean:.2f} {relation} "
                f"{o.below} {100 * b.mean:.2f} | {_verdict(o, here)} |"
            )
        lines.append("")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """Returns the Markdown table of the rows (accuracy and consistency in %)."""
    header = (
        "| run | seeds | test accuracy (%) | 95 % interval | with flip TTA (%) | plateaued "
        "| params | MFLOPs/image | train time (s) | images/s | shift consistency (%) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        s = summarize(row)
        lines.append(
            f"| {s['name']} | {s['seeds']} | {_pm(s['test_accuracy'], 100, 2)} "
            f"| {_interval(s['test_accuracy'])} | {_pm(s['tta_accuracy'], 100, 2)} "
            f"| {sum(s['plateaued'])}/{s['seeds']} "
            f"| {s['params']:,} "
            f"| {s['flops'] / 1e6:,.1f} | {_pm(s['train_seconds'], 1, 0)} "
            f"| {_pm(s['images_per_s'], 1, 0)} "
            f"| {_pm(s['shift_consistency'], 100, 1)} |"
        )
    return "\n".join(lines)


def _scatter(ax, rows, key, label):
    for row in rows:
        s = summarize(row)
        m, sd = mean_std(s["test_accuracy"])
        ax.errorbar(s[key], 100 * m, yerr=100 * sd, fmt="o", capsize=3, label=s["name"])
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot(rows: list[dict], output: Path) -> list[Path]:
    """Writes the report's plots into `output`; returns their paths."""
    paths = [output / name for name in PLOTS]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        curves = {}
        for seed in row["seeds"]:
            split = seed["results"]["eval_split"]
            for r in seed["metrics"]:
                if r["split"] == split:
                    curves.setdefault(r["step"], []).append(100 * r["accuracy"])
        steps = sorted(curves)
        ax.plot(steps, [statistics.fmean(curves[s]) for s in steps], marker=".", label=row["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    for path, key, label in (
        (paths[1], "params", "parameters"),
        (paths[2], "flops", "FLOPs per image"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        _scatter(ax, rows, key, label)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("circular", "zero_fill"), strict=True):
        for row in rows:
            evals = [s["eval"]["shift"] for s in row["seeds"] if s["eval"]]
            if not evals:
                continue
            shifts = evals[0]["shifts"]
            values = [
                statistics.fmean(100 * e[mode]["consistency"][i] for e in evals)
                for i in range(len(shifts))
            ]
            ax.plot(shifts, values, marker="o", label=row["name"])
        ax.set_title(f"{mode.replace('_', ' ')} shifts")
        ax.set_xlabel("shift (pixels)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("prediction unchanged (%)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[3], dpi=120)
    plt.close(fig)
    return paths


def run_environments(experiment: Experiment, runs: Path, rows: list[dict]) -> list[dict]:
    """The environment.json of every reported run (run, seed), in the report's order; `runs`
    is the folder that holds the runs' workdirs."""
    by_name = {run.name: run for run in experiment.runs}
    envs = []
    for row in rows:
        for seed in row["seeds"]:
            path = run_dir(runs, by_name[row["name"]], seed["seed"]) / "environment.json"
            if path.exists():
                envs.append(json.loads(path.read_text()))
    return envs


def commits_line(envs: list[dict]) -> str:
    """'commit X' when every run was trained at one commit, else 'commits X (n runs), ...';
    a run from a tree with uncommitted changes keeps its '+dirty', so the report shows it."""
    counts: dict[str, int] = {}
    for env in envs:
        commit = env.get("git_commit") or "?"
        counts[commit] = counts.get(commit, 0) + 1
    if not counts:
        return "commit ?"
    if len(counts) == 1:
        return f"commit {next(iter(counts))}"
    return "commits " + ", ".join(f"{c} ({n} runs)" for c, n in counts.items())


def cores_phrase(envs: list[dict]) -> str:
    """'2 CPU cores', and ', each run on 1' (or '1-2') when runs had fewer of them, as when
    the runner trains several side by side; environment.json's before cpu_cores_used count as
    all cores."""
    if not envs:
        return "? CPU cores"
    total = envs[0].get("cpu_count", "?")
    used = sorted({env.get("cpu_cores_used", env.get("cpu_count")) for env in envs} - {None})
    text = f"{total} CPU cores"
    if used and used != [total]:
        text += f", each run on {used[0]}" + (f"-{used[-1]}" if len(used) > 1 else "")
    return text


def seeds_flag(experiment: Experiment, spec: str) -> str:
    """' --seeds=...' when the experiment runs other seeds than its file's, else '' (also for
    an experiment defined in code, with no file)."""
    import experiments

    try:
        own = experiments.get(spec).seeds
    except UserError:
        return ""
    if experiment.seeds == own:
        return ""
    return " --seeds=" + ",".join(map(str, experiment.seeds))


def command_flags(experiment: Experiment, spec: str, output: Path, runs: Path) -> str:
    """The flags after the spec in the command that reproduces a report: --seeds when not
    the experiment's own, --output, and --runs when the runs live elsewhere."""
    return f"{seeds_flag(experiment, spec)} --output={output}{runs_flag(output, runs)}"


def write(experiment: Experiment, output: Path, spec: str, runs: Path | None = None) -> str:
    """Writes report.md, results.json (the collected numbers) and the plots into `output` from
    the runs in `runs` (default: `output` itself); returns the table."""
    output = Path(output)
    runs = Path(runs) if runs is not None else output
    flags = command_flags(experiment, spec, output, runs)
    rows = collect(experiment, runs)
    if not rows:
        raise UserError(
            f"no finished run of {spec} in {runs} yet: nothing to report. Run "
            f"`python -m experiments run {spec}{flags}` first."
        )
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows) + "\n\n" + comparison(rows)
    plot(rows, output)
    envs = run_environments(experiment, runs, rows)
    env = envs[0] if envs else {}
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    text = f"""# Experiment `{spec}`

**Question.** {experiment.question}

{table}

Test accuracy of the final model: mean ± sample std over seeds, and the 95 % confidence
interval of the mean (Student t). Plateaued: the seeds whose last {stats.PLATEAU_EVALS}
held-out evaluations lie within {100 * stats.PLATEAU_TOLERANCE:.1f} points of each other; a
row that has not plateaued may still be rising, and its rank is that of its budget. Shift
consistency: the probability that two random shifts (up to {experiment.max_shift} pixels,
circular) of a test image get the same top-1 class (Zhang 2019). With flip TTA: the accuracy
of the mean softmax of each test image and its mirror image (measured when the run trained
with flips). Train time excludes compilation and evaluation; images/s is the median over
logging intervals.

{published_section(experiment, rows)}
![learning curves](learning_curves.png)
![accuracy vs parameters](accuracy_vs_params.png)
![accuracy vs FLOPs](accuracy_vs_flops.png)
![shift consistency](shift_consistency.png)

Produced by `python -m experiments run {spec}{flags}`
on {env.get("device_count", "?")} x
{env.get("device_kind", "?")} ({env.get("platform", "?")}, {cores_phrase(envs)}),
{commits_line(envs)}; {versions}.
"""
    (output / "report.md").write_text(text)
    summary = [
        dict(summarize(row), config=row["config"], overrides=row["overrides"]) for row in rows
    ]
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    return table
