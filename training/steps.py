"""The jit-compiled steps: one SGD step on a global batch, and the sums of an eval batch.

Both run under jit over the 1-D 'data' mesh: batches are sharded along their first axis and
the state is replicated, so a step sees the whole global batch (see `train_step`).
"""

import concurrent.futures
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
from data import batches as batches_lib
from training import optim
from training.state import abstract_like, predict, update_ema

STEPS = ("train", "eval")


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
    metrics: loss, correct (count), nonfinite (bool).
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
    new, finite = apply_gradients(state, loss, grads, batch_stats, tx, t)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    return new, {"loss": loss, "correct": correct, "nonfinite": ~finite}


def apply_gradients(state, loss, grads, batch_stats, tx, training) -> tuple[dict, jax.Array]:
    """Returns (the state after one optimizer update with `grads` and the step's new BatchNorm
    statistics, whether the loss and every gradient are finite). With
    `training.on_nonfinite_loss == 'skip'` a non-finite step keeps the old values but advances
    the step, so data and schedule move on."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(
        state, step=state["step"] + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    if "ema" in state:
        new["ema"] = update_ema(
            state["ema"], params, batch_stats, state["step"], training.ema_decay
        )
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    if training.on_nonfinite_loss == "skip":
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, dict(state, step=new["step"]))
    return new, finite


def train_step_on_device(state, inputs, *, batch_size, batch_sharding, **step_args):
    """`train_step` on the batch of step `state['step']`, cut on the devices from the dataset
    held there (`data.batches.device_train_inputs`): the same batch the host pipeline would
    send (config.dataset.on_device)."""
    batch = batches_lib.gather_batch(inputs, state["step"], batch_size)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return train_step(state, batch, **step_args)


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


def _batch_spec(batch_size: int, image_shape, sharding, *, mask: bool) -> dict:
    spec = {
        "image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
    }
    if mask:
        spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=sharding)
    return spec


def _device_inputs_spec(batch_size: int, train: data.Split, sharding) -> dict:
    """What `data.batches.device_train_inputs` yields, as ShapeDtypeStructs (replicated)."""
    n = len(train.labels)
    used = n // batch_size * batch_size  # the epoch's order, cut to whole batches
    return {
        "images": jax.ShapeDtypeStruct(train.images.shape, jnp.uint8, sharding=sharding),
        "labels": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
        "order": jax.ShapeDtypeStruct((used,), jnp.int32, sharding=sharding),
    }


def compile_steps(
    config: ml_collections.ConfigDict,
    graphdef,
    state,
    splits: data.Splits,
    mesh,
    which: tuple[str, ...] = STEPS,
    *,
    on_device: bool = False,
) -> tuple:
    """Returns (train_step, eval_step, compile_seconds): jit-compiled once, ahead of time, for
    batches of the config's sizes laid out over `mesh`. A step left out of `which` is None.

    The train step takes (state, batch) from `data.train_batches`, or with `on_device`
    (state, inputs) from `data.batches.device_train_inputs` (the dataset held on the devices;
    the batch is cut there). Either way the state is donated: its buffers are reused in place.
    """
    replicated = NamedSharding(mesh, P())
    batched = NamedSharding(mesh, P("data"))
    mean, std = np.asarray(splits.mean, np.float32), np.asarray(splits.std, np.float32)
    t, image_shape = config.training, splits.info.image_shape
    step_args = dict(
        graphdef=graphdef, tx=optim.make_optimizer(config), config=config, mean=mean, std=std
    )
    if on_device:
        train_fn = functools.partial(
            train_step_on_device, batch_size=t.batch_size, batch_sharding=batched, **step_args
        )
        train_spec = _device_inputs_spec(t.batch_size, splits.train, replicated)
    else:
        train_fn = functools.partial(train_step, **step_args)
        train_spec = _batch_spec(t.batch_size, image_shape, batched, mask=False)
    programs = {
        "train": (
            jax.jit(
                train_fn,
                in_shardings=(replicated, replicated if on_device else batched),
                out_shardings=(replicated, replicated),
                donate_argnums=0,
            ),
            train_spec,
        ),
        "eval": (
            jax.jit(
                functools.partial(eval_step, graphdef=graphdef, config=config, mean=mean, std=std),
                in_shardings=(replicated, batched),
                out_shardings=replicated,
            ),
            _batch_spec(t.eval_batch_size, image_shape, batched, mask=True),
        ),
    }
    abstract = abstract_like(state)
    start = time.perf_counter()
    lowered = {name: programs[name][0].lower(abstract, programs[name][1]) for name in which}
    # XLA compiles each program on one thread: the two side by side save the eval step's
    # compile (ResNet-56 on 2 cores: 5.5 s instead of 6.0 s, benchmarks/README.md).
    with concurrent.futures.ThreadPoolExecutor(max(len(lowered), 1)) as pool:
        compiled = dict(
            zip(lowered, pool.map(lambda p: p.compile(), lowered.values()), strict=True)
        )
    seconds = time.perf_counter() - start
    return compiled.get("train"), compiled.get("eval"), seconds


def evaluate_split(eval_fn, state, split: data.Split, config, mesh, batches=None) -> dict:
    """Returns {'loss', 'accuracy', 'count'} over every example of `split`, each counted once.
    `batches`: the split's eval batches already on the devices (default: sent from the host,
    `data.eval_batches`)."""
    batched = NamedSharding(mesh, P("data"))
    if batches is None:
        batches = data.eval_batches(
            split, global_batch_size=config.training.eval_batch_size, sharding=batched
        )
    totals = None
    for batch in batches:
        sums = eval_fn(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "count": int(count),
    }
