"""Every convolution of the families, pass by pass, through oneDNN via XLA's FFI (models/onednn.py)
against XLA's own convolution and PyTorch's (oneDNN): which passes win through the extension.

    python -m benchmarks.onednn_parts                          # the six families, table + JSON
    python -m benchmarks.onednn_parts --models=resnet20 --windows=3 --window_seconds=0.3
    python -m benchmarks.onednn_parts --threads=1,2 --layouts=plain,weights_any,blocked

The convolutions are those of benchmarks/conv_parts.py (`model_convs`: the LayerSpecs of the
presets, batch 128, float32), and so are two of the contestants, run by that script's own
workers:

- `xla`: XLA:CPU with the project's flags and the project's convolution (conv_parts' `jax`
  worker);
- `torch`: PyTorch channels-last, `convolution_backward` with one output (conv_parts' `torch`
  worker);
- `onednn@T:layout`: the pass as one `jax.ffi.ffi_call` of csrc/onednn_conv.cc inside a jitted
  function, in a JAX worker with the project's flags, with T OpenMP threads and the primitive
  created with the given memory layout (models.onednn.LAYOUTS: `plain` NHWC/HWIO,
  `weights_any` oneDNN's weight layout, `blocked` oneDNN's layouts for every operand, with
  the reorders timed as part of the pass).

Windows are interleaved across all contestants (reversed every round); numbers are medians.
Per convolution and pass it prints every contestant's milliseconds, the best oneDNN variant
and the speed ratios; per model, the convolutions of one training step with XLA alone, with
`models.onednn.choose`'s plan (each pass where the plan sends it), with the best of both per
pass, and PyTorch's. benchmarks/README.md records a run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from benchmarks import protocol
from benchmarks.conv_parts import PASSES, Conv, make_inputs, measure_tasks, model_convs
from benchmarks.throughput import DEFAULT_MODELS, ROOT, cpu_model, require_presets

XLA, TORCH = "xla", "torch"


def onednn_name(variant: str) -> str:
    return f"onednn@{variant}"


def parse_variant(variant: str) -> tuple[int, dict]:
    """'T' or 'T:passive' -> (OpenMP threads, extra environment of the worker); 'T:xla_norm':
    BatchNorm on XLA (CONVNETS_ONEDNN_NORM=0), the convolutions through oneDNN."""
    threads, _, policy = variant.partition(":")
    if threads.isdigit() and policy == "xla_norm":
        return int(threads), {"CONVNETS_ONEDNN_NORM": "0"}
    if not threads.isdigit() or policy not in ("", "passive", "active", "spin"):
        raise app.UsageError(
            f"--threads: {variant!r} is not T, T:passive, T:active, T:spin or T:xla_norm"
        )
    if policy == "spin":  # libgomp's own default (models.onednn sets PASSIVE unless told)
        return int(threads), {"GOMP_SPINCOUNT": "300000"}
    return int(threads), ({"OMP_WAIT_POLICY": policy.upper()} if policy else {})


def onednn_shape(conv: Conv, batch: int):
    from models import onednn

    pad = ((conv.padding, conv.padding),) * 2
    k = conv.kernel_size
    return onednn.Shape(
        batch, conv.height, conv.width, conv.depth, conv.filters, k, k, (conv.stride,) * 2, pad
    )


# --------------------------------------------------------------------------------------------
# The oneDNN worker: `python -m benchmarks.onednn_parts --serve --threads=T --convs=JSON`


def onednn_passes(conv: Conv, x, w, dy, layouts: Sequence[str]) -> dict:
    """Returns {"pass:layout": function of no arguments} running each pass through oneDNN in a
    compiled program; each call returns the pass's result, ready."""
    import jax

    from models import onednn

    strides, padding = (conv.stride,) * 2, ((conv.padding, conv.padding),) * 2
    x, w, dy = jax.device_put((x, w, dy))
    out = {}
    for layout in layouts:
        code = onednn.LAYOUTS[layout]
        fns = {
            "fwd": (lambda x, w, c=code: onednn.forward(x, w, strides, padding, c), (x, w)),
            "dx": (
                lambda dy, w, c=code: onednn.input_grad(dy, w, x.shape, strides, padding, c),
                (dy, w),
            ),
            "dw": (
                lambda x, dy, c=code: onednn.weight_grad(x, dy, w.shape, strides, padding, c),
                (x, dy),
            ),
        }
        for name, (fn, args) in fns.items():
            compiled = jax.jit(fn).lower(*args).compile()
            out[f"{name}:{layout}"] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    return out


def serve_onednn(convs: Sequence[Conv], batch: int, threads: int, layouts: Sequence[str]):
    from benchmarks.conv_parts import _window
    from models import onednn
    from training import runtime

    runtime.configure_jax()
    if not onednn.available():
        raise RuntimeError(f"the oneDNN extension is not available: {onednn.unavailable_reason()}")
    onednn.set_threads(threads)
    programs, implementations = {}, {}
    for conv in convs:
        for part, run in onednn_passes(conv, *make_inputs(conv, batch), layouts).items():
            run()  # warm-up: creates and caches the primitive
            programs[conv.key, part] = run
            name, layout = part.split(":")
            implementations.setdefault(conv.key, {})[part] = onednn.implementation(
                onednn_shape(conv, batch), name, onednn.LAYOUTS[layout]
            )

    def handle(conv: str, part: str, steps: int) -> dict:
        return _window(programs[conv, part], steps)

    report = {
        "environment": {
            **runtime.environment(),
            "onednn": onednn.version(),
            "omp_threads": threads,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        },
        "implementations": implementations,
    }
    return report, {"time": handle}


# --------------------------------------------------------------------------------------------
# Coordinator


def start_workers(convs, batch, cores, threads, layouts, reference):
    payload = json.dumps([dataclasses.asdict(c) for c in convs])
    common = [f"--convs={payload}", f"--batch_size={batch}", f"--cores={cores}"]
    cold = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    parts = [sys.executable, "-m", "benchmarks.conv_parts"]
    specs = [(XLA, [*parts, "--serve=jax", *common], cold, ROOT)]
    if reference == TORCH:
        specs.append((TORCH, [*parts, "--serve=torch", *common], {}, ROOT))
    ours = [sys.executable, "-m", "benchmarks.onednn_parts", "--serve", *common]
    for variant in threads:
        t, env = parse_variant(variant)
        argv = [*ours, f"--threads={t}", f"--layouts={','.join(layouts)}"]
        specs.append((onednn_name(variant), argv, {**cold, **env}, ROOT))
    return protocol.start_one_by_one(specs)


def measure(workers, convs, layouts, windows: int, window_seconds: float) -> dict:
    """Returns {contestant: {conv key: {part: median seconds}}}, where a part is a pass for
    xla and torch and "pass:layout" for the oneDNN workers."""
    tasks = []
    for conv in convs:
        for p in PASSES:
            for w in workers:
                names = [p] if w.name in (XLA, TORCH) else [f"{p}:{lay}" for lay in layouts]
                tasks += [(w, conv.key, n) for n in names]
    return measure_tasks(tasks, windows, window_seconds)


def best_onednn(timings: dict, key: str, name: str) -> tuple[float, str]:
    """Returns (seconds, "T:layout") of the fastest oneDNN variant of pass `name`."""
    best = (float("inf"), "")
    for worker, per_conv in timings.items():
        if not worker.startswith("onednn@"):
            continue
        for part, seconds in per_conv[key].items():
            p, layout = part.split(":")
            if p == name and seconds < best[0]:
                best = (seconds, f"{worker.split('@')[1]}:{layout}")
    return best


def chosen_seconds(conv: Conv, batch: int, timings: dict, name: str, threads: str) -> float:
    """Seconds of pass `name` where models.onednn.choose sends it (oneDNN at `threads`)."""
    from models import onednn

    layout = onednn.choose(onednn_shape(conv, batch)).get(name)
    if layout is None:
        return timings[XLA][conv.key][name]
    label = {v: k for k, v in onednn.LAYOUTS.items()}[layout]
    return timings[onednn_name(threads)][conv.key][f"{name}:{label}"]


def model_totals(listed, batch: int, timings: dict, threads: str) -> dict:
    """Per model: seconds of one training step's convolutions (dx skipped for the first)."""
    totals = {XLA: 0.0, "chosen": 0.0, "best": 0.0}
    if TORCH in timings:
        totals[TORCH] = 0.0
    for conv, needs_dx in listed:
        for p in PASSES if needs_dx else ("fwd", "dw"):
            xla = timings[XLA][conv.key][p]
            totals[XLA] += xla
            totals["chosen"] += chosen_seconds(conv, batch, timings, p, threads)
            totals["best"] += min(xla, best_onednn(timings, conv.key, p)[0])
            if TORCH in timings:
                totals[TORCH] += timings[TORCH][conv.key][p]
    return totals


def _render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_tables(convs, uses, timings, totals, threads, layouts) -> str:
    ones = [onednn_name(t) for t in threads]
    header = ["convolution", "uses", "pass", "xla ms"]
    header += [f"{o}:{lay}" for o in ones for lay in layouts]
    header += ["best oneDNN", "xla/best", "torch ms", "torch/best"]
    rows = [header]
    for conv in convs:
        for p in PASSES:
            row = [conv.key, uses[conv.key], p, f"{1e3 * timings[XLA][conv.key][p]:.2f}"]
            row += [
                f"{1e3 * timings[o][conv.key][f'{p}:{lay}']:.2f}" for o in ones for lay in layouts
            ]
            best, label = best_onednn(timings, conv.key, p)
            row += [label, f"{timings[XLA][conv.key][p] / best:.2f}"]
            if TORCH in timings:
                torch = timings[TORCH][conv.key][p]
                row += [f"{1e3 * torch:.2f}", f"{torch / best:.2f}"]
            else:
                row += ["-", "-"]
            rows.append(row)
    lines = _render(rows)
    lines.append("")
    header = ["model", "xla ms", "chosen ms", "best-of-both ms", "torch ms", "xla/chosen"]
    header += ["torch/chosen"]
    rows = [header]
    for model, t in totals.items():
        torch = t.get(TORCH)
        rows.append(
            [
                model,
                f"{1e3 * t[XLA]:.1f}",
                f"{1e3 * t['chosen']:.1f}",
                f"{1e3 * t['best']:.1f}",
                f"{1e3 * torch:.1f}" if torch else "-",
                f"{t[XLA] / t['chosen']:.2f}",
                f"{torch / t['chosen']:.2f}" if torch else "-",
            ]
        )
    lines += _render(rows)
    lines.append(
        "ratios are speed ratios (time of the first over time of the second; above 1: oneDNN "
        f"faster); 'chosen' is models.onednn.choose in worker onednn@{threads[0]}"
    )
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_list("models", list(DEFAULT_MODELS), "Model presets whose convolutions to time.")
    flags.DEFINE_integer("batch_size", 128, "Batch size of every convolution.")
    flags.DEFINE_integer("windows", 5, "Timed windows per contestant, convolution and pass.")
    flags.DEFINE_float("window_seconds", 0.4, "Target length of a window (at least one call).")
    flags.DEFINE_integer("cores", 0, "Pin every worker to the first N CPUs (0: all).")
    flags.DEFINE_list(
        "threads",
        ["2", "1"],
        "A oneDNN worker per entry: its OpenMP threads T, or T:passive / T:active / T:spin "
        "for OMP_WAIT_POLICY (spin: libgomp's default; plain T: models.onednn's default, "
        "PASSIVE). The first entry is the one 'chosen' uses.",
    )
    flags.DEFINE_list("layouts", ["plain", "weights_any", "blocked"], "oneDNN memory layouts.")
    flags.DEFINE_enum("reference", TORCH, [TORCH, "none"], "The reference to time.")
    flags.DEFINE_string(
        "output", str(ROOT / "benchmarks" / "results" / "onednn_parts.json"), "JSON results."
    )
    flags.DEFINE_bool("serve", False, "Run as a oneDNN worker (the coordinator's).")
    flags.DEFINE_string("convs", "[]", "Worker: the convolutions, as JSON.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    threads = list(f.threads)
    if f.serve:
        protocol.restrict_cores(f.cores)
        convs = [Conv(**c) for c in json.loads(f.convs)]
        t = parse_variant(threads[0])[0]
        protocol.serve(lambda: serve_onednn(convs, f.batch_size, t, f.layouts))
        return
    require_presets(f.models)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    convs_of = {model: model_convs(model) for model in f.models}
    counts: dict[str, dict[str, int]] = {}
    convs: list[Conv] = []
    for model, listed in convs_of.items():
        for conv, _ in listed:
            if conv not in convs:
                convs.append(conv)
            per = counts.setdefault(conv.key, {})
            per[model] = per.get(model, 0) + 1
    uses = {k: " ".join(f"{m}:{n}" for m, n in v.items()) for k, v in counts.items()}
    workers = start_workers(convs, f.batch_size, f.cores, threads, f.layouts, f.reference)
    try:
        timings = measure(workers, convs, f.layouts, f.windows, f.window_seconds)
        ready = {w.name: w.ready for w in workers}
    finally:
        for worker in workers:
            worker.close()
    totals = {
        m: model_totals(listed, f.batch_size, timings, threads[0]) for m, listed in convs_of.items()
    }
    report = {
        "settings": {
            "models": f.models,
            "batch_size": f.batch_size,
            "windows": f.windows,
            "window_seconds": f.window_seconds,
            "cores": f.cores,
            "threads": threads,
            "layouts": f.layouts,
            "dtype": "float32",
        },
        "environment": {
            "started": started.isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "machine_cores": len(os.sched_getaffinity(0)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "contestants": {n: r.get("environment") for n, r in ready.items()},
        },
        "implementations": {
            n: r["implementations"] for n, r in ready.items() if "implementations" in r
        },
        "convolutions": [
            {
                **dataclasses.asdict(conv),
                "uses": counts[conv.key],
                "seconds": {n: timings[n][conv.key] for n in timings},
                "best_onednn": {p: best_onednn(timings, conv.key, p)[1] for p in PASSES},
            }
            for conv in convs
        ],
        "models": totals,
    }
    output = Path(f.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_tables(convs, uses, timings, totals, threads, f.layouts))
    print(f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"results: {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
