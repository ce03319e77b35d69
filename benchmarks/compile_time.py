"""Time to first step of each model family: before and after the compile-time changes.

    python -m benchmarks.compile_time                              # all families, table + JSON
    python -m benchmarks.compile_time --models=resnet56 --rounds=3
    python -m benchmarks.compile_time --before_commit=36dead7     # against an earlier commit

Each measurement is a fresh worker process (benchmarks/jax_worker.py, which builds and compiles
exactly as train.py does), so nothing is cached in memory between them. Per model and round,
one after another:

- `before`: with `--before_commit=REV`, that commit's own worker, run from a temporary
  `git worktree` with the compilation cache off; without it, today's code with the
  initialisation program compiled with LLVM's optimisations and the cache off;
- `cold`: the project as it is, with an empty persistent compilation cache (a first run);
- `warm`: the project as it is, with the cache the `cold` process left (any later run of the
  same program: another seed, a resume, the next run of an experiment).

It reports the medians over rounds of: state creation (`training.state.create_train_state`), the
ahead-of-time compile of the train and eval steps (`training.steps.compile_steps`, the issue's
"compile time"), and the time to the end of the first step. Results go to --output (JSON)
and a table on stdout; benchmarks/README.md records a run.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from benchmarks.protocol import Worker, worktree
from benchmarks.throughput import DEFAULT_MODELS, require_presets

SETTINGS = ("before", "cold", "warm")
KEYS = ("init_seconds", "compile_seconds", "first_step_seconds")
TARGET_COMPILE_SECONDS = 10.0


def define_flags() -> None:
    flags.DEFINE_list(
        "models",
        list(DEFAULT_MODELS),
        "Model presets to time.",
    )
    flags.DEFINE_integer("rounds", 1, "Measurements of each setting per model (medians).")
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_integer("eval_batch_size", 500, "Eval batch size.")
    flags.DEFINE_string(
        "output", "benchmarks/results/compile_time.json", "Where to write the JSON results."
    )
    flags.DEFINE_string(
        "before_commit",
        None,
        "Measure `before` with this git commit's own worker (a temporary worktree).",
    )


def measure(
    model: str,
    setting: str,
    cache_dir: str,
    batch_size: int,
    eval_batch: int,
    before_tree: Path | None = None,
) -> dict:
    """Starts one worker in `setting`, reads its set-up times, stops it. A key the worker does
    not report (an older commit's worker has no `init_seconds`) is None."""
    argv = [sys.executable, "-m", "benchmarks.jax_worker", f"--model={model}"]
    argv += [f"--batch_size={batch_size}", f"--eval_batch_size={eval_batch}"]
    cwd = None
    if setting == "before":
        env = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
        if before_tree is None:
            argv.append("--init_optimized")
        else:
            cwd = before_tree
    else:
        env = {"JAX_ENABLE_COMPILATION_CACHE": "true", "JAX_COMPILATION_CACHE_DIR": cache_dir}
    worker = Worker(f"{model}:{setting}", argv, env, cwd=cwd)
    try:
        ready = worker.wait_ready()
    finally:
        worker.close()
    return {k: ready.get(k) for k in KEYS}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def time_model(
    model: str, rounds: int, batch_size: int, eval_batch: int, before_tree: Path | None = None
) -> dict:
    """Returns {setting: {key: median seconds, key_rounds: [...]}} for `model`."""
    samples = {s: [] for s in SETTINGS}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="convnets-jax-cache-") as cache_dir:
            for setting in SETTINGS:
                times = measure(model, setting, cache_dir, batch_size, eval_batch, before_tree)
                samples[setting].append(times)
                print(f"{model} {setting}: {times}", file=sys.stderr, flush=True)
    out = {}
    for setting, runs in samples.items():
        out[setting] = {k: _median([r[k] for r in runs]) for k in KEYS}
        out[setting].update({f"{k}_rounds": [r[k] for r in runs] for k in KEYS})
    return out


def format_table(results: dict) -> str:
    head = "| model | " + " | ".join(
        f"{what} {s}" for s in SETTINGS for what in ("init s", "compile s", "1st step s")
    )
    lines = [head + " |", "|---" * (1 + 3 * len(SETTINGS)) + "|"]
    for model, r in results.items():
        cells = ["-" if r[s][k] is None else f"{r[s][k]:.1f}" for s in SETTINGS for k in KEYS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    require_presets(f.models)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    with worktree(f.before_commit) as before_tree:
        results = {
            m: time_model(m, f.rounds, f.batch_size, f.eval_batch_size, before_tree)
            for m in f.models
        }
    before = f"commit {f.before_commit}" if f.before_commit else "init optimised, no cache"
    report = {
        "settings": {
            "rounds": f.rounds,
            "batch_size": f.batch_size,
            "models": f.models,
            "before": before,
        },
        "environment": {
            "started": started.isoformat(timespec="seconds"),
            "machine_cores": len(os.sched_getaffinity(0)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "models": results,
        "targets": {
            m: {
                f"compile_at_most_10s_{s}": r[s]["compile_seconds"] <= TARGET_COMPILE_SECONDS
                for s in SETTINGS
            }
            for m, r in results.items()
        },
    }
    output = Path(f.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(results))
    load_after = report["environment"]["load_average_after"][0]
    print(f"load average before/after: {load_before[0]:.1f}/{load_after:.1f}")
    print(f"results: {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
