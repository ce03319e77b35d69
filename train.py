"""Trains a model from a config and writes everything to a workdir.

    python train.py --config=configs/builtin.py:resnet20 --workdir=runs/resnet20

Rerunning the same command resumes from the workdir's latest checkpoint. Data flows one way:
config -> dataset -> model -> train state -> jit-compiled step -> loop -> workdir.
"""

from training import runtime

runtime.configure_jax()  # before JAX starts its backend

import concurrent.futures  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
from configs import schema  # noqa: E402
from errors import UserError  # noqa: E402
from models import summary as model_summary  # noqa: E402
from training import checkpoint as ckpt_lib  # noqa: E402
from training import metrics as metrics_lib  # noqa: E402
from training import optim  # noqa: E402

# Fields that may change when resuming a run; any other difference is refused.
RESUMABLE_CHANGES = ("training.progress", "distributed.")


class Diverged(UserError):
    """The loss became NaN or Inf and the config says to stop."""


# --------------------------------------------------------------------------------------------
# State


# The initialisation program (a random draw per parameter) runs once, in milliseconds, but
# compiling it with LLVM's optimisations took 6.0 s for ResNet-56 on a 2-core CPU; without
# them 2.3 s (benchmarks/README.md). Initial values can differ from an optimised build's in the
# last bit; they are the same from run to run and on every host.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _init_program(config: ml_collections.ConfigDict, info, mesh):
    """Returns (init, structure): `init` is the jit-wrapped program that builds the train state;
    tracing it records the model's graphdef (static structure) in structure['graphdef']."""
    tx = optim.make_optimizer(config)
    structure = {}

    def init():
        model = models.create_model(
            config.model, info.image_shape, info.num_classes, rngs=nnx.Rngs(config.seed)
        )
        graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        structure["graphdef"] = graphdef
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": batch_stats,
            "other": other,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed)),
        }

    return jax.jit(init, out_shardings=NamedSharding(mesh, P())), structure


def create_train_state(config: ml_collections.ConfigDict, info, mesh):
    """Returns (graphdef, state): the model's static structure and its replicated arrays.

    `state` is a dict pytree {step, params, batch_stats, other, opt_state, rng} laid out on
    every device of `mesh` (replicated: data parallelism). It is built inside jit so that a
    multi-host run creates it on all hosts without transfers; the model is traced once.
    """
    init, structure = _init_program(config, info, mesh)
    state = init.lower().compile(compiler_options=INIT_COMPILER_OPTIONS)()
    return structure["graphdef"], state


def abstract_train_state(config: ml_collections.ConfigDict, info, mesh):
    """Returns (graphdef, abstract state): create_train_state's structure, as ShapeDtypeStructs
    with its shardings, without compiling or computing anything (e.g. a restore target)."""
    init, structure = _init_program(config, info, mesh)
    abstract = jax.eval_shape(init)  # carries init's out_shardings: replicated over `mesh`
    return structure["graphdef"], abstract


def merge_model(graphdef, state) -> nnx.Module:
    """Returns the model whose arrays are those of `state` (params, batch_stats, other)."""
    return nnx.merge(graphdef, state["params"], state["batch_stats"], state["other"])


def predict(state, images: jax.Array, *, graphdef, config, mean, std) -> jax.Array:
    """Returns the float32 logits [B, classes] of uint8 images [B, H, W, C] in eval mode."""
    x = data.normalize(images, mean, std, jnp.dtype(config.model.dtype))
    return merge_model(graphdef, state)(x, train=False)


# --------------------------------------------------------------------------------------------
# Steps


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Returns the per-example softmax cross-entropy [B] with optional label smoothing."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing > 0:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state, batch, *, graphdef, tx, config, mean, std):
    """One SGD step on a global batch; returns (new_state, metrics).

    Runs under jit over the mesh: the batch is sharded along its first axis and the state is
    replicated, so the mean loss is over the global batch, its gradient is averaged across
    devices, and BatchNorm sees the statistics of the whole global batch (synchronised BN).
    metrics: loss, correct (count), nonfinite (bool), skipped (int: updates skipped).
    """
    d, t = config.dataset, config.training
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    aug_key, dropout_key = jax.random.split(key)
    images = data.augment(
        aug_key, batch["image"], crop_padding=d.augment_crop_padding, flip=d.augment_flip
    )
    x = data.normalize(images, mean, std, jnp.dtype(config.model.dtype))

    def loss_fn(params):
        # copy: the BatchStat variables are updated inside this grad trace, not the outer one
        model = nnx.merge(graphdef, params, state["batch_stats"], state["other"], copy=True)
        logits = model(x, train=True, rngs=nnx.Rngs(dropout=dropout_key))
        loss = cross_entropy(logits, batch["label"], t.label_smoothing).mean()
        return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"]
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(
        state, step=state["step"] + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    if t.on_nonfinite_loss == "skip":
        # Keep the old values, but advance the step so data and schedule move on.
        kept = jax.tree.map(
            lambda a, b: jnp.where(finite, a, b), new, dict(state, step=new["step"])
        )
        new = kept
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    return new, {"loss": loss, "correct": correct, "nonfinite": ~finite}


def eval_step(state, batch, *, graphdef, config, mean, std):
    """Returns sums over the real (mask == 1) examples of a batch: loss, correct, count."""
    logits = predict(state, batch["image"], graphdef=graphdef, config=config, mean=mean, std=std)
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss": jnp.sum(loss * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def compile_steps(config, graphdef, state, splits, mesh):
    """Returns (train_step, eval_step, compile_seconds): jit-compiled once, ahead of time."""
    replicated = NamedSharding(mesh, P())
    batched = NamedSharding(mesh, P("data"))
    tx = optim.make_optimizer(config)
    mean, std = np.asarray(splits.mean, np.float32), np.asarray(splits.std, np.float32)
    train = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, config=config, mean=mean, std=std),
        in_shardings=(replicated, batched),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, config=config, mean=mean, std=std),
        in_shardings=(replicated, batched),
        out_shardings=replicated,
    )
    h, w, c = splits.info.image_shape
    t = config.training
    train_spec = {
        "image": jax.ShapeDtypeStruct((t.batch_size, h, w, c), jnp.uint8, sharding=batched),
        "label": jax.ShapeDtypeStruct((t.batch_size,), jnp.int32, sharding=batched),
    }
    eval_spec = dict(
        train_spec, mask=jax.ShapeDtypeStruct((t.eval_batch_size,), jnp.float32, sharding=batched)
    )
    eval_spec["image"] = jax.ShapeDtypeStruct(
        (t.eval_batch_size, h, w, c), jnp.uint8, sharding=batched
    )
    eval_spec["label"] = jax.ShapeDtypeStruct((t.eval_batch_size,), jnp.int32, sharding=batched)
    abstract = ckpt_lib.abstract_like(state)
    start = time.perf_counter()
    lowered = (train.lower(abstract, train_spec), evaluate.lower(abstract, eval_spec))
    # XLA compiles each program on one thread: the two side by side save the eval step's
    # compile (ResNet-56 on 2 cores: 5.5 s instead of 6.0 s, benchmarks/README.md).
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
        train, evaluate = pool.map(lambda program: program.compile(), lowered)
    return train, evaluate, time.perf_counter() - start


def evaluate_split(eval_fn, state, split, config, mesh) -> dict:
    """Returns {'loss', 'accuracy', 'count'} over every example of `split`, each counted once."""
    batched = NamedSharding(mesh, P("data"))
    totals = None
    for batch in data.eval_batches(
        split, global_batch_size=config.training.eval_batch_size, sharding=batched
    ):
        sums = eval_fn(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "count": int(count),
    }


# --------------------------------------------------------------------------------------------
# Workdir


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Creates `workdir`, or checks that the config saved there matches `config` for a resume.

    Raises UserError when the workdir is not writable or holds a run of another config.
    """
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir."
        ) from e
    saved = workdir / "config.json"
    if saved.exists():
        differences = config_differences(
            json.loads(saved.read_text()), json.loads(config.to_json())
        )
        differences = [d for d in differences if not d.startswith(RESUMABLE_CHANGES)]
        if differences:
            raise UserError(
                f"workdir {workdir} holds a run of a different config; differing fields: "
                + "; ".join(differences)
                + ". Use a new --workdir, or rerun with the saved config to resume."
            )
    return workdir


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Returns 'field: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def write_run_files(workdir: Path, config, specs) -> None:
    """Writes config.json, the architecture summary (txt and json) and environment.json."""
    (workdir / "config.json").write_text(config.to_json(indent=2))
    (workdir / "summary.txt").write_text(model_summary.format_table(specs) + "\n")
    (workdir / "summary.json").write_text(json.dumps(model_summary.to_json(specs), indent=2))
    (workdir / "environment.json").write_text(json.dumps(runtime.environment(), indent=2))


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can save a checkpoint and exit."""

    def __init__(self):
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains and evaluates the configured model; returns the results also written to results.json.

    Resumes from the latest checkpoint in `workdir` when there is one.
    """
    runtime.maybe_initialize_distributed(config.distributed)
    info, specs = schema.validate(config)
    t = config.training
    for field in ("batch_size", "eval_batch_size"):
        if t[field] % jax.device_count():
            raise UserError(
                f"config.training.{field}={t[field]} is not divisible by the {jax.device_count()} "
                f"devices; use a multiple of {jax.device_count()}."
            )
    chief = jax.process_index() == 0
    workdir = prepare_workdir(config, workdir)
    mesh = runtime.make_mesh()
    splits = data.load(
        config.dataset,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if chief:
        write_run_files(workdir, config, specs)

    checkpoints = ckpt_lib.Checkpoints(workdir, keep=t.keep_checkpoints)
    start_step, meta = 0, {}
    if checkpoints.latest_step() is not None:  # restore: no initial state to compute
        graphdef, abstract = abstract_train_state(config, info, mesh)
        start_step, state, meta = checkpoints.restore(abstract)
        logging.info("resuming from the checkpoint of step %d", start_step)
    else:
        graphdef, state = create_train_state(config, info, mesh)
    writer = metrics_lib.MetricsWriter(workdir, enabled=chief)
    writer.truncate_after(start_step)

    train_fn, eval_fn, compile_seconds = compile_steps(config, graphdef, state, splits, mesh)
    logging.info("compiled the train and eval steps in %.1f s", compile_seconds)
    eval_split = splits.validation if config.dataset.eval_split == "validation" else splits.test
    batches = data.train_batches(
        splits.train,
        global_batch_size=t.batch_size,
        seed=config.seed,
        start_step=start_step,
        sharding=NamedSharding(mesh, P("data")),
    )
    schedule = optim.make_schedule(config)
    progress = metrics_lib.Progress(t.num_steps, start_step, mode=t.progress, enabled=chief)
    preemption = _Preemption()
    pending: list[tuple[int, dict]] = []
    # The loop's bookkeeping travels in each checkpoint, so a resumed run reports the same totals.
    rates = meta.get("rates", [])
    best = meta.get("best", {"accuracy": -1.0, "step": None})
    skipped = meta.get("skipped_updates", 0)
    train_seconds = meta.get("train_seconds", 0.0)
    last_saved = start_step
    tick, tick_step = time.perf_counter(), start_step

    def flush(step: int) -> dict:
        """Reads the pending step metrics (a host sync) and stops on a non-finite loss."""
        nonlocal pending, skipped, tick, tick_step, train_seconds
        values = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        pending = []
        for s, v in zip(steps, values, strict=True):
            if v["nonfinite"]:
                if t.on_nonfinite_loss == "stop":
                    raise Diverged(
                        f"the loss became {v['loss']} at step {s}; training stopped. The last "
                        f"good checkpoint is step {last_saved} in {workdir / 'checkpoints'}. "
                        "Lower optimizer.learning_rate, add schedule.warmup_steps or "
                        "optimizer.grad_clip_norm, or set training.on_nonfinite_loss=skip."
                    )
                skipped += 1
        now = time.perf_counter()
        train_seconds += now - tick
        rate = (step - tick_step) * t.batch_size / max(now - tick, 1e-9)
        tick, tick_step = now, step
        good = [v for v in values if not v["nonfinite"]] or values
        record = {
            "step": step,
            "epoch": step * t.batch_size / len(splits.train.labels),
            "split": "train",
            "loss": float(np.mean([v["loss"] for v in good])),
            "accuracy": float(np.sum([v["correct"] for v in good])) / (len(good) * t.batch_size),
            "learning_rate": float(schedule(step - 1)),
            "images_per_s": rate,
            "wall_time": time.time(),
            "skipped_updates": skipped,
        }
        return record

    step, final_eval = start_step, None
    try:
        while step < t.num_steps:
            batch = next(batches)
            state, step_metrics = train_fn(state, batch)
            step += 1
            pending.append((step, step_metrics))
            last = step == t.num_steps
            if (
                step % t.log_every_steps == 0
                or last
                or step % t.checkpoint_every_steps == 0
                or preemption.requested
            ):
                record = flush(step)
                rates.append(record["images_per_s"])
                writer.write(record)
                progress.update(step, loss=record["loss"], accuracy=record["accuracy"])
            is_best = False
            if step % t.eval_every_steps == 0 or last:
                result = final_eval = evaluate_split(eval_fn, state, eval_split, config, mesh)
                writer.write(
                    {
                        "step": step,
                        "split": config.dataset.eval_split,
                        **result,
                        "wall_time": time.time(),
                    }
                )
                is_best = result["accuracy"] > best["accuracy"]
                if is_best:
                    best = {"accuracy": result["accuracy"], "loss": result["loss"], "step": step}
                tick = time.perf_counter()  # evaluation time is not training time
            if step % t.checkpoint_every_steps == 0 or last or preemption.requested or is_best:
                meta = {
                    "rates": rates,
                    "best": best,
                    "skipped_updates": skipped,
                    "train_seconds": train_seconds,
                }
                checkpoints.save(step, state, meta, best=is_best)
                last_saved = step
            if preemption.requested and not last:
                raise Preempted(step)
    except BaseException:
        # Whatever stops the loop, checkpoints already started must reach the disk.
        try:
            checkpoints.close()
        except Exception as e:  # the original error matters more
            logging.error("while closing checkpoints: %s", e)
        writer.close()
        progress.close()
        raise
    finally:
        preemption.restore()

    checkpoints.wait()
    if final_eval is None:  # killed after the last checkpoint, before results.json
        final_eval = evaluate_split(eval_fn, state, eval_split, config, mesh)
    final_test = evaluate_split(eval_fn, state, splits.test, config, mesh)
    _, best_state, _ = checkpoints.restore(ckpt_lib.abstract_like(state), "best")
    best_test = evaluate_split(eval_fn, best_state, splits.test, config, mesh)
    checkpoints.close()
    progress.close()
    summary = model_summary.to_json(specs)
    results = {
        "model": config.model.name,
        "dataset": config.dataset.name,
        "seed": config.seed,
        "steps": step,
        "eval_split": config.dataset.eval_split,
        "final": {config.dataset.eval_split: final_eval, "test": final_test},
        "best": {
            "step": best["step"],
            config.dataset.eval_split: {k: best[k] for k in ("accuracy", "loss")},
            "test": best_test,
        },
        "test_accuracy": final_test["accuracy"],
        "params": summary["total_params"],
        "flops_per_image": summary["total_flops"],
        "train_seconds": train_seconds,
        "images_per_s": statistics.median(rates) if rates else None,
        "compile_seconds": compile_seconds,
        "skipped_updates": skipped,
    }
    writer.write({"step": step, "split": "test", **final_test, "wall_time": time.time()})
    writer.close()
    if chief:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


class Preempted(Exception):
    def __init__(self, step):
        super().__init__(
            f"stopped by SIGTERM after saving the checkpoint of step {step}; "
            "rerun the same command to resume"
        )
        self.step = step


def define_flags() -> None:
    """Defines the command-line flags; only when train.py runs as a program, so that importing
    it as a library (eval, experiments, tests) defines none."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/builtin.py:resnet20."
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")


def main(argv):
    runtime.quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None or not flags.FLAGS.workdir:
        raise app.UsageError("both --config and --workdir are required")
    try:
        results = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except Preempted as e:
        logging.warning("%s", e)
        sys.exit(143)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: results[k] for k in ("model", "test_accuracy", "params", "images_per_s")}))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=schema.parse_flags)
