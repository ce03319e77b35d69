"""data.load, the batch iterators and the TFDS path; the readers have their own test files."""

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
from configs import base
from data import batches, loading
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def ds_config(**overrides) -> ml_collections.ConfigDict:
    """The dataset section of the base config, with a small built-in dataset by default."""
    cfg = base.get_config().dataset
    cfg.update(builtin_train_size=300, builtin_test_size=50)
    cfg.update(overrides)
    return cfg


def one_device_sharding() -> NamedSharding:
    return NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), P("data"))


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return data.load(ds_config(validation_size=60), seed=0)


def test_dataset_info_without_loading():
    info = data.dataset_info(ds_config(name="cifar100"))
    assert (info.image_shape, info.num_classes, len(info.class_names)) == ((32, 32, 3), 100, 100)
    assert data.dataset_info(ds_config(name="fashion_mnist")).image_shape == (28, 28, 1)
    assert set(data.NAMES) == {
        "builtin",
        "cifar10",
        "cifar100",
        "fashion_mnist",
        "mnist",
        "svhn_cropped",
    }
    with pytest.raises(UserError, match="unknown dataset 'cifar11'.*cifar10"):
        data.dataset_info(ds_config(name="cifar11"))
    with pytest.raises(UserError, match="source"):
        data.dataset_info(ds_config(source="web"))


def test_load_builtin_with_validation(splits):
    assert splits.source == "builtin"
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (240, 60, 50)
    assert splits.train.images.shape == (240, 32, 32, 3) and splits.train.images.dtype == np.uint8
    assert splits.train.labels.dtype == np.int32
    scaled = splits.train.images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(splits.mean, scaled.mean(0), rtol=1e-5)
    np.testing.assert_allclose(splits.std, scaled.std(0), rtol=1e-5)
    assert splits.mean.dtype == splits.std.dtype == np.float32


def test_hold_out_is_a_seeded_disjoint_split():
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    full = loading.Split(images, np.arange(100, dtype=np.int32))
    train, val = loading.hold_out(full, 10, seed=0)
    again, val_again = loading.hold_out(full, 10, seed=0)
    _, other = loading.hold_out(full, 10, seed=1)
    np.testing.assert_array_equal(val.labels, val_again.labels)
    assert not np.array_equal(val.labels, other.labels)
    assert sorted(np.concatenate([train.labels, val.labels])) == list(range(100))
    np.testing.assert_array_equal(train.images[:, 0, 0, 0], train.labels)
    assert loading.hold_out(full, 0, seed=0)[1] is None
    with pytest.raises(UserError, match="validation_size=100 must be in"):
        loading.hold_out(full, 100, seed=0)


def test_train_batches_are_a_pure_function_of_seed_and_step(splits):
    sharding = one_device_sharding()
    kwargs = dict(global_batch_size=32, seed=7, sharding=sharding)
    from_start = data.train_batches(splits.train, start_step=0, **kwargs)
    first = [next(from_start) for _ in range(9)]  # 7 batches per epoch: crosses an epoch
    resumed = data.train_batches(splits.train, start_step=5, **kwargs)
    for step in range(5, 9):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], first[step]["image"])
        np.testing.assert_array_equal(batch["label"], first[step]["label"])
    batch = first[0]
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["image"].sharding == sharding
    other_seed = next(data.train_batches(splits.train, start_step=0, **dict(kwargs, seed=8)))
    assert not np.array_equal(other_seed["label"], batch["label"])


def test_one_epoch_uses_distinct_examples_and_drops_the_partial_batch():
    n, size = 50, 8  # 6 batches per epoch; 2 examples dropped, different ones each epoch
    split = loading.Split(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n, dtype=np.int32))
    it = data.train_batches(split, global_batch_size=size, seed=0, sharding=one_device_sharding())
    epochs = [np.concatenate([np.asarray(next(it)["label"]) for _ in range(6)]) for _ in range(2)]
    for labels in epochs:
        assert len(set(labels.tolist())) == 48
    np.testing.assert_array_equal(epochs[0], batches.epoch_permutation(n, 0, 0)[:48])
    assert not np.array_equal(epochs[0], epochs[1])


def test_eval_batches_pad_and_mask(splits):
    out = list(data.eval_batches(splits.test, global_batch_size=16, sharding=one_device_sharding()))
    assert len(out) == 4  # 50 = 3 x 16 + 2
    mask = np.concatenate([np.asarray(b["mask"]) for b in out])
    labels = np.concatenate([np.asarray(b["label"]) for b in out])
    assert mask.dtype == np.float32 and mask.sum() == 50 and mask[50:].sum() == 0
    np.testing.assert_array_equal(labels[:50], splits.test.labels)
    assert not np.asarray(out[-1]["image"])[2:].any()  # padding is zeros


def test_batch_larger_than_the_split(splits):
    with pytest.raises(UserError, match="fewer than one batch"):
        next(
            data.train_batches(
                splits.validation, global_batch_size=64, seed=0, sharding=one_device_sharding()
            )
        )


def test_auto_source_picks_files_then_explains_tfds(tmp_path):
    with pytest.raises(UserError) as e:
        data.load(ds_config(name="cifar10", data_dir=str(tmp_path)), seed=0)
    message = str(e.value)
    assert "pip install -e '.[tfds]'" in message
    assert f"python -m data prepare cifar10 --data_dir={tmp_path}" in message
    assert "cifar-10-binary.tar.gz" in message and "source='files'" in message
    with pytest.raises(UserError, match="no distribution files"):
        data.load(ds_config(name="mnist", source="files", data_dir=str(tmp_path)), seed=0)


@pytest.mark.parametrize(("name", "shape"), [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_tfds_data_source_under_mock(name, shape):
    with tfds.testing.mock_data(num_examples=12):
        splits = data.load(ds_config(name=name, source="tfds", validation_size=2), seed=0)
    assert splits.source == "tfds"
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (10, 2, 12)
    assert splits.train.images.shape == (10, *shape) and splits.train.images.dtype == np.uint8
    assert splits.test.labels.dtype == np.int32
    assert splits.test.labels.min() >= 0 and splits.test.labels.max() < 10
    assert splits.mean.shape == splits.std.shape == (shape[-1],)


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason=f"no Fashion-MNIST in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_the_debian_files():
    splits = data.load(ds_config(name="fashion_mnist", data_dir=str(FASHION_MNIST_DIR)), seed=0)
    assert splits.source == "files"  # 'auto' found the files
    assert splits.train.images.shape == (60_000, 28, 28, 1)
    assert splits.test.images.shape == (10_000, 28, 28, 1)
    for split in (splits.train, splits.test):
        np.testing.assert_array_equal(np.unique(split.labels), np.arange(10))
    np.testing.assert_allclose(splits.mean, [0.2860], atol=1e-3)  # the usual published values
    np.testing.assert_allclose(splits.std, [0.3530], atol=1e-3)


_FOUR_DEVICES = textwrap.dedent(
    """
    import functools, jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import data
    from data import loading
    from errors import UserError

    images = np.arange(40 * 4, dtype=np.uint8).reshape(40, 2, 2, 1)
    split = loading.Split(images, np.arange(40, dtype=np.int32))
    aug = jax.jit(functools.partial(data.augment, crop_padding=1, flip=True))
    one = NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), P("data"))
    ref = next(data.train_batches(split, global_batch_size=8, seed=3, sharding=one))
    ref_aug = np.asarray(aug(jax.random.key(0), ref["image"]))
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
        sharding = NamedSharding(mesh, P("data"))
        batch = next(data.train_batches(split, global_batch_size=8, seed=3, sharding=sharding))
        assert batch["label"].sharding == sharding
        np.testing.assert_array_equal(batch["label"], ref["label"])
        shards = sorted(batch["label"].addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape for s in shards] == [(2,)] * 4
        np.testing.assert_array_equal(np.asarray(aug(jax.random.key(0), batch["image"])), ref_aug)
        evals = list(data.eval_batches(split, global_batch_size=12, sharding=sharding))
        assert sum(float(b["mask"].sum()) for b in evals) == 40
        try:
            next(data.train_batches(split, global_batch_size=6, seed=0, sharding=sharding))
            raise AssertionError("expected a UserError")
        except UserError as e:
            assert "multiple of 4" in str(e)
    print("OK")
    """
)


def test_four_devices_in_a_subprocess():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None,
    reason="TensorFlow is installed here: `prepare` would download",
)
def test_prepare_without_tensorflow_says_what_to_install():
    result = subprocess.run(
        [sys.executable, "-m", "data", "prepare", "cifar10", "--data_dir=/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "pip install -e '.[tfds]'" in result.stderr
    assert "Traceback" not in result.stderr


_TWO_PROCESSES = textwrap.dedent(
    """
    import sys, jax, numpy as np
    process_id, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import data
    from data import batches, loading

    split = loading.Split(np.zeros((40, 2, 2, 1), np.uint8), np.arange(40, dtype=np.int32))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    rows = batches.process_rows(sharding, 8)
    assert rows.tolist() == list(range(4 * process_id, 4 * process_id + 4)), rows

    def gather(values):
        return multihost_utils.process_allgather(values, tiled=True)

    train = data.train_batches(split, global_batch_size=8, seed=3, sharding=sharding)
    for step in range(6):  # 5 batches per epoch: crosses an epoch
        epoch, index = divmod(step, 5)
        expected = batches.epoch_permutation(40, 3, epoch)[index * 8 : (index + 1) * 8]
        np.testing.assert_array_equal(gather(next(train)["label"]), expected)
    evals = list(data.eval_batches(split, global_batch_size=12, sharding=sharding))
    labels = np.concatenate([gather(b["label"]) for b in evals])
    mask = np.concatenate([gather(b["mask"]) for b in evals])
    np.testing.assert_array_equal(labels[mask > 0], np.arange(40))
    print("OK")
    """
)


def test_two_processes_each_build_their_rows():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESSES, str(i), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # if one failed, the other would wait for it until the timeout
            p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "OK" in out, err[-3000:]
