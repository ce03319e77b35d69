"""TFDS datasets read from prepared `array_record` files with `tfds.data_source`: no TensorFlow.

Preparing (download + convert) does need TensorFlow: `python -m data prepare NAME` (see
`prepare`), installed by `pip install -e '.[tfds]'`.
"""

from collections.abc import Callable

import numpy as np

from errors import UserError

Arrays = tuple[np.ndarray, np.ndarray]  # (images uint8 [N, H, W, C], labels int32 [N])

PREPARE_FORMAT = "array_record"  # random access without TensorFlow
_CIFAR10_ARCHIVE = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(
            f"dataset.source='tfds' needs tensorflow-datasets ({e}): run `pip install -e .` "
            "in the repository, or use dataset.source='files' with the official archives."
        ) from e
    return tfds


def not_prepared_message(name: str, data_dir: str, cause: str) -> str:
    """Returns what to do when `name` is not prepared in `data_dir` for `tfds.data_source`."""
    where = data_dir or "~/tensorflow_datasets"
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    message = (
        f"TFDS dataset {name!r} is not prepared as {PREPARE_FORMAT} in {where} ({cause}). "
        f"With internet access: `pip install -e '.[tfds]'` (TensorFlow, needed only to "
        f"prepare), then `python -m data prepare {name}{dir_flag}`."
    )
    if name == "cifar10":
        message += (
            f" Without internet: download {_CIFAR10_ARCHIVE} (elsewhere), copy it into a folder "
            "and set config.dataset.data_dir to that folder and config.dataset.source='files'."
        )
    else:
        message += (
            " Without internet: put the official distribution files in a folder and set "
            "config.dataset.data_dir to it and config.dataset.source='files'."
        )
    return message


def _why_unreadable(tfds, name: str, data_dir: str, error: Exception) -> str:
    """Returns a short cause for a failed `tfds.data_source`: missing, or in another format."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():
            return "nothing prepared there"
        return f"it is prepared as {builder.info.file_format.value}, which needs TensorFlow to read"
    except Exception:  # the builder itself failed: report the original error
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def data_source(
    name: str,
    split: str,
    data_dir: str,
    *,
    not_prepared: Callable[[str, str, str], str] = not_prepared_message,
):
    """Returns `tfds.data_source` of `split` (TFDS's split syntax, e.g. 'train+validation') of
    TFDS dataset `name` prepared as array_record in `data_dir` ('' = TFDS's default folder).
    Never downloads: raises UserError with `not_prepared(name, data_dir, cause)` when the
    dataset cannot be read."""
    tfds = _import_tfds()
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # TFDS raises several types for a missing or tfrecord-only dataset
        cause = _why_unreadable(tfds, name, data_dir, e)
        raise UserError(not_prepared(name, data_dir, cause)) from e


def _to_arrays(source, indices: np.ndarray) -> Arrays:
    """Reads and decodes the examples at `indices`: (images uint8 [N,H,W,C], labels int32)."""
    examples = [source[int(i)] for i in indices]
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
    labels = np.array([int(ex["label"]) for ex in examples], np.int32)
    return images, labels


def read(name: str, data_dir: str) -> dict[str, Arrays]:
    """Reads the 'train' and 'test' splits of TFDS dataset `name` from `data_dir`.

    Returns {split: (images uint8 [N, H, W, C], labels int32 [N])}. Raises UserError with the
    commands to run when the dataset is not prepared (never downloads).
    """
    splits = {}
    for split in ("train", "test"):
        source = data_source(name, split, data_dir)
        splits[split] = _to_arrays(source, np.arange(len(source)))
    return splits


def prepare(name: str, data_dir: str) -> str:
    """Downloads and prepares TFDS dataset `name` as array_record in `data_dir`.

    Returns the folder it was written to. Needs TensorFlow: raises UserError saying what to
    install when it is missing.
    """
    try:
        import importlib_resources  # noqa: F401  (undeclared dependency of the TFDS builders)
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"preparing a TFDS dataset needs TensorFlow ({e}): run `pip install -e '.[tfds]'` "
            "first. Without internet, use the official archive instead "
            f"(for CIFAR-10: {_CIFAR10_ARCHIVE}) with config.dataset.source='files'."
        ) from e
    tfds = _import_tfds()
    builder = tfds.builder(name, data_dir=data_dir or None, file_format=PREPARE_FORMAT)
    builder.download_and_prepare()
    return str(builder.data_dir)
