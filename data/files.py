"""Offline readers: the datasets' official distribution files in a folder, no network.

Formats (each either as the downloaded archive in `data_dir` or extracted there):
- CIFAR-10/100 binary (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`), preferred;
- CIFAR-10/100 python (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`): pickles (the
  official Python 2 ones, or re-pickled by Python 3), read with an unpickler that builds numpy
  arrays, bytes and containers and nothing else, so a file cannot run code;
- MNIST and Fashion-MNIST idx files (`train-images-idx3-ubyte[.gz]` ...), gzipped or not;
- SVHN cropped digits (`train_32x32.mat`, `test_32x32.mat`).
Archives are read member by member into memory, never extracted, and an archive holding a
member with an absolute path or a '..' component is refused outright.
"""

import dataclasses
import gzip
import io
import pickle
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from errors import UserError

Arrays = tuple[np.ndarray, np.ndarray]  # (images uint8 [N, H, W, C], labels int32 [N])
Decoder = Callable[[Sequence[tuple[str, bytes]]], Arrays]

_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE


@dataclasses.dataclass(frozen=True)
class _Format:
    """One way a dataset is distributed: an archive or loose files, and how to decode them."""

    description: str
    folder: str  # the folder the archive unpacks to (also searched below `data_dir`)
    splits: dict[str, tuple[str, ...]]  # split -> file names, in order
    decode: Decoder
    archive: str = ""  # the tarball's file name; '' for formats distributed as loose files


@dataclasses.dataclass(frozen=True)
class _Dataset:
    formats: tuple[_Format, ...]
    num_classes: int
    download: str  # how to get the files, for error messages
    aliases: tuple[str, ...] = ()  # other folder names searched below `data_dir`


# --------------------------------------------------------------------------------------------
# Decoders


def _cifar_images(rows: np.ndarray) -> np.ndarray:
    """[N, 3072] rows (1024 red, then green, then blue, row-major) -> uint8 [N, 32, 32, 3]."""
    images = rows.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images)


def _cifar_binary(label_bytes: int) -> Decoder:
    """Decoder of CIFAR binary batches: records of `label_bytes` label bytes + 3072 pixels.

    CIFAR-100 records start with the coarse then the fine label; the fine one (last) is used.
    """
    record = label_bytes + _CIFAR_PIXELS

    def decode(files: Sequence[tuple[str, bytes]]) -> Arrays:
        images, labels = [], []
        for name, blob in files:
            if len(blob) % record:
                raise UserError(
                    f"{name}: {len(blob)} bytes is not a whole number of {record}-byte CIFAR "
                    "records: the file is truncated or not a CIFAR binary batch. Download the "
                    "archive again."
                )
            rows = np.frombuffer(blob, np.uint8).reshape(-1, record)
            labels.append(rows[:, label_bytes - 1].astype(np.int32))
            images.append(_cifar_images(rows[:, label_bytes:]))
        return np.concatenate(images), np.concatenate(labels)

    return decode


# The only callables a CIFAR python batch needs: numpy's array and dtype reconstruction.
# `_reconstruct` is looked up through numpy's own pickling, whatever module it lives in.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]


def _latin1_bytes(text, encoding="latin1"):
    """What `_codecs.encode` stands for in a pickle of protocol 2 written by Python 3: bytes
    spelt as a latin-1 string (e.g. a batch re-pickled with `pickle.dump(batch, f, 2)`).
    Only that use is admitted; it builds bytes and runs nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode of {type(text).__name__}")
    return text.encode("latin1")


_SAFE_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,  # bytes in Python 3's protocol-2 pickles
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy < 2 (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other class or function."""

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def safe_unpickle(blob: bytes, name: str):
    """Returns the object pickled in `blob`, built from containers and numpy arrays only.

    Python 2 strings come back as bytes (the CIFAR batches were pickled by Python 2). Raises
    UserError naming `name` when the pickle is corrupt or refers to anything else, e.g. a
    function it would call.
    """
    try:
        return _SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{name}: not a CIFAR python batch ({e}). It is corrupt or not from the official "
            "archive; download it again, or use the binary version (cifar-*-binary.tar.gz)."
        ) from e
    except Exception as e:  # truncated or garbled pickles raise many types
        raise UserError(
            f"{name}: corrupt pickle ({type(e).__name__}: {e}). Download the archive again."
        ) from e


def _cifar_python(label_key: bytes) -> Decoder:
    """Decoder of CIFAR python batches: dicts with b'data' [N, 3072] and `label_key` lists."""

    def decode(files: Sequence[tuple[str, bytes]]) -> Arrays:
        images, labels = [], []
        for name, blob in files:
            batch = safe_unpickle(blob, name)
            if isinstance(batch, dict):  # re-pickled after loading with encoding='latin1'
                batch = {
                    k.encode("latin1") if isinstance(k, str) else k: v for k, v in batch.items()
                }
            data = batch.get(b"data") if isinstance(batch, dict) else None
            if not (
                isinstance(data, np.ndarray)
                and data.dtype == np.uint8
                and data.ndim == 2
                and data.shape[1] == _CIFAR_PIXELS
                and label_key in batch
            ):
                raise UserError(
                    f"{name}: not a CIFAR python batch (expected a dict with b'data' uint8 "
                    f"[N, {_CIFAR_PIXELS}] and {label_key!r}). Download the archive again."
                )
            label = np.asarray(batch[label_key], np.int32)
            _check_count(name, len(data), len(label))
            images.append(_cifar_images(data))
            labels.append(label)
        return np.concatenate(images), np.concatenate(labels)

    return decode


def _idx_array(name: str, blob: bytes) -> np.ndarray:
    """Parses an idx file (big-endian header: 0, 0, type 0x08 = uint8, rank, then the dims)."""
    if blob[:2] == b"\x1f\x8b":  # gzip magic: the .gz distribution
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(
                f"{name}: corrupt or truncated gzip file ({e}). Download it again."
            ) from e
    if len(blob) < 4 or blob[:3] != b"\x00\x00\x08":
        raise UserError(
            f"{name}: not an idx file of unsigned bytes (header {blob[:4].hex()}). Download it "
            "again."
        )
    rank = blob[3]
    dims = np.frombuffer(blob, ">u4", count=rank, offset=4).astype(int) if rank else []
    start = 4 + 4 * rank
    if len(blob) - start != int(np.prod(dims)):
        raise UserError(
            f"{name}: header promises shape {tuple(dims)} = {int(np.prod(dims))} bytes but the "
            f"file holds {len(blob) - start}: it is truncated. Download it again."
        )
    return np.frombuffer(blob, np.uint8, offset=start).reshape(dims)


def _decode_idx(files: Sequence[tuple[str, bytes]]) -> Arrays:
    (image_name, image_blob), (label_name, label_blob) = files
    images, labels = _idx_array(image_name, image_blob), _idx_array(label_name, label_blob)
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(
            f"{image_name} / {label_name}: expected images [N, H, W] and labels [N], got shapes "
            f"{images.shape} and {labels.shape}: are the two files swapped?"
        )
    _check_count(f"{image_name} and {label_name}", len(images), len(labels))
    return images[..., None], labels.astype(np.int32)


def _decode_svhn(files: Sequence[tuple[str, bytes]]) -> Arrays:
    import scipy.io  # deferred: only SVHN needs it

    ((name, blob),) = files
    try:
        mat = scipy.io.loadmat(io.BytesIO(blob))
        images, labels = mat["X"], mat["y"]
    except Exception as e:  # scipy raises many types on a corrupt file
        raise UserError(f"{name}: not a readable SVHN .mat file ({e}). Download it again.") from e
    labels = labels.reshape(-1).astype(np.int32)
    _check_count(name, images.shape[-1], len(labels))
    # The .mat stores [H, W, C, N] and digit 0 as label 10.
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), np.where(labels == 10, 0, labels)


def _check_count(name: str, num_images: int, num_labels: int) -> None:
    if num_images != num_labels:
        raise UserError(
            f"{name}: {num_images} images but {num_labels} labels; the files are truncated or "
            "from different releases. Download them again."
        )


# --------------------------------------------------------------------------------------------
# The datasets


def _cifar_batches(suffix: str) -> dict[str, tuple[str, ...]]:
    return {
        "train": tuple(f"data_batch_{i}{suffix}" for i in range(1, 6)),
        "test": (f"test_batch{suffix}",),
    }


def _idx_files(train: str = "train", test: str = "t10k") -> dict[str, tuple[str, ...]]:
    return {
        split: (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        for split, prefix in (("train", train), ("test", test))
    }


_IDX = _Format("idx files", "", _idx_files(), _decode_idx)
_DATASETS = {
    "cifar10": _Dataset(
        (
            _Format(
                "CIFAR-10 binary",
                "cifar-10-batches-bin",
                _cifar_batches(".bin"),
                _cifar_binary(1),
                "cifar-10-binary.tar.gz",
            ),
            _Format(
                "CIFAR-10 python",
                "cifar-10-batches-py",
                _cifar_batches(""),
                _cifar_python(b"labels"),
                "cifar-10-python.tar.gz",
            ),
        ),
        10,
        "download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz into it (no need to "
        "extract)",
    ),
    "cifar100": _Dataset(
        (
            _Format(
                "CIFAR-100 binary",
                "cifar-100-binary",
                {"train": ("train.bin",), "test": ("test.bin",)},
                _cifar_binary(2),
                "cifar-100-binary.tar.gz",
            ),
            _Format(
                "CIFAR-100 python",
                "cifar-100-python",
                {"train": ("train",), "test": ("test",)},
                _cifar_python(b"fine_labels"),
                "cifar-100-python.tar.gz",
            ),
        ),
        100,
        "download https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz into it (no need to "
        "extract)",
    ),
    "mnist": _Dataset(
        (_IDX,),
        10,
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        "https://storage.googleapis.com/cvdf-datasets/mnist/ into it",
    ),
    "fashion_mnist": _Dataset(
        (_IDX,),
        10,
        "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
        "/usr/share/datasets/fashion-mnist; elsewhere download train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        "from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ into it",
        aliases=("fashion-mnist",),
    ),
    "svhn_cropped": _Dataset(
        (
            _Format(
                "SVHN .mat files",
                "",
                {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
                _decode_svhn,
            ),
        ),
        10,
        "download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat "
        "into it",
        aliases=("svhn",),
    ),
}


# --------------------------------------------------------------------------------------------
# Finding and reading the files


def _search_dirs(name: str, fmt: _Format, data_dir: Path) -> list[Path]:
    """The folders where loose files of `fmt` may be: data_dir itself, or a named subfolder."""
    subfolders = [fmt.folder, name, *_DATASETS[name].aliases]
    return [data_dir] + [data_dir / sub for sub in subfolders if sub]


def _loose_file(folder: Path, file_name: str) -> Path | None:
    for candidate in (folder / file_name, folder / f"{file_name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _check_member_name(archive: Path, member: tarfile.TarInfo) -> None:
    parts = Path(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts:
        raise UserError(
            f"{archive}: refusing an archive with the unsafe member name {member.name!r} "
            "(absolute or containing '..'); it is not the official archive. Download it again."
        )


def _read_archive(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """Returns {file name: bytes} of the regular members of `archive` named in `wanted`.

    Members match by their base name (the archive's own top folder is not required).
    Raises UserError for a corrupt archive or an unsafe member name.
    """
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _check_member_name(archive, member)
                base = Path(member.name).name
                if member.isfile() and base in wanted:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"{archive}: corrupt or truncated archive ({type(e).__name__}: {e}). Delete it and "
            "download it again."
        ) from e
    return found


def _missing_files_error(name: str, detail: str) -> UserError:
    """The one-line error for a dataset whose files are not there; `detail` says what is
    wrong and where."""
    dataset = _DATASETS[name]
    formats = "; ".join(
        (
            f"{f.archive} or its extracted files"
            if f.archive
            else ", ".join(sum(f.splits.values(), ()))
        )
        for f in dataset.formats
    )
    return UserError(
        f"dataset {name!r} from files: {detail}. Expected {formats}. To fix, "
        f"{dataset.download}, and set config.dataset.data_dir to that folder; or use "
        "config.dataset.source='tfds'."
    )


def _find(name: str, data_dir: Path) -> tuple[_Format, Path | dict[str, Path | None]] | None:
    """Returns the first format of `name` present in `data_dir` and where its files are.

    Where: the archive's path, or {file name: path} of loose files (None for a missing one:
    a partial copy is still returned, so that the error can list what is missing). Returns
    None when `data_dir` holds no file of any format.
    """
    for fmt in _DATASETS[name].formats:
        names = [n for split in fmt.splits.values() for n in split]
        partial = None
        for folder in _search_dirs(name, fmt, data_dir):
            paths = {n: _loose_file(folder, n) for n in names}
            if all(paths.values()):
                return fmt, paths
            partial = partial or (paths if any(paths.values()) else None)
        if fmt.archive and (data_dir / fmt.archive).is_file():
            return fmt, data_dir / fmt.archive
        if partial:
            return fmt, partial
    return None


def _read_files(name: str, data_dir: Path) -> tuple[_Format, dict[str, tuple[str, bytes]]]:
    """Returns (format, {file name: (where, for messages; contents)}) of every file needed."""
    found = _find(name, data_dir)
    if found is None:
        raise _missing_files_error(name, f"no distribution files in {data_dir}")
    fmt, where = found
    names = [n for split in fmt.splits.values() for n in split]
    if isinstance(where, dict):
        missing = [n for n, path in where.items() if path is None]
        if missing:
            raise _missing_files_error(
                name, f"{fmt.description} in {data_dir} is incomplete: {', '.join(missing)} missing"
            )
        return fmt, {n: (str(where[n]), where[n].read_bytes()) for n in names}
    contents = _read_archive(where, set(names))
    missing = [n for n in names if n not in contents]
    if missing:
        raise UserError(
            f"{where}: the archive lacks {', '.join(missing)}; it is incomplete or not the "
            "official one. Download it again."
        )
    return fmt, {n: (f"{where}:{n}", contents[n]) for n in names}


def available(name: str, data_dir: str) -> bool:
    """Returns whether `data_dir` holds (at least part of) a distribution of dataset `name`."""
    if name not in _DATASETS or not data_dir or not Path(data_dir).is_dir():
        return False
    return _find(name, Path(data_dir)) is not None


def read(name: str, data_dir: str) -> dict[str, Arrays]:
    """Reads dataset `name` from its official files in `data_dir`.

    Returns {'train': (images, labels), 'test': (images, labels)} with images uint8
    [N, H, W, C] and labels int32 [N]. Raises UserError for missing, incomplete or corrupt
    files, count mismatches and out-of-range labels, naming the file and the fix.
    """
    if name not in _DATASETS:
        raise UserError(
            f"dataset {name!r} has no offline files reader; choose one of {', '.join(_DATASETS)}."
        )
    if not data_dir or not Path(data_dir).is_dir():
        raise _missing_files_error(
            name, f"config.dataset.data_dir={data_dir!r} is not a folder (not there, or a file)"
        )
    fmt, contents = _read_files(name, Path(data_dir))
    splits = {}
    for split, names in fmt.splits.items():
        images, labels = fmt.decode([contents[n] for n in names])
        _check_labels(f"{data_dir} ({fmt.description}, {split})", labels, _DATASETS[name])
        splits[split] = (images, labels)
    return splits


def _check_labels(where: str, labels: np.ndarray, dataset: _Dataset) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= dataset.num_classes):
        raise UserError(
            f"{where}: labels span [{labels.min()}, {labels.max()}], outside [0, "
            f"{dataset.num_classes}): these are not the files of this dataset."
        )
