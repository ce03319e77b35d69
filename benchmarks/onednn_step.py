"""The whole training and eval steps with the convolutions through oneDNN (models/onednn.py),
against the same steps on XLA's convolutions and against PyTorch: interleaved windows.

    python -m benchmarks.onednn_step --models=resnet20,plain --windows=5
    python -m benchmarks.onednn_step --threads=1,2 --reference=none

The layers send their convolutions to oneDNN themselves (`models.cpu_kernels.
layer_conv_general_dilated`: each pass where `onednn.choose` decides, XLA's for the rest). The
`onednn@T` worker is benchmarks/jax_worker.py (the project's real steps, `training.setup.setup`)
with T OpenMP threads; `jax` is the same worker with `CONVNETS_ONEDNN=0` (XLA's convolutions),
`torch` benchmarks/torch_worker.py; all are the benchmark's own (benchmarks/throughput.py),
timed alike. Medians of the windows.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from benchmarks import protocol
from benchmarks.onednn_parts import parse_variant
from benchmarks.throughput import DEFAULT_MODELS, ROOT, require_presets, steps_for

JAX, TORCH = "jax", "torch"


def serve_step(argv: Sequence[str]) -> None:
    """Runs benchmarks/jax_worker.py with the convolutions through oneDNN."""
    from benchmarks import jax_worker
    from models import onednn

    jax_worker.define_flags()
    flags.DEFINE_integer("omp_threads", 1, "OpenMP threads of each oneDNN call.")
    flags.FLAGS(list(argv))
    os.environ[onednn.THREADS_ENV] = str(flags.FLAGS.omp_threads)
    if not onednn.available():
        raise SystemExit(f"oneDNN extension not available: {onednn.unavailable_reason()}")
    protocol.restrict_cores(flags.FLAGS.cores)
    protocol.serve(jax_worker.setup)


def start_workers(model, batch, eval_batch, cores, threads, reference):
    common = [f"--model={model}", f"--batch_size={batch}", f"--eval_batch_size={eval_batch}"]
    common += [f"--cores={cores}"]
    cold = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    xla = {**cold, "CONVNETS_ONEDNN": "0"}  # the layers on XLA's convolutions
    specs = [(JAX, [sys.executable, "-m", "benchmarks.jax_worker", *common], xla, ROOT)]
    for variant in threads:
        t, env = parse_variant(variant)
        argv = [sys.executable, "-m", "benchmarks.onednn_step", "--serve", *common]
        specs.append((f"onednn@{variant}", [*argv, f"--omp_threads={t}"], {**cold, **env}, ROOT))
    if reference == TORCH:
        specs.append((TORCH, [sys.executable, "-m", "benchmarks.torch_worker", *common], {}, ROOT))
    return protocol.start_one_by_one(specs)


def measure(workers, commands, windows, window_seconds) -> dict:
    tasks = [(w, c) for c in commands for w in workers]
    steps = {}
    for w, c in tasks:
        w.call(c, steps=1)  # warm-up
        steps[w.name, c] = steps_for(w.call(c, steps=1)["seconds"], window_seconds)
    samples: dict = {}
    for i in range(windows):
        for w, c in tasks if i % 2 == 0 else tasks[::-1]:
            r = w.call(c, steps=steps[w.name, c])
            samples.setdefault((w.name, c), []).append(r["seconds"] / r["steps"])
    out: dict = {}
    for (name, c), values in samples.items():
        out.setdefault(name, {})[c] = statistics.median(values)
    return out


def define_flags() -> None:
    flags.DEFINE_list("models", list(DEFAULT_MODELS), "Model presets.")
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_integer("eval_batch_size", 500, "Eval batch size.")
    flags.DEFINE_integer("windows", 5, "Timed windows per contestant and step.")
    flags.DEFINE_float("window_seconds", 1.0, "Target length of a window (at least one step).")
    flags.DEFINE_integer("cores", 0, "Pin every worker to the first N CPUs (0: all).")
    flags.DEFINE_list(
        "threads",
        ["2"],
        "A oneDNN worker per entry: its OpenMP threads T, or T:passive / T:active / "
        "T:spin for OMP_WAIT_POLICY (spin: libgomp's default, GOMP_SPINCOUNT=300000), or "
        "T:xla_norm for BatchNorm on XLA.",
    )
    flags.DEFINE_enum("reference", TORCH, [TORCH, "none"], "The reference to time.")
    flags.DEFINE_string(
        "output", str(ROOT / "benchmarks" / "results" / "onednn_step.json"), "JSON results."
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    require_presets(f.models)
    threads = list(f.threads)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    results = {}
    for model in f.models:
        workers = start_workers(
            model, f.batch_size, f.eval_batch_size, f.cores, threads, f.reference
        )
        try:
            timings = measure(workers, ("train", "eval"), f.windows, f.window_seconds)
            ready = {w.name: w.ready for w in workers}
        finally:
            for w in workers:
                w.close()
        results[model] = {"seconds_per_step": timings, "ready": ready}
        rows = []
        for name, t in timings.items():
            row = f"{model:12s} {name:10s} train {f.batch_size / t['train']:8.1f} img/s"
            row += f"  eval {f.eval_batch_size / t['eval']:8.1f} img/s"
            row += f"  train vs jax {timings[JAX]['train'] / t['train']:.2f}"
            if TORCH in timings:
                row += f"  vs torch {timings[TORCH]['train'] / t['train']:.2f}"
                row += f"  eval vs torch {timings[TORCH]['eval'] / t['eval']:.2f}"
            rows.append(row)
        print("\n".join(rows), f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    report = {
        "settings": {
            "models": f.models,
            "batch_size": f.batch_size,
            "eval_batch_size": f.eval_batch_size,
            "windows": f.windows,
            "window_seconds": f.window_seconds,
            "cores": f.cores,
            "threads": threads,
        },
        "environment": {
            "started": started.isoformat(timespec="seconds"),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "models": results,
    }
    output = Path(f.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"results: {output}")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve_step([a for a in sys.argv if a != "--serve"])
    else:
        define_flags()
        app.run(main)
