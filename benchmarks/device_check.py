"""The GPU device check: our steps against PyTorch on one accelerator, and a time to accuracy.

    bash benchmarks/device_check.sh prepare          # here: the carried wheel and Fashion-MNIST
    bash benchmarks/device_check.sh                  # on the GPU machine: at most 8 minutes
    python -m benchmarks.device_check --output=DIR [--models=...] [--batch_sizes=128,512] ...

One process, one device. First the time to accuracy: ResNet-20 (bfloat16, batch 512) trained
on Fashion-MNIST from the idx files in --data_dir until its test accuracy reaches
--target_accuracy (checked every --eval_every_epochs), or --accuracy_seconds of training and
evaluation, or --accuracy_epochs (the cosine schedule's length) pass; it reports the seconds
to the target, with and without data, init and compilation. Then, until --budget_seconds, for
every model (benchmarks/throughput.py's six families), dtype (bfloat16 compute with float32
parameters; float32) and batch size (512, then 128):

- ours: the project's real steps (`training.setup.setup`, as train.py builds them: the dataset
  held on the device, the state donated, train and eval compiled ahead of time), training
  images/s (the step cuts its batch on the device, augments it and updates the parameters) and
  eval images/s (one batch of the same size already on the device), compile time (the init
  program, and the train and eval steps), XLA's memory estimate of each program and the
  process's peak device memory so far;
- PyTorch: the reference built from the same LayerSpecs (benchmarks/torch_reference.py), on
  the same device, channels-last, `torch.autocast` for bfloat16, cuDNN's autotuner on, the
  same SGD (Nesterov momentum, weight decay on kernels); peak memory per configuration;
- ours / PyTorch per model, dtype and batch, for training and for eval.

It needs jax (with its CUDA plugin there), flax, optax, orbax-checkpoint, numpy, absl-py,
pyyaml, tqdm and ml-collections (the one the GPU machine lacks: benchmarks/device_check.sh
carries its wheel); torch is optional (--torch=auto: used when importable). It never imports
tensorflow-datasets, tensorboardX or matplotlib. A failing configuration is recorded with its
error and the check goes on; work that would overrun --budget_seconds is skipped and listed.
Results: DIR/device_check.json and DIR/device_check.md (a table), written after every
measurement, so a run stopped early still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

DEFAULT_MODELS = ("plain", "pooled_max", "allcnn_c", "resnet20", "resnet56", "wide_resnet")
ROOT = Path(__file__).resolve().parent.parent
TARGET_MINUTES = 1.0  # the aim for ResNet-20 to 94 % on Fashion-MNIST


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = DEFAULT_MODELS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batch_sizes: tuple[int, ...] = (128, 512)
    windows: int = 3
    window_seconds: float = 0.5
    image_size: int = 32
    train_examples: int = 4096
    test_examples: int = 1024
    torch: str = "auto"  # auto | on | off
    on_device: str = "auto"
    budget_seconds: float = 420.0
    accuracy: bool = True
    accuracy_model: str = "resnet20"
    accuracy_dataset: str = "fashion_mnist"  # fashion_mnist | builtin (the CPU smoke test)
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    accuracy_dtype: str = "bfloat16"
    accuracy_batch: int = 512
    accuracy_eval_batch: int = 2000
    accuracy_epochs: float = 30.0
    accuracy_seconds: float = 150.0
    accuracy_learning_rate: float = 0.2
    eval_every_epochs: float = 1.0
    target_accuracy: float = 0.94


def parse_args(argv: list[str]) -> tuple[Settings, Path]:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "device_check"))
    p.add_argument("--models", default=",".join(d.models))
    p.add_argument("--dtypes", default=",".join(d.dtypes))
    p.add_argument("--batch_sizes", default=",".join(map(str, d.batch_sizes)))
    p.add_argument("--windows", type=int, default=d.windows)
    p.add_argument("--window_seconds", type=float, default=d.window_seconds)
    p.add_argument("--image_size", type=int, default=d.image_size)
    p.add_argument("--train_examples", type=int, default=d.train_examples)
    p.add_argument("--test_examples", type=int, default=d.test_examples)
    p.add_argument("--torch", choices=("auto", "on", "off"), default=d.torch)
    p.add_argument("--on_device", choices=("auto", "on", "off"), default=d.on_device)
    p.add_argument("--budget_seconds", type=float, default=d.budget_seconds)
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=d.accuracy)
    p.add_argument("--accuracy_model", default=d.accuracy_model)
    p.add_argument(
        "--accuracy_dataset", choices=("fashion_mnist", "builtin"), default=d.accuracy_dataset
    )
    p.add_argument("--data_dir", default=d.data_dir, help="Fashion-MNIST's four idx .gz files")
    p.add_argument("--accuracy_dtype", default=d.accuracy_dtype)
    p.add_argument("--accuracy_batch", type=int, default=d.accuracy_batch)
    p.add_argument("--accuracy_eval_batch", type=int, default=d.accuracy_eval_batch)
    p.add_argument("--accuracy_epochs", type=float, default=d.accuracy_epochs)
    p.add_argument("--accuracy_seconds", type=float, default=d.accuracy_seconds)
    p.add_argument("--accuracy_learning_rate", type=float, default=d.accuracy_learning_rate)
    p.add_argument("--eval_every_epochs", type=float, default=d.eval_every_epochs)
    p.add_argument("--target_accuracy", type=float, default=d.target_accuracy)
    a = p.parse_args(argv)
    names = lambda text: tuple(x for x in text.split(",") if x)
    settings = Settings(
        models=names(a.models),
        dtypes=names(a.dtypes),
        batch_sizes=tuple(int(x) for x in names(a.batch_sizes)),
        **{
            f.name: getattr(a, f.name)
            for f in dataclasses.fields(Settings)
            if f.name not in ("models", "dtypes", "batch_sizes")
        },
    )
    for dtype in (*settings.dtypes, settings.accuracy_dtype):
        if dtype not in ("float32", "bfloat16"):
            p.error(f"dtype {dtype!r}: float32 or bfloat16")
    return settings, Path(a.output)


# --------------------------------------------------------------------------------------------
# The environment


def versions() -> dict:
    """The versions this check ran with (the GPU machine's own, not the project's pins)."""
    import importlib.metadata as md

    out = {}
    for name in (
        "jax",
        "jaxlib",
        "jax-cuda12-plugin",
        "jax-cuda13-plugin",
        "jax-cuda12-pjrt",
        "jax-cuda13-pjrt",
        "libtpu",
        "flax",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "numpy",
        "torch",
        "nvidia-cudnn-cu12",
        "nvidia-cudnn-cu13",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    out["python"] = platform.python_version()
    return out


def nvidia_smi() -> str | None:
    """nvidia-smi's one-line description of the GPUs (name, driver, memory), or None."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    try:
        done = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"
    return done.stdout.strip() or done.stderr.strip()


def environment(torch_module) -> dict:
    import jax

    from training import runtime

    device = jax.devices()[0]
    env = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": versions(),
        "jax_backend": jax.default_backend(),
        "jax_device": device.device_kind,
        "jax_device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "nvidia_smi": nvidia_smi(),
        "cpu_count": os.cpu_count(),
        "git_commit": runtime.git_commit(),
    }
    if torch_module is not None:
        t = torch_module
        cuda = t.cuda.is_available()
        env["torch"] = {
            "version": t.__version__,
            "cuda": t.version.cuda,
            "cudnn": t.backends.cudnn.version() if cuda else None,
            "device": t.cuda.get_device_name(0) if cuda else "cpu",
            "cudnn_allow_tf32": t.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": t.backends.cuda.matmul.allow_tf32,
            "threads": t.get_num_threads(),
        }
    return env


def import_torch(setting: str):
    """torch, or None when --torch=off or (auto) it is not installed."""
    if setting == "off":
        return None
    try:
        import torch
    except ImportError:
        if setting == "on":
            raise
        return None
    return torch


# --------------------------------------------------------------------------------------------
# Timing


def timed_windows(run, sync, settings: Settings) -> list[float]:
    """Seconds per call of `run` in each of settings.windows windows of about
    settings.window_seconds (calibrated on one call after a warm-up call); `sync()` waits for
    the device."""
    run()
    sync()
    start = time.perf_counter()
    run()
    sync()
    one = max(time.perf_counter() - start, 1e-6)
    calls = max(1, round(settings.window_seconds / one))
    out = []
    for _ in range(settings.windows):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        out.append((time.perf_counter() - start) / calls)
    return out


def device_memory() -> dict:
    """The JAX device's allocator statistics (bytes in use, peak), or {} (the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def program_memory(compiled) -> dict | None:
    """XLA's memory estimate of a compiled program: arguments + outputs - aliased (donated)
    + temporaries, in bytes; None when the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend or version implements it
        return None
    if m is None:
        return None
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {"total_bytes": int(total), "temp_bytes": int(m.temp_size_in_bytes)}


# --------------------------------------------------------------------------------------------
# Ours


def base_config(model: str, dtype: str, batch: int, settings: Settings):
    """configs/builtin.py's config of `model` at this dtype and batch size (train and eval),
    with SGD (Nesterov) as the PyTorch reference trains."""
    from configs import builtin

    c = builtin.get_config(model)
    c.model.dtype = dtype
    c.dataset.builtin_image_size = settings.image_size
    c.dataset.builtin_train_size = settings.train_examples
    c.dataset.builtin_test_size = settings.test_examples
    c.dataset.on_device = settings.on_device
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.weight_decay = 5e-4
    c.training.batch_size = batch
    c.training.eval_batch_size = batch
    c.training.progress = "none"
    return c


def measure_ours(model: str, dtype: str, batch: int, settings: Settings, splits) -> dict:
    import jax

    from training.setup import setup

    config = base_config(model, dtype, batch, settings)
    start = time.perf_counter()
    s = setup(config, splits=splits)
    inputs = s.train_batches(0)
    box = {"state": s.state}
    first = next(inputs)
    box["state"], metrics = s.train_step(box["state"], first)
    jax.block_until_ready(box["state"])
    first_step = time.perf_counter() - start
    eval_batch = next(s._eval_batches(s.splits.test))

    def train():
        box["state"], box["metrics"] = s.train_step(box["state"], next(inputs))

    def evaluate():
        box["sums"] = s.eval_step(box["state"], eval_batch)

    sync = lambda: jax.block_until_ready(box)
    train_s = timed_windows(train, sync, settings)
    eval_s = timed_windows(evaluate, sync, settings)
    result = {
        "train_images_per_s": batch / statistics.median(train_s),
        "eval_images_per_s": batch / statistics.median(eval_s),
        "train_step_ms": 1e3 * statistics.median(train_s),
        "eval_step_ms": 1e3 * statistics.median(eval_s),
        "train_windows_ms": [1e3 * x for x in train_s],
        "init_seconds": s.init_seconds,
        "compile_seconds": s.compile_seconds,
        "first_step_seconds": first_step,
        "on_device": s.on_device,
        "loss": float(box["metrics"]["loss"]),
        "train_program_memory": program_memory(s.train_step),
        "eval_program_memory": program_memory(s.eval_step),
        "device_memory_after": device_memory(),
    }
    return result


# --------------------------------------------------------------------------------------------
# PyTorch


def measure_torch(torch, model: str, dtype: str, batch: int, settings: Settings) -> dict:
    import numpy as np
    import torch.nn.functional as F

    import models
    from benchmarks.torch_reference import Network, count_params

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    config = base_config(model, dtype, batch, settings)
    shape = (settings.image_size, settings.image_size, 3)
    specs = models.architecture(config.model, shape, 10)
    net = Network(specs).to(device=device, memory_format=torch.channels_last)
    o = config.optimizer
    decay = [p for p in net.parameters() if p.dim() > 1]
    no_decay = [p for p in net.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay}],
        lr=o.learning_rate,
        momentum=o.momentum,
        nesterov=True,
    )
    rng = np.random.default_rng(0)

    def images(n: int):
        x = torch.from_numpy(rng.normal(size=(n, 3, *shape[:2])).astype(np.float32))
        return x.to(device).contiguous(memory_format=torch.channels_last)

    x, labels = images(batch), torch.from_numpy(rng.integers(0, 10, batch)).to(device)
    autocast = lambda: torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"
    )
    box = {}

    def train():
        net.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(net(x), labels)
        loss.backward()
        optimizer.step()
        box["loss"] = loss

    def evaluate():
        net.eval()
        with torch.inference_mode(), autocast():
            box["logits"] = net(x)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(3):  # cuDNN's autotuner tries its algorithms on the first calls
        train()
    sync()
    warm_up = time.perf_counter() - start
    train_s = timed_windows(train, sync, settings)
    eval_s = timed_windows(evaluate, sync, settings)
    result = {
        "train_images_per_s": batch / statistics.median(train_s),
        "eval_images_per_s": batch / statistics.median(eval_s),
        "train_step_ms": 1e3 * statistics.median(train_s),
        "eval_step_ms": 1e3 * statistics.median(eval_s),
        "train_windows_ms": [1e3 * x for x in train_s],
        "warm_up_seconds": warm_up,
        "params": count_params(net),
        "loss": float(box["loss"].detach()),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
    }
    return result


# --------------------------------------------------------------------------------------------
# Time to accuracy


def accuracy_config(settings: Settings):
    """The time-to-accuracy run's config: --accuracy_model on Fashion-MNIST (the whole training
    split, evaluated on the test split) or, for the smoke test, the built-in data."""
    from configs import base

    c = base.get_config(settings.accuracy_model)
    if settings.accuracy_dataset == "fashion_mnist":
        c.dataset.name, c.dataset.source = "fashion_mnist", "files"
        c.dataset.data_dir = settings.data_dir
        c.dataset.augment_crop_padding = 2
        train_size = 60_000
    else:
        c.dataset.builtin_image_size = settings.image_size
        c.dataset.builtin_train_size = settings.train_examples
        c.dataset.builtin_test_size = settings.test_examples
        train_size = settings.train_examples
    c.dataset.augment_flip = True
    c.dataset.validation_size = 0
    c.dataset.eval_split = "test"
    c.dataset.on_device = settings.on_device
    c.model.dtype = settings.accuracy_dtype
    # SGD with Nesterov momentum, linear warm-up over the first epoch, then cosine to zero
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = settings.accuracy_learning_rate
    c.optimizer.weight_decay = 5e-4
    c.training.batch_size = settings.accuracy_batch
    c.training.eval_batch_size = settings.accuracy_eval_batch
    steps_per_epoch = max(1, train_size // settings.accuracy_batch)
    c.training.num_steps = max(2, round(settings.accuracy_epochs * steps_per_epoch))
    c.training.eval_every_steps = max(1, round(settings.eval_every_epochs * steps_per_epoch))
    c.training.progress = "none"
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = min(steps_per_epoch, c.training.num_steps // 2)
    return c, steps_per_epoch


def time_to_accuracy(settings: Settings) -> dict:
    """Trains until the test accuracy reaches the target (or a cap); returns the times."""
    import jax

    from training.setup import setup

    config, steps_per_epoch = accuracy_config(settings)
    t = config.training
    start = time.perf_counter()
    s = setup(config)
    ready = time.perf_counter()
    inputs, state = s.train_batches(0), s.state
    curve, reached, step = [], None, 0
    train_seconds = 0.0
    tick = time.perf_counter()
    while step < t.num_steps:
        state, _ = s.train_step(state, next(inputs))
        step += 1
        if step % t.eval_every_steps and step != t.num_steps:
            continue
        jax.block_until_ready(state)
        train_seconds += time.perf_counter() - tick
        result = s.evaluate(state, s.splits.test)
        elapsed = time.perf_counter() - ready
        curve.append(
            {
                "step": step,
                "epoch": step / steps_per_epoch,
                "test_accuracy": result["accuracy"],
                "seconds": elapsed,
            }
        )
        if result["accuracy"] >= settings.target_accuracy:
            reached = curve[-1]
            break
        if elapsed > settings.accuracy_seconds:
            break
        tick = time.perf_counter()
    return {
        "model": settings.accuracy_model,
        "dataset": settings.accuracy_dataset,
        "dtype": settings.accuracy_dtype,
        "batch_size": t.batch_size,
        "eval_batch_size": t.eval_batch_size,
        "learning_rate": config.optimizer.learning_rate,
        "schedule_epochs": settings.accuracy_epochs,
        "target_accuracy": settings.target_accuracy,
        "reached": reached is not None,
        # from the first step (compiled, data on the device) to the evaluation that reached it
        "seconds_to_target": reached["seconds"] if reached else None,
        "seconds_to_target_with_setup": (reached["seconds"] + ready - start) if reached else None,
        "setup_seconds": ready - start,
        "compile_seconds": s.compile_seconds + s.init_seconds,
        "train_seconds": train_seconds,
        "epochs": step / steps_per_epoch,
        "best_test_accuracy": max(c["test_accuracy"] for c in curve),
        "on_device": s.on_device,
        "curve": curve,
    }


# --------------------------------------------------------------------------------------------
# The report


def ratios(entry: dict) -> None:
    """Adds ours / torch for training and eval to a result entry that holds both."""
    ours, theirs = entry.get("ours"), entry.get("torch")
    if isinstance(ours, dict) and isinstance(theirs, dict) and "error" not in ours | theirs:
        for kind in ("train", "eval"):
            entry[f"ours_over_torch_{kind}"] = (
                ours[f"{kind}_images_per_s"] / theirs[f"{kind}_images_per_s"]
            )


def format_table(report: dict) -> str:
    """The results as a Markdown table (one row per model, dtype and batch) and summary lines."""
    env = report["environment"]
    v = env["versions"]
    torch_line = ""
    if "torch" in env:
        torch_line = f"; torch CUDA {env['torch']['cuda']}, cuDNN {env['torch']['cudnn']}"
    lines = [
        f"# Device check ({env['started']})",
        "",
        f"Device: {env['jax_device']} ({env['jax_backend']}); nvidia-smi: {env['nvidia_smi']}",
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + torch_line,
        "",
        "| model | dtype | batch | train img/s | torch train | ours/torch | eval img/s | "
        "torch eval | ours/torch eval | compile s | XLA train MiB | torch MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mib = lambda b: f"{b / 2**20:.0f}" if b else "-"
    for e in report["throughput"]:
        ours, theirs = e.get("ours") or {}, e.get("torch") or {}
        if "error" in ours or "skipped" in e:
            why = ours.get("error", "").splitlines()[-1:] or [e.get("skipped", "")]
            lines.append(f"| {e['model']} | {e['dtype']} | {e['batch_size']} | {why[0][:80]} |")
            continue
        t_ok = theirs and "error" not in theirs
        memory = (ours.get("train_program_memory") or {}).get("total_bytes")
        lines.append(
            "| "
            + " | ".join(
                [
                    e["model"],
                    e["dtype"],
                    str(e["batch_size"]),
                    f"{ours['train_images_per_s']:.0f}",
                    f"{theirs['train_images_per_s']:.0f}" if t_ok else "-",
                    f"{e['ours_over_torch_train']:.2f}" if "ours_over_torch_train" in e else "-",
                    f"{ours['eval_images_per_s']:.0f}",
                    f"{theirs['eval_images_per_s']:.0f}" if t_ok else "-",
                    f"{e['ours_over_torch_eval']:.2f}" if "ours_over_torch_eval" in e else "-",
                    f"{ours['init_seconds'] + ours['compile_seconds']:.1f}",
                    mib(memory),
                    mib(theirs.get("peak_memory_bytes")) if t_ok else "-",
                ]
            )
            + " |"
        )
    peak = report.get("device_peak_bytes")
    if peak:
        lines.append(f"\nPeak device memory of the JAX process: {peak / 2**30:.2f} GiB")
    if report.get("accuracy"):
        lines.append("\n" + _accuracy_line(report["accuracy"]))
    if report.get("skipped"):
        lines.append(f"\nSkipped (over --budget_seconds): {', '.join(report['skipped'])}")
    lines.append(f"\nWall time of the check: {report.get('wall_seconds', 0):.0f} s")
    return "\n".join(lines) + "\n"


def _accuracy_line(a: dict) -> str:
    if "error" in a:
        return f"time to accuracy failed: {a['error'].strip().splitlines()[-1]}"
    head = f"{a['model']} on {a['dataset']} ({a['dtype']}, batch {a['batch_size']}): "
    if a["reached"]:
        return head + (
            f"{100 * a['target_accuracy']:.1f} % test accuracy after "
            f"{a['seconds_to_target']:.1f} s of training and evaluation "
            f"({a['seconds_to_target_with_setup']:.1f} s with data, init and compile), "
            f"epoch {a['curve'][-1]['epoch']:.1f}"
        )
    return head + (
        f"did not reach {100 * a['target_accuracy']:.1f} % (best "
        f"{100 * a['best_test_accuracy']:.2f} % after {a['epochs']:.1f} epochs, "
        f"{a['curve'][-1]['seconds']:.1f} s)"
    )


def write(report: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "device_check.md").write_text(format_table(report))


def _error() -> dict:
    return {"error": traceback.format_exc(limit=8)}


def run(settings: Settings, output: Path) -> dict:
    """Runs the check; returns the report (also written to `output`)."""
    begin = time.perf_counter()
    # Before JAX starts: the project's flags; no preallocation (JAX and torch share the device,
    # and the peak memory figures mean what the programs used); compile times from scratch.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
    from training import runtime

    # the project's XLA flags are for the CPU backend; with a GPU they do nothing, and a newer
    # jaxlib than the pinned one (the GPU machine's) may no longer know them
    runtime.configure_jax(project_flags=not runtime.visible_gpu())
    torch = import_torch(settings.torch)
    import data

    report = {
        "settings": dataclasses.asdict(settings),
        "environment": environment(torch),
        "throughput": [],
        "skipped": [],
    }
    print(f"device check on {report['environment']['jax_device']}", file=sys.stderr, flush=True)
    # The time to accuracy first (the headline target); then the throughput table for
    # the rest of the budget, the larger batch and bfloat16 first.
    if settings.accuracy:
        try:
            report["accuracy"] = time_to_accuracy(settings)
        except Exception:
            report["accuracy"] = _error()
        gc.collect()
        report["wall_seconds"] = time.perf_counter() - begin
        write(report, output)
        print(f"time to accuracy: {_accuracy_line(report['accuracy'])}", file=sys.stderr)
    deadline = begin + settings.budget_seconds
    config = base_config(settings.models[0], "float32", settings.batch_sizes[0], settings)
    splits = data.load(config.dataset, seed=config.seed)
    for batch in sorted(settings.batch_sizes, reverse=True):
        for dtype in sorted(settings.dtypes):
            for model in settings.models:
                entry = {"model": model, "dtype": dtype, "batch_size": batch}
                name = f"{model}/{dtype}/{batch}"
                if time.perf_counter() > deadline:
                    entry["skipped"] = "over --budget_seconds"
                    report["skipped"].append(name)
                    report["throughput"].append(entry)
                    continue
                try:
                    entry["ours"] = measure_ours(model, dtype, batch, settings, splits)
                except Exception:
                    entry["ours"] = _error()
                if torch is not None:
                    try:
                        entry["torch"] = measure_torch(torch, model, dtype, batch, settings)
                    except Exception:
                        entry["torch"] = _error()
                gc.collect()  # the configuration's device buffers go before the next one
                if torch is not None and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                ratios(entry)
                report["throughput"].append(entry)
                report["device_peak_bytes"] = device_memory().get("peak_bytes_in_use")
                report["wall_seconds"] = time.perf_counter() - begin
                write(report, output)
                print(f"{name}: {_summary(entry)}", file=sys.stderr, flush=True)
    report["device_peak_bytes"] = device_memory().get("peak_bytes_in_use")
    report["wall_seconds"] = time.perf_counter() - begin
    write(report, output)
    return report


def _summary(entry: dict) -> str:
    parts = []
    for who in ("ours", "torch"):
        r = entry.get(who)
        if r is None:
            continue
        if "error" in r:
            parts.append(f"{who} failed: {r['error'].strip().splitlines()[-1]}")
        else:
            parts.append(f"{who} {r['train_images_per_s']:.0f}/{r['eval_images_per_s']:.0f} img/s")
    if "ours_over_torch_train" in entry:
        parts.append(f"ratio {entry['ours_over_torch_train']:.2f}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    settings, output = parse_args(sys.argv[1:] if argv is None else argv)
    report = run(settings, output)
    print(format_table(report))
    print(f"results: {output / 'device_check.json'}")
    failed = [
        f"{e['model']}/{e['dtype']}/{e['batch_size']}"
        for e in report["throughput"]
        if "error" in (e.get("ours") or {})
    ]
    if failed or "error" in (report.get("accuracy") or {}):
        print(f"failed: {', '.join(failed) or 'time to accuracy'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
