"""Offline readers on small files written here in the exact official formats."""

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from data import files
from errors import UserError

RNG = np.random.default_rng(0)


def _images(n: int, shape=(32, 32, 3)) -> np.ndarray:
    return RNG.integers(0, 256, (n, *shape), dtype=np.uint8)


def _cifar_record_rows(images: np.ndarray) -> np.ndarray:
    """The official pixel layout: the 1024 red values, then green, then blue, rows in order."""
    return np.stack([np.concatenate([im[:, :, c].ravel() for c in range(3)]) for im in images])


def _cifar_bin(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
    labels = np.stack(label_columns, axis=1).astype(np.uint8)
    return np.concatenate([labels, _cifar_record_rows(images)], axis=1).tobytes()


def _cifar_pickle(images: np.ndarray, numpy_module: str = "numpy.core.multiarray", **lists):
    """A python batch as the official files hold it: a dict pickled with bytes keys.

    The official files were pickled by Python 2 with numpy < 2, which names
    `numpy.core.multiarray._reconstruct`; protocol 3 keeps the global names as text, so the
    module name can be set to either spelling.
    """
    batch = {b"batch_label": b"a batch", b"data": _cifar_record_rows(images)}
    batch.update({key.encode(): [int(x) for x in value] for key, value in lists.items()})
    blob = pickle.dumps(batch, protocol=3)
    return blob.replace(b"numpy._core.multiarray\n", f"{numpy_module}\n".encode())


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _cifar10_members(fmt: str):
    """Returns (members, expected splits) of a small CIFAR-10 archive (5+1 batches of 2-3)."""
    folder = {"bin": "cifar-10-batches-bin", "py": "cifar-10-batches-py"}[fmt]
    members, train_images, train_labels = {}, [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = _images(2 + i % 2), RNG.integers(0, 10, 2 + i % 2)
        if fmt == "bin":
            members[f"{folder}/{name}.bin"] = _cifar_bin(images, labels)
        else:
            members[f"{folder}/{name}"] = _cifar_pickle(images, labels=labels)
        if name == "test_batch":
            test = (images, labels)
        else:
            train_images.append(images)
            train_labels.append(labels)
    members[f"{folder}/batches.meta.txt"] = b"airplane\n"
    return members, {
        "train": (np.concatenate(train_images), np.concatenate(train_labels)),
        "test": test,
    }


def _assert_splits(got, expected):
    assert set(got) == {"train", "test"}
    for split, (images, labels) in expected.items():
        np.testing.assert_array_equal(got[split][0], images)
        np.testing.assert_array_equal(got[split][1], labels)
        assert got[split][0].dtype == np.uint8 and got[split][1].dtype == np.int32


@pytest.mark.parametrize(
    ("fmt", "archive"), [("bin", "cifar-10-binary.tar.gz"), ("py", "cifar-10-python.tar.gz")]
)
def test_cifar10_archives(tmp_path, fmt, archive):
    members, expected = _cifar10_members(fmt)
    _tar(tmp_path / archive, members)
    assert files.available("cifar10", str(tmp_path))
    _assert_splits(files.read("cifar10", str(tmp_path)), expected)


def test_cifar10_extracted_batches(tmp_path):
    members, expected = _cifar10_members("bin")
    for name, blob in members.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    _assert_splits(files.read("cifar10", str(tmp_path)), expected)


def test_cifar_python_pickled_by_numpy2(tmp_path):
    members, expected = _cifar10_members("py")
    members = {
        name: blob.replace(b"numpy.core.multiarray\n", b"numpy._core.multiarray\n")
        for name, blob in members.items()
    }
    _tar(tmp_path / "cifar-10-python.tar.gz", members)
    _assert_splits(files.read("cifar10", str(tmp_path)), expected)


@pytest.mark.parametrize("keys", ["bytes", "text"])
def test_cifar_python_repickled_by_python3_protocol_2(tmp_path, keys):
    """A user loads the official batches and writes them again with Python 3 and protocol 2:
    bytes and array data then go through `_codecs.encode(text, 'latin1')`. Loaded with
    encoding='latin1', the keys also become text."""
    members, expected = _cifar10_members("py")
    encoding = "bytes" if keys == "bytes" else "latin1"
    repickled = {}
    for name, blob in members.items():
        if "batches.meta" in name:
            repickled[name] = blob
            continue
        batch = pickle.loads(blob, encoding=encoding)
        repickled[name] = pickle.dumps(batch, protocol=2)
        assert b"_codecs\nencode" in repickled[name]
    _tar(tmp_path / "cifar-10-python.tar.gz", repickled)
    _assert_splits(files.read("cifar10", str(tmp_path)), expected)


def test_codecs_encode_admits_latin1_text_only():
    class _Encodes:  # a pickle asking _codecs.encode for anything but latin-1 text
        def __reduce__(self):
            import _codecs

            return (_codecs.encode, ("x", "rot13"))

    with pytest.raises(UserError, match="refusing _codecs.encode"):
        files.safe_unpickle(pickle.dumps(_Encodes(), protocol=2), "x")
    with pytest.raises(UserError, match="refusing to load _codecs.decode"):
        files.safe_unpickle(pickle.dumps(_DecodesBytes(), protocol=2), "x")


class _DecodesBytes:
    def __reduce__(self):
        import _codecs

        return (_codecs.decode, (b"x", "latin1"))


def test_cifar100_binary_and_python(tmp_path):
    train, test = _images(4), _images(3)
    coarse = [RNG.integers(0, 20, 4), RNG.integers(0, 20, 3)]
    fine = [RNG.integers(0, 100, 4), RNG.integers(0, 100, 3)]
    expected = {"train": (train, fine[0]), "test": (test, fine[1])}
    (tmp_path / "bin").mkdir()
    _tar(
        tmp_path / "bin" / "cifar-100-binary.tar.gz",
        {
            "cifar-100-binary/train.bin": _cifar_bin(train, coarse[0], fine[0]),
            "cifar-100-binary/test.bin": _cifar_bin(test, coarse[1], fine[1]),
        },
    )
    _assert_splits(files.read("cifar100", str(tmp_path / "bin")), expected)
    (tmp_path / "py").mkdir()
    _tar(
        tmp_path / "py" / "cifar-100-python.tar.gz",
        {
            "cifar-100-python/train": _cifar_pickle(
                train, fine_labels=fine[0], coarse_labels=coarse[0]
            ),
            "cifar-100-python/test": _cifar_pickle(
                test, fine_labels=fine[1], coarse_labels=coarse[1]
            ),
        },
    )
    _assert_splits(files.read("cifar100", str(tmp_path / "py")), expected)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    members, _ = _cifar10_members("py")
    members["cifar-10-batches-py/data_batch_1"] = pickle.dumps(
        {b"data": _RunsCode(marker), b"labels": [0]}, protocol=3
    )
    _tar(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(UserError, match=r"data_batch_1.*refusing to load (posix|nt)\.system"):
        files.read("cifar10", str(tmp_path))
    assert not marker.exists()
    with pytest.raises(UserError, match="refusing"):
        files.safe_unpickle(pickle.dumps(_RunsCode(marker)), "x")
    assert not marker.exists()


@pytest.mark.parametrize("unsafe", ["../escape.bin", "/tmp/absolute.bin"])
def test_archive_with_unsafe_member_name_is_refused(tmp_path, unsafe):
    members, _ = _cifar10_members("bin")
    members[unsafe] = b"x"
    _tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(UserError, match="unsafe member name"):
        files.read("cifar10", str(tmp_path))


def test_corrupt_and_incomplete_archives(tmp_path):
    members, _ = _cifar10_members("bin")
    blob = _tar(tmp_path / "cifar-10-binary.tar.gz", members).read_bytes()
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="corrupt or truncated archive.*download it again"):
        files.read("cifar10", str(tmp_path))

    del members["cifar-10-batches-bin/data_batch_5.bin"]
    _tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(UserError, match="lacks data_batch_5.bin"):
        files.read("cifar10", str(tmp_path))

    members["cifar-10-batches-bin/data_batch_5.bin"] = b"\x00" * 3074  # not whole records
    _tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(UserError, match="not a whole number of 3073-byte CIFAR records"):
        files.read("cifar10", str(tmp_path))


def test_missing_files_say_where_to_download(tmp_path):
    assert not files.available("cifar10", str(tmp_path))
    with pytest.raises(UserError, match=r"no distribution files.*cifar-10-binary\.tar\.gz"):
        files.read("cifar10", str(tmp_path))
    (tmp_path / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(UserError, match=rf"in {tmp_path} is incomplete: data_batch_2.bin"):
        files.read("cifar10", str(tmp_path))
    nowhere = tmp_path / "nowhere"
    with pytest.raises(UserError) as error:
        files.read("mnist", str(nowhere))
    assert str(error.value).startswith(
        f"dataset 'mnist' from files: config.dataset.data_dir='{nowhere}' is not a folder (not "
        "there, or a file). Expected train-images-idx3-ubyte, "
    )
    assert str(nowhere) not in str(error.value).partition("is not a folder")[2]  # said once


def _idx(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, splits, compress: bool) -> None:
    for prefix, (images, labels) in zip(("train", "t10k"), splits, strict=True):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            blob, name = _idx(array), f"{prefix}-{kind}-ubyte"
            if compress:
                blob, name = gzip.compress(blob), name + ".gz"
            (folder / name).write_bytes(blob)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files(tmp_path, compress):
    splits = [(_images(5, (28, 28)), RNG.integers(0, 10, 5)), (_images(3, (28, 28)), np.arange(3))]
    _write_idx(tmp_path, splits, compress)
    got = files.read("fashion_mnist", str(tmp_path))
    expected = {
        split: (images[..., None], labels)
        for split, (images, labels) in zip(("train", "test"), splits, strict=True)
    }
    _assert_splits(got, expected)


def test_idx_count_mismatch_and_truncation(tmp_path):
    _write_idx(
        tmp_path, [(_images(5, (28, 28)), np.arange(4)), (_images(2, (28, 28)), np.arange(2))], True
    )
    with pytest.raises(UserError, match="5 images but 4 labels"):
        files.read("mnist", str(tmp_path))
    blob = _idx(_images(5, (28, 28)))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(blob[:-10]))
    with pytest.raises(UserError, match="truncated"):
        files.read("mnist", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(blob)[:-20])
    with pytest.raises(UserError, match="corrupt or truncated gzip"):
        files.read("mnist", str(tmp_path))


def test_labels_out_of_range_mean_wrong_files(tmp_path):
    _write_idx(
        tmp_path,
        [(_images(2, (28, 28)), np.array([3, 12])), (_images(1, (28, 28)), np.zeros(1))],
        False,
    )
    with pytest.raises(UserError, match=r"outside \[0, 10\)"):
        files.read("mnist", str(tmp_path))


def test_svhn_mat_files(tmp_path):
    train, test = _images(4), _images(2)
    labels = [np.array([10, 1, 2, 9]), np.array([10, 5])]  # 10 is the digit 0
    for name, images, y in (("train", train, labels[0]), ("test", test, labels[1])):
        scipy.io.savemat(
            tmp_path / f"{name}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y[:, None]}
        )
    got = files.read("svhn_cropped", str(tmp_path))
    _assert_splits(
        got, {"train": (train, np.array([0, 1, 2, 9])), "test": (test, np.array([0, 5]))}
    )
