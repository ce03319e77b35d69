"""Training and eval throughput of each model family: the project's real steps against PyTorch.

    python -m benchmarks.throughput                       # all families, table + JSON
    python -m benchmarks.throughput --models=resnet20 --windows=3 --reference=none
    python -m benchmarks.throughput --xla_variant=jax_default= \\
        --xla_variant=ynn_off=--xla_cpu_experimental_ynn_fusion_type=   # XLA flags before/after
    python -m benchmarks.throughput --before_commit=HEAD~1 --reference=none   # a change

For each model it starts one worker process per contestant (benchmarks/protocol.py): our JAX
step (benchmarks/jax_worker.py: training.setup.setup, as train.py
runs it), the PyTorch reference built from the same LayerSpecs (benchmarks/torch_worker.py),
JAX under each `--xla_variant` (XLA reads its flags once per process), and with
`--before_commit` that commit's own JAX worker (a temporary git worktree). Workers start one
after another, so each compile time is measured alone; then the coordinator asks them in turn
for timed windows, reversing the order every round, so that the machine's noise hits all alike.
It reports medians over the windows:

- training images/s (batch already on the device) and eval images/s, ours / reference;
- time to first step (state creation + ahead-of-time compile of train and eval + first step);
- the input pipeline's share of step time: the same step fed by `data.train_batches`, against
  the batch already on the device (1 - device / pipeline);
- achieved FLOP/s (3x the summary's forward FLOPs per trained image: forward + backward) and its
  ratio to the machine's float32 matmul peak (the best of a 2048^3 matmul in JAX and in torch,
  timed in the same run);
- peak resident memory of each worker, i.e. of one training run of the model.

Results go to --output (JSON) and a table on stdout; benchmarks/README.md records a run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from benchmarks.protocol import Worker, start_one_by_one, worktree

# One model per family (plain, pooled, All-CNN-C, two CIFAR ResNet depths, the wide ResNet).
DEFAULT_MODELS = ("plain", "pooled_max", "allcnn_c", "resnet20", "resnet56", "wide_resnet")
ROOT = Path(__file__).resolve().parent.parent
# A training step's FLOPs: the forward pass, and a backward pass of about twice its cost
# (gradients with respect to both activations and weights).
TRAIN_FLOPS_PER_FORWARD = 3
JAX = "jax"  # the project's JAX step, with the project's XLA flags
TORCH = "torch"
BEFORE = "before"  # the JAX step of --before_commit
# The targets of the benchmark issue (this 2-core CPU).
TARGET_PIPELINE_SHARE = 0.05
TARGET_COMPILE_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one benchmark run measures, and how (the command-line flags)."""

    batch_size: int = 128
    eval_batch_size: int = 500
    windows: int = 5
    window_seconds: float = 2.0
    cores: int = 0
    reference: str = TORCH
    variants: tuple[tuple[str, str], ...] = ()
    before_commit: str | None = None


def define_flags() -> None:
    """Defines the command-line flags; only when the benchmark runs as a program, so that
    importing it (tests) defines none."""
    flags.DEFINE_list("models", list(DEFAULT_MODELS), "Model presets to benchmark.")
    flags.DEFINE_integer("batch_size", 128, "Training batch size (both frameworks).")
    flags.DEFINE_integer("eval_batch_size", 500, "Eval batch size (both; the configs' value).")
    flags.DEFINE_integer("windows", 5, "Timed windows per contestant and measurement.")
    flags.DEFINE_float("window_seconds", 2.0, "Target length of a window (at least one step).")
    flags.DEFINE_integer(
        "cores",
        0,
        "Pin every worker to the first N CPUs (0: all). Both frameworks use one thread per "
        "CPU. On a busy machine, --cores=1 measures per-core speed without the collapse of "
        "multi-threaded barriers when other processes take the cores.",
    )
    flags.DEFINE_enum("reference", TORCH, [TORCH, "none"], "The reference to time.")
    flags.DEFINE_list(
        "check_models",
        ["resnet20", "plain"],
        "Models whose torch outputs are compared with ours for the same weights (with torch).",
    )
    flags.DEFINE_multi_string(
        "xla_variant",
        [],
        "NAME=FLAGS: also time our step in a process with XLA_FLAGS=FLAGS and without the "
        "project's defaults (FLAGS empty: JAX's defaults). Repeat for several.",
    )
    flags.DEFINE_string(
        "before_commit",
        None,
        "Also time the step of this git commit (its own worker, from a temporary worktree), "
        "as contestant 'before': a code change measured before and after in one run.",
    )
    flags.DEFINE_string(
        "output", str(ROOT / "benchmarks" / "results" / "throughput.json"), "JSON results file."
    )


# --------------------------------------------------------------------------------------------
# Contestants


def require_presets(names: Sequence[str], flag: str = "--models") -> None:
    """Raises a UsageError (one line, no traceback) unless every name is a model preset."""
    import models

    unknown = [name for name in names if name not in models.PRESETS]
    if unknown or not names:
        raise app.UsageError(
            f"{flag}: unknown model preset(s) {', '.join(unknown) or '(none given)'}; "
            f"valid presets: {', '.join(models.PRESETS)}"
        )


def parse_variant(text: str) -> tuple[str, str]:
    """Returns (name, XLA flags) from 'NAME=FLAGS' (FLAGS may contain '=' and be empty)."""
    name, sep, xla_flags = text.partition("=")
    if not sep or not name or name in (JAX, TORCH, BEFORE):
        raise app.UsageError(
            f"--xla_variant={text!r}: expected NAME=FLAGS with a NAME other than jax, torch and "
            "before, "
            "e.g. jax_default= or ynn_off=--xla_cpu_experimental_ynn_fusion_type="
        )
    return name, xla_flags


def start_workers(model: str, settings: Settings, before_tree: Path | None = None) -> list[Worker]:
    """Starts the contestants' workers one after another (each compiles alone); returns them.
    `before_tree`: a checkout of `settings.before_commit`, whose worker runs as 'before'."""
    common = [f"--model={model}", f"--batch_size={settings.batch_size}"]
    common += [f"--eval_batch_size={settings.eval_batch_size}", f"--cores={settings.cores}"]
    cold = {"JAX_ENABLE_COMPILATION_CACHE": "false"}  # compile times from scratch
    jax_worker = [sys.executable, "-m", "benchmarks.jax_worker", *common]
    specs = [(JAX, jax_worker, cold, None)]
    for name, xla_flags in settings.variants:
        specs.append(
            (name, [*jax_worker, "--noproject_flags"], {**cold, "XLA_FLAGS": xla_flags}, None)
        )
    if before_tree is not None:
        specs.append((BEFORE, jax_worker, cold, before_tree))
    if settings.reference == TORCH:
        specs.append((TORCH, [sys.executable, "-m", "benchmarks.torch_worker", *common], {}, None))
    return start_one_by_one(specs)


# --------------------------------------------------------------------------------------------
# Timing


def steps_for(seconds_per_step: float, target_seconds: float) -> int:
    """Returns the steps of a window of about `target_seconds` (at least one)."""
    return max(1, round(target_seconds / max(seconds_per_step, 1e-9)))


def seconds_per_step(windows: Sequence[dict]) -> float:
    """Returns the median over windows of seconds per step."""
    return statistics.median(w["seconds"] / w["steps"] for w in windows)


def pipeline_share(device_seconds: float, pipeline_seconds: float) -> float:
    """Returns the share of a pipeline-fed step's time not spent in the step itself:
    1 - device/pipeline (negative when noise made the fed step the faster one)."""
    return 1.0 - device_seconds / pipeline_seconds


def measure(workers: Sequence[Worker], windows: int, window_seconds: float) -> dict:
    """Times interleaved windows; returns {worker name: {kind: [window, ...]}}.

    Kinds: train and eval for every worker, pipeline for our step, matmul for the first JAX
    worker and torch (the machine's peak). Window lengths are calibrated on one step each.
    """
    tasks = []
    for i, worker in enumerate(workers):
        tasks += [(worker, "train"), (worker, "eval")]
        if worker.name == JAX:
            tasks.append((worker, "pipeline"))
        if worker.name == TORCH or i == 0:
            tasks.append((worker, "matmul"))
    steps = {}
    for worker, kind in tasks:
        # pipeline windows as long as train windows: the two are compared
        probe = "train" if kind == "pipeline" else kind
        if (worker.name, probe) not in steps:
            one = worker.call(probe, steps=1)
            target = window_seconds / 4 if probe == "matmul" else window_seconds
            steps[worker.name, probe] = steps_for(one["seconds"], target)
    results: dict[str, dict[str, list]] = {w.name: {} for w in workers}
    for round_index in range(windows):
        order = tasks if round_index % 2 == 0 else tasks[::-1]
        for worker, kind in order:
            probe = "train" if kind == "pipeline" else kind
            window = worker.call(kind, steps=steps[worker.name, probe])
            results[worker.name].setdefault(kind, []).append(window)
    return results


def summarize(
    ready: dict, windows: dict[str, list], peak_rss: int, batch: int, eval_batch: int
) -> dict:
    """Returns one contestant's medians: images/s, step times, compile time, memory."""
    out = {
        k: ready[k]
        for k in (
            "params",
            "init_seconds",
            "compile_seconds",
            "first_step_seconds",
            "import_seconds",
        )
        if k in ready
    }
    train = seconds_per_step(windows["train"])
    out["train_step_seconds"] = train
    out["train_images_per_s"] = batch / train
    out["train_images_per_s_windows"] = [
        w["steps"] * batch / w["seconds"] for w in windows["train"]
    ]
    out["eval_images_per_s"] = eval_batch / seconds_per_step(windows["eval"])
    if "pipeline" in windows:
        fed = seconds_per_step(windows["pipeline"])
        out["pipeline_step_seconds"] = fed
        out["pipeline_share"] = pipeline_share(train, fed)
    if "matmul" in windows:
        out["matmul_gflops"] = ready["matmul_flops"] / seconds_per_step(windows["matmul"]) / 1e9
    out["peak_rss_mib"] = peak_rss / 2**20
    return out


def benchmark_model(
    model: str, settings: Settings, before_tree: Path | None = None
) -> tuple[dict, dict]:
    """Runs every contestant on `model`; returns (its results, {contestant: ready report})."""
    workers = start_workers(model, settings, before_tree)
    try:
        windows = measure(workers, settings.windows, settings.window_seconds)
        contestants = {}
        for worker in workers:
            peak = worker.call("peak_rss")["peak_rss_bytes"]
            contestants[worker.name] = summarize(
                worker.ready,
                windows[worker.name],
                peak,
                settings.batch_size,
                settings.eval_batch_size,
            )
    finally:
        for worker in workers:
            worker.close()
    ours = workers[0].ready
    result = {
        "model": model,
        "params": ours["params"],
        "params_real": ours["real_params"],
        "flops_per_image": ours["flops_per_image"],
        "xla_flags": ours["environment"]["xla_flags"],
        "contestants": contestants,
    }
    jax_result = contestants[JAX]
    jax_result["train_gflops"] = (
        jax_result["train_images_per_s"] * TRAIN_FLOPS_PER_FORWARD * ours["flops_per_image"] / 1e9
    )
    for name, other in contestants.items():
        if name != JAX:
            result[f"ours_over_{name}_train"] = (
                jax_result["train_images_per_s"] / other["train_images_per_s"]
            )
            result[f"ours_over_{name}_eval"] = (
                jax_result["eval_images_per_s"] / other["eval_images_per_s"]
            )
    if settings.reference == TORCH:
        result["params_torch"] = contestants[TORCH]["params"]
    return result, {w.name: w.ready for w in workers}


# --------------------------------------------------------------------------------------------
# Environment, checks, report


def cpu_model() -> str:
    """Returns the CPU's model name (Linux), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_equivalence(models: Sequence[str]) -> list[dict]:
    """Runs benchmarks/equivalence.py in its own process; returns its per-model results."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.equivalence", f"--models={','.join(models)}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"the equivalence check failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_peak_ratios(results: list[dict]) -> float:
    """Sets each model's `train_share_of_peak`; returns the run's float32 matmul peak (GFLOP/s:
    the best median over every model's JAX and torch matmul windows)."""
    peaks = [
        c["matmul_gflops"]
        for r in results
        for c in r["contestants"].values()
        if "matmul_gflops" in c
    ]
    peak = max(peaks)
    for r in results:
        r["contestants"][JAX]["train_share_of_peak"] = r["contestants"][JAX]["train_gflops"] / peak
    return peak


def format_table(results: Sequence[dict], peak_gflops: float) -> str:
    """Returns the results as a text table: one row per model, our step's numbers first."""
    has_torch = any(TORCH in r["contestants"] for r in results)
    header = ["model", "params", "train img/s", "eval img/s", "1st step s", "pipeline"]
    header += ["GFLOP/s", "of peak", "RSS MiB"]
    if has_torch:
        header += ["torch train", "ours/torch", "torch eval", "ours/torch eval", "torch MiB"]
    rows = [header]
    for r in results:
        c = r["contestants"][JAX]
        row = [
            r["model"],
            f"{r['params']:,}",
            f"{c['train_images_per_s']:.0f}",
            f"{c['eval_images_per_s']:.0f}",
            f"{c['first_step_seconds']:.1f}",
            f"{100 * c['pipeline_share']:.1f}%",
            f"{c['train_gflops']:.0f}",
            f"{100 * c['train_share_of_peak']:.0f}%",
            f"{c['peak_rss_mib']:.0f}",
        ]
        if has_torch:
            t = r["contestants"][TORCH]
            row += [
                f"{t['train_images_per_s']:.0f}",
                f"{r['ours_over_torch_train']:.2f}",
                f"{t['eval_images_per_s']:.0f}",
                f"{r['ours_over_torch_eval']:.2f}",
                f"{t['peak_rss_mib']:.0f}",
            ]
        rows.append(row)
    variants = sorted({n for r in results for n in r["contestants"]} - {JAX, TORCH})
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"float32 matmul peak (2048^3, best of JAX and torch): {peak_gflops:.0f} GFLOP/s")
    for name in variants:
        label = (
            "our step / before"
            if name == BEFORE
            else f"our step with the project's XLA flags / {name}"
        )
        lines.append(
            f"{label}: "
            + ", ".join(
                f"{r['model']} {r[f'ours_over_{name}_train']:.2f}x"
                + f" (compile {r['contestants'][name]['compile_seconds']:.1f} s)"
                for r in results
                if name in r["contestants"]
            )
        )
    return "\n".join(lines)


def targets(results: Sequence[dict]) -> dict:
    """Returns which of the issue's targets this run meets, per model."""
    out = {}
    for r in results:
        c = r["contestants"][JAX]
        out[r["model"]] = {
            "pipeline_share_at_most_5pct": c["pipeline_share"] <= TARGET_PIPELINE_SHARE,
            "compile_at_most_10s": c["compile_seconds"] <= TARGET_COMPILE_SECONDS,
        }
        if "ours_over_torch_train" in r:
            out[r["model"]]["train_at_least_torch"] = r["ours_over_torch_train"] >= 1.0
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    require_presets(f.models)
    settings = Settings(
        batch_size=f.batch_size,
        eval_batch_size=f.eval_batch_size,
        windows=f.windows,
        window_seconds=f.window_seconds,
        cores=f.cores,
        reference=f.reference,
        variants=tuple(parse_variant(v) for v in f.xla_variant),
        before_commit=f.before_commit,
    )
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    check = settings.reference == TORCH and f.check_models
    if check:
        require_presets(f.check_models, "--check_models")
    equivalence = run_equivalence(f.check_models) if check else []
    results, ready = [], {}
    with worktree(settings.before_commit) as before_tree:
        for model in f.models:
            result, ready[model] = benchmark_model(model, settings, before_tree)
            results.append(result)
            print(f"{model}: done", file=sys.stderr, flush=True)
    peak = add_peak_ratios(results)
    first = ready[f.models[0]]
    environment = {
        "started": started.isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "machine_cores": len(os.sched_getaffinity(0)),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **first[JAX]["environment"],
    }
    if TORCH in first:
        environment["torch"] = {
            k: first[TORCH][k] for k in ("torch", "threads", "cpu_capability", "memory_format")
        }
    report = {
        "settings": {
            **dataclasses.asdict(settings),
            "variants": dict(settings.variants),
            "threads": first[JAX]["cores"],
            "dtype": "float32",
        },
        "environment": environment,
        "matmul_peak_gflops": peak,
        "equivalence": equivalence,
        "models": results,
        "targets": targets(results),
    }
    output = Path(f.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(results, peak))
    print(
        f"threads per framework: {first[JAX]['cores']}; load average before/after: "
        f"{load_before[0]:.1f}/{environment['load_average_after'][0]:.1f}"
    )
    for result in equivalence:
        diffs = ", ".join(
            f"{mode} {result[f'{mode}_max_abs_diff']:.1e}"
            for mode in ("eval", "train")
            if f"{mode}_max_abs_diff" in result
        )
        print(
            f"equivalence {result['model']}: params equal {result['params_equal']}, "
            f"logits max |diff| {diffs}"
        )
    print(f"results: {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
