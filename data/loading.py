"""`load`: a dataset's splits in host memory, from whichever source the config names."""

import dataclasses

import ml_collections
import numpy as np
from absl import logging

from data import builtin, catalog, files, tfds_source
from errors import UserError

# Streams of the data seed: each use draws from its own, so none shifts another.
HOLDOUT_STREAM = 0
SHUFFLE_STREAM = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Examples held in host memory: images uint8 [N, H, W, C], labels int32 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """What `load` returns. `mean`/`std`: float32 [C] of the training images scaled to [0, 1].

    `validation` is None when no images are held out. `source` is where the data came from
    ('builtin', 'files' or 'tfds').
    """

    train: Split
    validation: Split | None
    test: Split
    info: catalog.DatasetInfo
    mean: np.ndarray
    std: np.ndarray
    source: str


def rng(seed: int, *stream: int) -> np.random.Generator:
    """Returns the numpy Generator of one named stream of `seed` (see HOLDOUT/SHUFFLE_STREAM)."""
    if seed < 0:
        raise UserError(f"config.seed={seed}: the data pipeline needs a seed >= 0.")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def resolve_source(ds_cfg: ml_collections.ConfigDict) -> str:
    """Returns the concrete source for `ds_cfg`: 'builtin', 'files' or 'tfds'.

    'auto' means builtin for the built-in dataset, else files when `data_dir` holds the
    official files, else TFDS.
    """
    catalog.dataset_info(ds_cfg)  # validates name and source
    if ds_cfg.source != "auto":
        return ds_cfg.source
    if ds_cfg.name == "builtin":
        return "builtin"
    return "files" if files.available(ds_cfg.name, ds_cfg.data_dir) else "tfds"


def _read(ds_cfg: ml_collections.ConfigDict, source: str) -> dict[str, files.Arrays]:
    if source == "builtin":
        for field in ("builtin_train_size", "builtin_test_size"):
            if ds_cfg[field] <= 0:
                raise UserError(f"config.dataset.{field}={ds_cfg[field]} must be > 0.")
        return {
            split: builtin.generate(
                ds_cfg[f"builtin_{split}_size"],
                seed=seed,
                image_size=ds_cfg.get("builtin_image_size", builtin.IMAGE_SIZE),
                clutter=ds_cfg.get("builtin_clutter", 1.0),
            )
            for split, seed in (("train", builtin.TRAIN_SEED), ("test", builtin.TEST_SEED))
        }
    if source == "files":
        return files.read(ds_cfg.name, ds_cfg.data_dir)
    return tfds_source.read(ds_cfg.name, ds_cfg.data_dir)


def _check_shapes(arrays: dict[str, files.Arrays], info: catalog.DatasetInfo) -> None:
    for split, (images, labels) in arrays.items():
        if images.shape[1:] != info.image_shape or images.dtype != np.uint8:
            raise UserError(
                f"dataset {info.name!r}, split {split!r}: images are {images.dtype} "
                f"{images.shape[1:]}, expected uint8 {info.image_shape}; the data dir holds "
                "another dataset's files."
            )
        if len(images) != len(labels):
            raise UserError(
                f"dataset {info.name!r}, split {split!r}: {len(images)} images but "
                f"{len(labels)} labels; prepare or download the data again."
            )


def hold_out(train: Split, size: int, seed: int) -> tuple[Split, Split | None]:
    """Splits `size` random training examples (chosen by `seed`) off as a validation split.

    Returns (train, validation); both keep the original order, validation is None for size 0.
    """
    n = len(train)
    if not 0 <= size < n:
        raise UserError(
            f"config.dataset.validation_size={size} must be in [0, {n}): the training split "
            f"has {n} images."
        )
    if size == 0:
        return train, None
    order = rng(seed, HOLDOUT_STREAM).permutation(n)
    keep, held = np.sort(order[size:]), np.sort(order[:size])
    return (
        Split(train.images[keep], train.labels[keep]),
        Split(train.images[held], train.labels[held]),
    )


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (mean, std), float32 [C], of uint8 images [N, H, W, C] scaled to [0, 1].

    Exact (from per-channel histograms, no float copy of the images).
    """
    values = np.arange(256, dtype=np.float64) / 255
    channels = images.shape[-1]
    counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(channels)])
    total = counts.sum(axis=1)
    mean = counts @ values / total
    var = counts @ values**2 / total - mean**2
    # A floor keeps a constant channel (zero variance) from dividing by zero.
    std = np.sqrt(np.maximum(var, (1 / 255) ** 2))
    return mean.astype(np.float32), std.astype(np.float32)


def load(
    ds_cfg: ml_collections.ConfigDict, *, seed: int, process_index: int = 0, process_count: int = 1
) -> Splits:
    """Loads the dataset `ds_cfg` names into host memory, with its normalisation statistics.

    Every process holds every example: the datasets here are at most ~200 MB, the statistics
    must be identical on all processes, and the global shuffle (`train_batches`) makes the batch
    of a step independent of the number of processes. Each process then reads only its own
    rows of every batch (the rows its devices hold, see `train_batches`).
    `seed` chooses the validation images (`hold_out`); the built-in dataset itself is fixed.
    Raises UserError for every configuration or data problem, naming the cause and the fix.
    """
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index={process_index} must be in [0, {process_count}).")
    info = catalog.dataset_info(ds_cfg)
    source = resolve_source(ds_cfg)
    arrays = _read(ds_cfg, source)
    _check_shapes(arrays, info)
    train, validation = hold_out(Split(*arrays["train"]), ds_cfg.validation_size, seed)
    mean, std = channel_stats(train.images)
    if process_index == 0:
        logging.info(
            "dataset %s from %s: %d train, %d validation, %d test images of %s; mean %s std %s",
            info.name,
            source,
            len(train),
            len(validation) if validation else 0,
            len(arrays["test"][1]),
            info.image_shape,
            np.round(mean, 4),
            np.round(std, 4),
        )
    return Splits(train, validation, Split(*arrays["test"]), info, mean, std, source)
