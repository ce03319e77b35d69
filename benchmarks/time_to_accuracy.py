"""Time to accuracy: ResNet-20 trained on Fashion-MNIST until its test accuracy reaches 92 %,
ours and PyTorch's, in one run.

    python -m benchmarks.time_to_accuracy                     # both sides, table + JSON
    python -m benchmarks.time_to_accuracy --reference=none    # ours only
    python -m benchmarks.time_to_accuracy --config=configs/builtin.py:pooled_max --target=0.5

Each side runs in a process of its own, one after the other (never both at once on the same
cores), and prints one JSON line; `--side=jax|torch` runs one side only. Both sides train the
same network (`models.architecture` of the same config; PyTorch's is
`benchmarks.torch_reference.Network`, channels-last) from the same initial weights (ours,
copied: `reference_network`) with the same recipe, `RECIPE`: the
project's fastest for ResNet-20 on Fashion-MNIST (SGD with Nesterov momentum 0.9, L2 weight
decay on the kernels, batch 128, linear warm-up over the first epoch then cosine to zero at
`--epochs`; every step's learning rate taken from the same optax schedule) on the same data
(the 60,000 training images, normalised with the same statistics, random crop after 2-pixel
padding and horizontal flip). Every `--eval_every` steps each side measures its accuracy on the
10,000 test images (not timed) and stops at the first measurement at or above `--target`.

Times, per side: `train_seconds`, the training steps only (data included, evaluations
excluded); `end_to_end_seconds`, from the start of the set-up (reading the data, building the
model, compiling: what a user waits for) to the measurement that reached the target,
evaluations excluded. The ratio is ours / PyTorch's: below 1, ours is faster.
benchmarks/README.md records a run.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from configs import fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("jax", "torch")
# The recipe both sides train with: the ResNets' on Fashion-MNIST (configs/fashion_mnist.py).
RECIPE = {
    **fashion_mnist.RESNET_RECIPE,
    "dataset.validation_size": 0,  # the target is test accuracy: train on all 60,000 images
    "dataset.eval_split": "test",
}


def define_flags() -> None:
    flags.DEFINE_string("config", "configs/fashion_mnist.py:resnet20", "Config (file:preset).")
    flags.DEFINE_float("target", 0.92, "Test accuracy to reach.")
    flags.DEFINE_float("epochs", 5.0, "Length of the cosine schedule, in epochs.")
    flags.DEFINE_integer(
        "eval_every", 0, "Steps between test evaluations (0: a fifth of an epoch)."
    )
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_enum("reference", "torch", ["torch", "none"], "The other side, or none.")
    flags.DEFINE_enum("side", None, list(SIDES), "Run one side in this process (a worker).")
    flags.DEFINE_multi_string("set", [], "Further config overrides, KEY=VALUE (tests).")
    flags.DEFINE_string(
        "output", "benchmarks/results/time_to_accuracy.json", "Where to write the JSON results."
    )


def build_config():
    """Returns the config both sides train: `--config` with RECIPE, the schedule's length
    from `--epochs` and a one-epoch warm-up, and the `--set` overrides; and the steps per
    epoch and between evaluations."""
    import configs
    import data

    f = flags.FLAGS
    config = configs.load(f.config)
    configs.override(config, RECIPE)
    config.training.batch_size = f.batch_size
    config.training.progress = "none"
    configs.override(config, {k: _value(v) for k, v in (i.split("=", 1) for i in f.set)})
    splits = data.load(config.dataset, seed=config.seed)
    steps_per_epoch = len(splits.train) // f.batch_size  # as data.train_batches
    config.training.num_steps = max(1, round(f.epochs * steps_per_epoch))
    config.schedule.warmup_steps = min(steps_per_epoch, config.training.num_steps // 2)
    eval_every = f.eval_every or max(1, steps_per_epoch // 5)
    return config, steps_per_epoch, eval_every


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_jax(config, eval_every: int) -> dict:
    """Trains with the project's training library until the target; returns the side's record."""
    from training import runtime

    runtime.configure_jax()  # as train.py, before JAX starts its backend
    import jax

    from training import setup as setup_lib

    start = time.perf_counter()
    s = setup_lib.setup(config, distributed=False)
    set_up = time.perf_counter() - start
    batches, state = s.train_batches(), s.state

    def train(steps: int, state):
        for _ in range(steps):
            state, _ = s.train_step(state, next(batches))
        jax.block_until_ready(state)
        return state

    def accuracy(state) -> float:
        return float(s.evaluate(state, s.splits.test)["accuracy"])

    return _race(config, eval_every, train, accuracy, state, set_up, s.compile_seconds)


def run_torch(config, eval_every: int) -> dict:
    """Trains the PyTorch reference of the same network and recipe until the target."""
    import numpy as np
    import torch

    import data
    from benchmarks.torch_reference import make_eval_step, make_train_step, to_nchw
    from data.batches import epoch_permutation
    from training import optim

    if config.optimizer.name != "sgd":
        sys.exit(
            f"error: the PyTorch side trains with SGD only (benchmarks.torch_reference); "
            f"config.optimizer.name={config.optimizer.name!r}: use --reference=none"
        )
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(config.seed)
    model = reference_network(config)  # before the clock: not PyTorch's work
    start = time.perf_counter()
    splits = data.load(config.dataset, seed=config.seed)
    o = config.optimizer
    schedule = optim.make_schedule(config)  # the learning rate of every step, as optax's
    rates = np.asarray(schedule(np.arange(config.training.num_steps)), np.float64)
    train_step = make_train_step(model, float(rates[0]), o.momentum, o.weight_decay)
    eval_step = make_eval_step(model)
    mean, std = splits.mean.astype(np.float32), splits.std.astype(np.float32)
    rng = np.random.default_rng(config.seed)  # the augmentation's draws
    d = config.dataset
    batch = config.training.batch_size
    set_up = time.perf_counter() - start
    images, labels = splits.train.images, splits.train.labels
    per_epoch, step, orders = len(labels) // batch, 0, {}
    test = [
        (
            to_nchw(_normalized(splits.test.images[i : i + 500], mean, std)),
            torch.from_numpy(splits.test.labels[i : i + 500].astype(np.int64)),
        )
        for i in range(0, len(splits.test.labels), 500)
    ]

    def train(steps: int, state):
        nonlocal step
        model.train()
        for _ in range(steps):
            epoch, i = divmod(step, per_epoch)  # the batches of data.train_batches
            if epoch not in orders:
                orders.clear()
                orders[epoch] = epoch_permutation(len(labels), config.seed, epoch)
            index = orders[epoch][i * batch : (i + 1) * batch]
            x = _augmented(images[index], rng, d.augment_crop_padding, d.augment_flip)
            x = to_nchw(_normalized(x, mean, std)).contiguous(memory_format=torch.channels_last)
            train_step(x, torch.from_numpy(labels[index].astype(np.int64)), float(rates[step]))
            step += 1
        return state

    def accuracy(state) -> float:
        right = sum(int((eval_step(x).argmax(1) == y).sum()) for x, y in test)
        return right / len(splits.test.labels)

    return _race(config, eval_every, train, accuracy, None, set_up, 0.0)


def reference_network(config):
    """The PyTorch reference of `config`'s network (channels-last) holding our initial
    weights: the training library's initial state for `config.seed`, copied. Each framework's
    own initialisation draws from other distributions (PyTorch's default for a convolution
    has a 2.4x smaller standard deviation than He et al.'s, which the project uses), and with
    BatchNorm a smaller weight scale acts as a larger learning rate: before the copy,
    PyTorch's ResNet-20 crossed 92 % two quarter-epochs before ours in each of three seeds
    (benchmarks/README.md), which timed the initialisations, not the frameworks."""
    import jax
    import torch
    from flax import nnx

    import data
    import models
    from benchmarks.torch_reference import Network, copy_weights
    from training import runtime
    from training import state as state_lib

    info = data.dataset_info(config.dataset)
    specs = models.architecture(config.model, info.image_shape, info.num_classes)
    _, state = state_lib.create_train_state(config, info, runtime.make_mesh())
    model = Network(specs)
    params, stats = jax.device_get((state["params"], state["batch_stats"]))
    copy_weights(model, nnx.to_pure_dict(params), nnx.to_pure_dict(stats))
    return model.to(memory_format=torch.channels_last)


def _normalized(images, mean, std):
    return (images.astype("float32") / 255.0 - mean) / std


def _augmented(images, rng, padding: int, flip: bool):
    """Random crop after zero padding and horizontal flip, one draw per image (as
    data.augment), on uint8 images [B, H, W, C]."""
    import numpy as np

    b, h, w, _ = images.shape
    if padding:
        padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        dy, dx = rng.integers(0, 2 * padding + 1, (2, b))
        rows = dy[:, None] + np.arange(h)
        cols = dx[:, None] + np.arange(w)
        images = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        mirror = rng.random(b) < 0.5
        images = np.where(mirror[:, None, None, None], images[:, :, ::-1], images)
    return images


def _race(config, eval_every, train, accuracy, state, set_up: float, compile_seconds: float):
    """Trains in chunks of `eval_every` steps until the test accuracy reaches the target or the
    schedule ends; returns the side's record."""
    target, total = flags.FLAGS.target, config.training.num_steps
    train_seconds, step, curve, reached = 0.0, 0, [], None
    while step < total:
        chunk = min(eval_every, total - step)
        tick = time.perf_counter()
        state = train(chunk, state)
        train_seconds += time.perf_counter() - tick
        step += chunk
        acc = accuracy(state)
        curve.append({"step": step, "test_accuracy": acc, "train_seconds": train_seconds})
        print(f"step {step}/{total}: test accuracy {acc:.4f}", file=sys.stderr, flush=True)
        if acc >= target:
            reached = step
            break
    return {
        "reached": reached is not None,
        "steps": reached,
        "final_test_accuracy": curve[-1]["test_accuracy"],
        "train_seconds": train_seconds if reached else None,
        "set_up_seconds": set_up,
        "compile_seconds": compile_seconds,
        "end_to_end_seconds": set_up + train_seconds if reached else None,
        "curve": curve,
    }


def worker(side: str) -> None:
    config, _, eval_every = build_config()
    record = (run_jax if side == "jax" else run_torch)(config, eval_every)
    print(json.dumps(record))


def run_side(side: str, argv: list[str]) -> dict:
    """Runs one side in a fresh process; returns its record."""
    print(f"{side}: training...", file=sys.stderr, flush=True)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.time_to_accuracy", f"--side={side}", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"error: the {side} side failed (exit {out.returncode}); its output is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    def cell(value, fmt):
        return "not reached" if value is None else format(value, fmt)

    lines = [
        "| side | reached | steps | train s | end-to-end s | final test acc |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for side, r in results["sides"].items():
        lines.append(
            f"| {side} | {r['reached']} | {cell(r['steps'], 'd')} | "
            f"{cell(r['train_seconds'], '.1f')} | {cell(r['end_to_end_seconds'], '.1f')} | "
            f"{r['final_test_accuracy']:.4f} |"
        )
    for key, value in results.get("ratios", {}).items():
        lines.append(f"\nours / PyTorch, {key}: {value:.2f}")
    return "\n".join(lines)


def main(argv):
    f = flags.FLAGS
    if f.side:
        worker(f.side)
        return
    from training import runtime

    passed = [a for a in sys.argv[1:] if not a.startswith(("--output", "--reference"))]
    config, steps_per_epoch, eval_every = build_config()
    results = {
        "settings": {
            "config": f.config,
            "target": f.target,
            "epochs": f.epochs,
            "steps_per_epoch": steps_per_epoch,
            "eval_every": eval_every,
            "batch_size": f.batch_size,
            "recipe": RECIPE,
            "overrides": list(f.set),
        },
        "environment": {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": runtime.git_commit(),
            "cpu_count": os.cpu_count(),
            "load_average_before": os.getloadavg(),
        },
        "sides": {},
    }
    sides = ["jax"] + (["torch"] if f.reference == "torch" else [])
    for side in sides:
        results["sides"][side] = run_side(side, passed)
    results["environment"]["load_average_after"] = os.getloadavg()
    if len(sides) == 2:
        ours, theirs = results["sides"]["jax"], results["sides"]["torch"]
        results["ratios"] = {
            key: ours[key] / theirs[key]
            for key in ("train_seconds", "end_to_end_seconds")
            if ours[key] and theirs[key]
        }
    text = table(results)
    print(text)
    Path(f.output).parent.mkdir(parents=True, exist_ok=True)
    Path(f.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {f.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
