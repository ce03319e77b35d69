"""Batches on the devices: global jax.Arrays sharded along the batch axis.

The host side stays cheap (numpy fancy-indexing of uint8 rows and one transfer per batch);
augmentation and normalisation run on the devices (`data.augment`). Each process builds only
the rows of a global batch that its own devices hold.
"""

from collections.abc import Iterator

import jax
import numpy as np

from data import loading
from errors import UserError

Batch = dict[str, jax.Array]


def _batch_axis_size(sharding: jax.sharding.NamedSharding) -> int:
    """Returns how many shards the first (batch) axis is split into by `sharding`."""
    spec = sharding.spec
    axes = spec[0] if len(spec) else None
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([sharding.mesh.shape[name] for name in names]))


def _check_batch_size(global_batch_size: int, sharding: jax.sharding.NamedSharding) -> None:
    shards = _batch_axis_size(sharding)
    if global_batch_size <= 0 or global_batch_size % shards:
        raise UserError(
            f"global batch size {global_batch_size} is not a positive multiple of the {shards} "
            f"devices it is split across: use a multiple of {shards} (global batch = per-device "
            "batch x devices, e.g. config.training.batch_size / eval_batch_size)."
        )


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> np.ndarray:
    """Returns the rows of a global batch that this process's devices hold, in order.

    This is the layout `jax.make_array_from_process_local_data` expects of the local data:
    the process's device slices, sorted and concatenated (replicas counted once).
    """
    slices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    bounds = sorted({s[0].indices(global_batch_size)[:2] for s in slices})
    return np.concatenate([np.arange(start, stop) for start, stop in bounds])


def _put(local: dict[str, np.ndarray], sharding, global_batch_size: int) -> Batch:
    """Places a process's rows of a batch on the devices as global arrays."""
    if sharding.is_fully_addressable:  # one process: a single transfer of the whole batch
        return jax.device_put(local, sharding)
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value, (global_batch_size, *value.shape[1:])
        )
        for key, value in local.items()
    }


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Returns the order of the training examples in `epoch`: a pure function of its arguments."""
    return loading.rng(seed, loading.SHUFFLE_STREAM, epoch).permutation(num_examples)


def train_batches(
    split: loading.Split,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    sharding: jax.sharding.NamedSharding,
) -> Iterator[Batch]:
    """Yields training batches forever, from step `start_step` on.

    Each batch is {'image': uint8 [B, H, W, C], 'label': int32 [B]}, global arrays laid out with
    `sharding` (B = global_batch_size, split along the batch axis). The batch of step s is a
    pure function of (seed, s): step s of epoch e = s // (N // B) takes the next B examples of
    `epoch_permutation(N, seed, e)`. The last N % B examples of each permutation are dropped
    (every batch has the same shape, so one compiled step serves all); the next epoch
    reshuffles, so every example is used about equally often. Resuming at `start_step` yields
    exactly the batches an uninterrupted run would have.
    Raises UserError when B does not divide across the devices or exceeds the split.
    """
    _check_batch_size(global_batch_size, sharding)
    n = len(split.labels)
    if n < global_batch_size:
        raise UserError(
            f"the training split has {n} images, fewer than one batch of {global_batch_size}: "
            "lower config.training.batch_size (or dataset.validation_size)."
        )
    steps_per_epoch = n // global_batch_size
    rows = process_rows(sharding, global_batch_size)
    order_epoch, order = -1, None
    step = start_step
    while True:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_permutation(n, seed, epoch)
        batch = order[index * global_batch_size : (index + 1) * global_batch_size][rows]
        yield _put(
            {"image": split.images[batch], "label": split.labels[batch]},
            sharding,
            global_batch_size,
        )
        step += 1


def eval_batches(
    split: loading.Split, *, global_batch_size: int, sharding: jax.sharding.NamedSharding
) -> Iterator[Batch]:
    """Yields one pass over `split` in order, ceil(N / B) batches of B = global_batch_size.

    Each batch is {'image': uint8 [B, H, W, C], 'label': int32 [B], 'mask': float32 [B]} laid
    out with `sharding`; the last batch is padded with zero images (mask 0, label 0), so
    weighting by 'mask' counts every example exactly once.
    """
    _check_batch_size(global_batch_size, sharding)
    n = len(split.labels)
    rows = process_rows(sharding, global_batch_size)
    for start in range(0, n, global_batch_size):
        index = start + rows
        real = index < n
        index = np.where(real, index, 0)
        images, labels = split.images[index], split.labels[index]
        images[~real] = 0
        labels[~real] = 0
        yield _put(
            {"image": images, "label": labels, "mask": real.astype(np.float32)},
            sharding,
            global_batch_size,
        )


# --------------------------------------------------------------------------------------------
# The dataset held on the devices (config.dataset.on_device): no per-step host transfer.


def put_replicated(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Places a host array whole on every device of `sharding` (replicated; every process
    passes the same value, as every process holds the whole dataset)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def device_dataset(split: loading.Split, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Returns {'images': uint8 [N, H, W, C], 'labels': int32 [N]} of `split`, replicated on
    the devices of `sharding` (one transfer, at the start of a run)."""
    return {
        "images": put_replicated(np.ascontiguousarray(split.images), sharding),
        "labels": put_replicated(np.asarray(split.labels, np.int32), sharding),
    }


def device_train_inputs(
    dataset: dict[str, jax.Array],
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    sharding: jax.sharding.Sharding,
) -> Iterator[dict[str, jax.Array]]:
    """Yields the training inputs of each step from `start_step` on, forever: `dataset`
    (`device_dataset`) with 'order', the epoch's order of the examples (int32 [S * B], S =
    N // B steps per epoch, B = global_batch_size), replicated with `sharding`.

    The order is `epoch_permutation(N, seed, epoch)`, the host pipeline's, cut to S * B: it is
    sent to the devices once per epoch (N * 4 bytes), and the batch of step s is cut from it
    on the devices by `gather_batch(inputs, s, B)`, inside the compiled step. So the batch of
    every (seed, step) is the one `train_batches` yields, and a resumed run sees the same data.
    Between epoch boundaries the same dict is yielded again: nothing moves.
    """
    n = int(dataset["labels"].shape[0])
    if n < global_batch_size:
        raise UserError(
            f"the training split has {n} images, fewer than one batch of {global_batch_size}: "
            "lower config.training.batch_size (or dataset.validation_size)."
        )
    steps_per_epoch = n // global_batch_size
    used = steps_per_epoch * global_batch_size
    step, order_epoch, inputs = start_step, -1, None
    while True:
        epoch = step // steps_per_epoch
        if epoch != order_epoch:
            order = epoch_permutation(n, seed, epoch)[:used].astype(np.int32)
            order_epoch, inputs = epoch, {**dataset, "order": put_replicated(order, sharding)}
        yield inputs
        step += 1


def gather_batch(inputs: dict[str, jax.Array], step: jax.Array, global_batch_size: int) -> Batch:
    """The training batch of `step` from `device_train_inputs`' inputs, on the devices (call it
    inside jit): {'image': uint8 [B, ...], 'label': int32 [B]}, rows step % S of the epoch's
    order (S = steps per epoch), as `train_batches` cuts them on the host."""
    import jax.numpy as jnp

    order = inputs["order"]
    steps_per_epoch = order.shape[0] // global_batch_size
    index = jnp.asarray(step, jnp.int32) % steps_per_epoch
    rows = jax.lax.dynamic_slice_in_dim(order, index * global_batch_size, global_batch_size)
    return {
        "image": jnp.take(inputs["images"], rows, axis=0),
        "label": jnp.take(inputs["labels"], rows, axis=0),
    }


def dataset_bytes(*splits: loading.Split | None) -> int:
    """The bytes of the splits' images and labels (int32) once on a device."""
    return sum(s.images.nbytes + 4 * len(s.labels) for s in splits if s is not None)
