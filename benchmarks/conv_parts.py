"""Where the training step's time goes: every convolution of the families, pass by pass.

    python -m benchmarks.conv_parts                          # the six families, table + JSON
    python -m benchmarks.conv_parts --models=resnet20 --windows=3 --window_seconds=0.3
    python -m benchmarks.conv_parts --step_times=benchmarks/results/throughput.json

A training step runs each convolution three times: the forward pass, the gradient with respect
to its input (dx) and the gradient with respect to its weights (dw). This script times the
three passes alone for every distinct convolution of the given models (the LayerSpecs of
`models.architecture`: same shapes, strides and explicit padding, the training batch), in
worker processes (benchmarks/protocol.py) with interleaved windows:

- `xla`: XLA:CPU with the project's flags (training/runtime.py), i.e. Eigen's convolutions,
  and the project's convolution (`models.cpu_kernels.conv_general_dilated`: strided
  convolutions' input gradient by phases);
- `xla_ynnpack`: XLA:CPU with JAX's default flags, which hand convolutions to YNNPACK;
- `torch`: PyTorch channels-last, i.e. oneDNN: `torch.ops.aten.convolution_backward` with an
  output mask computes dx or dw alone, as autograd calls it.

It prints a table per convolution and, per model, the sum over its convolutions of one training
step (dx skipped for the first convolution: nothing before it is trained): the time of the
step's convolutions in each framework. With `--step_times` (a report of
benchmarks/throughput.py) it also shows how much of the whole step's ratio the convolutions
allow (`step_ceilings`). Convolutions are timed without their bias (a sum over the output, not
a convolution). benchmarks/README.md records a run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from benchmarks import protocol
from benchmarks.throughput import DEFAULT_MODELS, ROOT, cpu_model, require_presets, steps_for

PASSES = ("fwd", "dx", "dw")
XLA, YNNPACK, TORCH = "xla", "xla_ynnpack", "torch"


@dataclasses.dataclass(frozen=True)
class Conv:
    """One convolution as the benchmark times it: NHWC input, K filters of F x F, stride S,
    symmetric padding P."""

    height: int
    width: int
    depth: int
    filters: int
    kernel_size: int
    stride: int
    padding: int

    @property
    def key(self) -> str:
        return (
            f"{self.height}x{self.width}x{self.depth}->{self.filters} "
            f"F{self.kernel_size} S{self.stride} P{self.padding}"
        )

    def output_size(self, size: int) -> int:
        from models.shapes import conv_output_size

        return conv_output_size(size, self.kernel_size, self.stride, self.padding, layer=self.key)

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of one pass (each of the three costs the same)."""
        out = self.output_size(self.height) * self.output_size(self.width)
        return 2 * batch * out * self.kernel_size**2 * self.depth * self.filters


def model_convs(model: str) -> list[tuple[Conv, bool]]:
    """Returns `model`'s convolutions in order, each with whether a training step needs its
    input gradient (not when no earlier layer has parameters: the first convolution)."""
    import models
    from configs import builtin

    config = builtin.get_config(model)
    specs = models.architecture(config.model, (32, 32, 3), 10)
    out, trained_before = [], False
    for spec in specs:
        if spec.kind == "conv":
            h, w, d = spec.in_shape
            conv = Conv(h, w, d, spec.out_shape[2], spec.kernel_size, spec.stride, spec.padding)
            out.append((conv, trained_before))
        trained_before = trained_before or spec.params > 0
    return out


# --------------------------------------------------------------------------------------------
# Workers: `python -m benchmarks.conv_parts --serve=jax|torch --convs=JSON`


def _window(run, steps: int) -> dict:
    """Times `steps` calls of `run`, each of which waits for its result. Each result is dropped
    before the next call, as a training step drops what it no longer needs: holding results
    across calls makes the allocator hand out fresh pages each time, and faulting in an 8 MiB
    activation costs about as much as the convolution that fills it (torch's forward pass of
    the 32x32x16 layers: 1.9 ms -> 3.4 ms)."""
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return {"seconds": time.perf_counter() - start, "steps": steps}


def make_inputs(conv: Conv, batch: int, seed: int = 0):
    """Returns float32 NumPy arrays (x NHWC, w HWIO, dy NHWC) for one convolution; both
    frameworks time the same values."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, conv.height, conv.width, conv.depth))
    w = rng.normal(size=(conv.kernel_size,) * 2 + (conv.depth, conv.filters))
    w /= np.sqrt(conv.kernel_size**2 * conv.depth)
    dy = rng.normal(
        size=(batch, conv.output_size(conv.height), conv.output_size(conv.width), conv.filters)
    )
    return x.astype(np.float32), w.astype(np.float32), dy.astype(np.float32)


def jax_passes(conv: Conv, x, w, dy) -> dict:
    """Returns {pass: function of no arguments} computing each pass on the device in XLA,
    compiled ahead of time; each call returns the pass's result, ready. The convolution is the
    project's (`models.cpu_kernels.conv_general_dilated`, what `layers.conv` uses)."""
    import jax

    from models import cpu_kernels

    def forward(x, w):
        return cpu_kernels.conv_general_dilated(
            x,
            w,
            (conv.stride, conv.stride),
            ((conv.padding, conv.padding),) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    def input_grad(x, w, dy):
        return jax.vjp(lambda x: forward(x, w), x)[1](dy)[0]

    def weight_grad(x, w, dy):
        return jax.vjp(lambda w: forward(x, w), w)[1](dy)[0]

    x, w, dy = jax.device_put((x, w, dy))
    out = {}
    for name, fn, args in (
        ("fwd", forward, (x, w)),
        ("dx", input_grad, (x, w, dy)),
        ("dw", weight_grad, (x, w, dy)),
    ):
        compiled = jax.jit(fn).lower(*args).compile()
        out[name] = lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args))
    return out


def torch_passes(conv: Conv, x, w, dy) -> dict:
    """Returns {pass: function of no arguments} computing each pass in PyTorch on channels-last
    tensors (oneDNN); dx and dw are `convolution_backward` with one output each, as autograd
    calls it. Results come back in NHWC / HWIO order, as JAX's."""
    import torch

    # NHWC arrays seen as NCHW tensors are channels-last in memory already
    x, dy = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, dy))
    w = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    stride, padding = [conv.stride] * 2, [conv.padding] * 2

    def backward(mask):
        return torch.ops.aten.convolution_backward(
            dy, x, w, None, stride, padding, [1, 1], False, [0, 0], 1, mask
        )

    return {
        "fwd": lambda: torch.nn.functional.conv2d(x, w, None, stride, padding).permute(0, 2, 3, 1),
        "dx": lambda: backward([True, False, False])[0].permute(0, 2, 3, 1),
        "dw": lambda: backward([False, True, False])[1].permute(2, 3, 1, 0),
    }


def serve_jax(convs: Sequence[Conv], batch: int) -> tuple[dict, dict]:
    """Compiles the three passes of every convolution; returns (report, handlers)."""
    from training import runtime

    runtime.configure_jax(project_flags=flags.FLAGS.project_flags)
    programs = {}
    for conv in convs:
        for name, run in jax_passes(conv, *make_inputs(conv, batch)).items():
            run()  # warm-up
            programs[conv.key, name] = run

    def handle(conv: str, part: str, steps: int) -> dict:
        return _window(programs[conv, part], steps)

    return {"environment": runtime.environment()}, {"time": handle}


def serve_torch(convs: Sequence[Conv], batch: int) -> tuple[dict, dict]:
    """Builds channels-last tensors for every convolution; returns (report, handlers)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    programs = {}
    for conv in convs:
        for name, run in torch_passes(conv, *make_inputs(conv, batch)).items():
            with torch.inference_mode():
                run()  # warm-up: oneDNN picks and caches its kernels on first use
            programs[conv.key, name] = run

    def handle(conv: str, part: str, steps: int) -> dict:
        with torch.inference_mode():
            return _window(programs[conv, part], steps)

    report = {
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "memory_format": "channels_last",
        }
    }
    return report, {"time": handle}


# --------------------------------------------------------------------------------------------
# Coordinator


def start_workers(convs: Sequence[Conv], batch: int, cores: int, reference: str) -> list:
    """Starts one worker per contestant, one after another; returns them, ready."""
    payload = json.dumps([dataclasses.asdict(c) for c in convs])
    common = [f"--convs={payload}", f"--batch_size={batch}", f"--cores={cores}"]
    module = [sys.executable, "-m", "benchmarks.conv_parts"]
    cold = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    jax_worker = [*module, "--serve=jax", *common]
    specs = [
        (XLA, jax_worker, cold, ROOT),
        (YNNPACK, [*jax_worker, "--noproject_flags"], {**cold, "XLA_FLAGS": ""}, ROOT),
    ]
    if reference == TORCH:
        specs.append((TORCH, [*module, "--serve=torch", *common], {}, ROOT))
    return protocol.start_one_by_one(specs)


def measure(workers, convs: Sequence[Conv], windows: int, window_seconds: float) -> dict:
    """Times interleaved windows; returns {contestant: {conv key: {pass: median seconds}}}."""
    tasks = [(w, c.key, p) for c in convs for p in PASSES for w in workers]
    return measure_tasks(tasks, windows, window_seconds)


def measure_tasks(tasks, windows: int, window_seconds: float) -> dict:
    """Times `tasks` [(worker, conv key, part)] in interleaved windows (the order reversed
    every other round); returns {worker name: {conv key: {part: median seconds per call}}}."""
    steps = {}
    for worker, key, part in tasks:
        one = worker.call("time", conv=key, part=part, steps=1)
        steps[worker.name, key, part] = steps_for(one["seconds"], window_seconds)
    samples: dict = {}
    for round_index in range(windows):
        order = tasks if round_index % 2 == 0 else tasks[::-1]
        for worker, key, part in order:
            window = worker.call("time", conv=key, part=part, steps=steps[worker.name, key, part])
            samples.setdefault((worker.name, key, part), []).append(
                window["seconds"] / window["steps"]
            )
    out: dict = {}
    for (name, key, part), values in samples.items():
        out.setdefault(name, {}).setdefault(key, {})[part] = statistics.median(values)
    return out


def model_totals(convs: Sequence[tuple[Conv, bool]], timings: dict) -> dict:
    """Returns, per contestant, the seconds of one training step's convolutions `convs` (a
    model's, from `model_convs`)."""
    totals = {}
    for name, per_conv in timings.items():
        total = 0.0
        for conv, needs_dx in convs:
            parts = PASSES if needs_dx else ("fwd", "dw")
            total += sum(per_conv[conv.key][p] for p in parts)
        totals[name] = total
    return totals


def step_ceilings(totals: dict, throughput: dict) -> dict:
    """Returns, per model of both reports, what the convolutions allow our whole step.

    `throughput` is a report of benchmarks/throughput.py (same batch size, same machine).
    With t_ours and t_torch its training step times and c_ours, c_torch the convolution times
    of `totals`: `ratio` = t_torch / t_ours (measured); `if_rest_equal` = t_torch / (t_torch -
    c_torch + c_ours), our ratio if everything but the convolutions took torch's time;
    `if_rest_free` = t_torch / c_ours, our ratio if everything but the convolutions took no
    time at all: below 1, our convolutions alone outlast torch's whole step.
    """
    out = {}
    batch = throughput["settings"]["batch_size"]
    for result in throughput["models"]:
        model, contestants = result["model"], result["contestants"]
        if model not in totals or TORCH not in contestants or TORCH not in totals[model]:
            continue
        ours = batch / contestants["jax"]["train_images_per_s"]
        ref = batch / contestants[TORCH]["train_images_per_s"]
        conv_ours, conv_ref = totals[model][XLA], totals[model][TORCH]
        out[model] = {
            "step_seconds": {XLA: ours, TORCH: ref},
            "conv_share": {XLA: conv_ours / ours, TORCH: conv_ref / ref},
            "ratio": ref / ours,
            "if_rest_equal": ref / (ref - conv_ref + conv_ours),
            "if_rest_free": ref / conv_ours,
        }
    return out


def read_step_times(path: str, batch_size: int) -> dict:
    """Reads a throughput report for `step_ceilings`; a clear UsageError if it cannot serve."""
    try:
        report = json.loads(Path(path).read_text())
        measured = report["settings"]["batch_size"]
        if not isinstance(report["models"], list):
            raise TypeError("'models' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise app.UsageError(
            f"--step_times={path}: not a report of benchmarks/throughput.py ({e})"
        ) from e
    if measured != batch_size:
        raise app.UsageError(
            f"--step_times={path} was measured at batch size {measured}, "
            f"not --batch_size={batch_size}"
        )
    return report


def format_ceilings(ceilings: dict) -> str:
    """Returns `step_ceilings` as a text table."""
    header = ["model", "step ms ours", "step ms torch", "convs share ours", "convs share torch"]
    header += ["ours/torch", "if the rest took torch's time", "if the rest took none"]
    rows = [header]
    for model, c in ceilings.items():
        rows.append(
            [
                model,
                f"{1e3 * c['step_seconds'][XLA]:.1f}",
                f"{1e3 * c['step_seconds'][TORCH]:.1f}",
                f"{100 * c['conv_share'][XLA]:.0f}%",
                f"{100 * c['conv_share'][TORCH]:.0f}%",
                f"{c['ratio']:.2f}",
                f"{c['if_rest_equal']:.2f}",
                f"{c['if_rest_free']:.2f}",
            ]
        )
    return "\n".join(_render(rows))


def format_tables(convs: Sequence[Conv], counts: dict, timings: dict, totals: dict) -> str:
    """Returns the per-convolution table and the per-model totals as text."""
    names = list(timings)
    header = ["convolution (batch NHWC -> K)", "uses"]
    for name in names:
        header += [f"{name} {p} ms" for p in PASSES]
    if TORCH in timings:
        header += [f"{XLA}/torch {p}" for p in PASSES]
    rows = [header]
    for conv in convs:
        row = [conv.key, str(counts[conv.key])]
        for name in names:
            row += [f"{1e3 * timings[name][conv.key][p]:.2f}" for p in PASSES]
        if TORCH in timings:
            # speed ratio: torch's time over ours (above 1: ours is faster)
            row += [
                f"{timings[TORCH][conv.key][p] / timings[XLA][conv.key][p]:.2f}" for p in PASSES
            ]
        rows.append(row)
    lines = _render(rows)
    lines.append("")
    header = ["model", *[f"{n} convs ms/step" for n in names]]
    if TORCH in timings:
        header += [f"{XLA}/torch", f"{YNNPACK}/torch"]
    rows = [header]
    for model, per in totals.items():
        row = [model, *[f"{1e3 * per[n]:.1f}" for n in names]]
        if TORCH in timings:
            row += [f"{per[TORCH] / per[XLA]:.2f}", f"{per[TORCH] / per[YNNPACK]:.2f}"]
        rows.append(row)
    lines += _render(rows)
    lines.append("ratios are speed ratios: the reference's time over ours (above 1: ours faster)")
    return "\n".join(lines)


def _render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def define_flags() -> None:
    """Defines the command-line flags (only when the script runs as a program)."""
    flags.DEFINE_list("models", list(DEFAULT_MODELS), "Model presets whose convolutions to time.")
    flags.DEFINE_integer("batch_size", 128, "Training batch size (both frameworks).")
    flags.DEFINE_integer("windows", 5, "Timed windows per contestant, convolution and pass.")
    flags.DEFINE_float("window_seconds", 0.5, "Target length of a window (at least one call).")
    flags.DEFINE_integer("cores", 0, "Pin every worker to the first N CPUs (0: all).")
    flags.DEFINE_enum("reference", TORCH, [TORCH, "none"], "The reference to time.")
    flags.DEFINE_string(
        "output", str(ROOT / "benchmarks" / "results" / "conv_parts.json"), "JSON results file."
    )
    flags.DEFINE_string(
        "step_times",
        None,
        "A report of benchmarks/throughput.py (same batch size and machine): also show how "
        "much of each model's whole-step ratio the convolutions allow.",
    )
    # worker mode
    flags.DEFINE_enum("serve", None, ["jax", "torch"], "Run as a worker (the coordinator's).")
    flags.DEFINE_string("convs", "[]", "Worker: the convolutions, as JSON.")
    flags.DEFINE_bool("project_flags", True, "Worker: add the project's default XLA flags.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.serve:
        protocol.restrict_cores(f.cores)
        convs = [Conv(**c) for c in json.loads(f.convs)]
        serve = serve_jax if f.serve == "jax" else serve_torch
        protocol.serve(lambda: serve(convs, f.batch_size))
        return
    require_presets(f.models)
    throughput = read_step_times(f.step_times, f.batch_size) if f.step_times else None
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    convs_of = {model: model_convs(model) for model in f.models}
    counts: dict[str, dict[str, int]] = {}
    convs: list[Conv] = []
    for model, listed in convs_of.items():
        for conv, _ in listed:
            if conv not in convs:
                convs.append(conv)
            uses_of_conv = counts.setdefault(conv.key, {})
            uses_of_conv[model] = uses_of_conv.get(model, 0) + 1
    uses = {k: " ".join(f"{m}:{n}" for m, n in v.items()) for k, v in counts.items()}
    workers = start_workers(convs, f.batch_size, f.cores, f.reference)
    try:
        timings = measure(workers, convs, f.windows, f.window_seconds)
        environments = {w.name: w.ready["environment"] for w in workers}
    finally:
        for worker in workers:
            worker.close()
    totals = {model: model_totals(listed, timings) for model, listed in convs_of.items()}
    ceilings = step_ceilings(totals, throughput) if throughput else {}
    report = {
        "settings": {
            "models": f.models,
            "batch_size": f.batch_size,
            "windows": f.windows,
            "window_seconds": f.window_seconds,
            "cores": f.cores,
            "dtype": "float32",
        },
        "environment": {
            "started": started.isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "machine_cores": len(os.sched_getaffinity(0)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "contestants": environments,
        },
        "convolutions": [
            {
                **dataclasses.asdict(conv),
                "gflop_per_pass": conv.flops(f.batch_size) / 1e9,
                "uses": counts[conv.key],
                "seconds": {n: timings[n][conv.key] for n in timings},
            }
            for conv in convs
        ],
        "models": totals,
        "step_ceilings": ceilings,
        "step_times": f.step_times,
    }
    output = Path(f.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_tables(convs, uses, timings, totals))
    if ceilings:
        print(f"\nwhole training steps from {f.step_times}:")
        print(format_ceilings(ceilings))
    print(f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"results: {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
