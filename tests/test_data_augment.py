"""On-device augmentation and normalisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data

IMAGES = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)


@functools.partial(jax.jit, static_argnames=("crop_padding", "flip"))
def _augment(key, images, *, crop_padding, flip):
    return data.augment(key, images, crop_padding=crop_padding, flip=flip)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_shapes_dtypes_and_determinism(dtype):
    images = jnp.asarray(IMAGES, dtype)
    a = _augment(jax.random.key(0), images, crop_padding=2, flip=True)
    b = _augment(jax.random.key(0), images, crop_padding=2, flip=True)
    c = _augment(jax.random.key(1), images, crop_padding=2, flip=True)
    assert a.shape == IMAGES.shape and a.dtype == dtype
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_off_is_identity():
    out = _augment(jax.random.key(0), IMAGES, crop_padding=0, flip=False)
    np.testing.assert_array_equal(out, IMAGES)


def test_flip_mirrors_some_examples_and_keeps_the_rest():
    out = np.asarray(_augment(jax.random.key(3), IMAGES, crop_padding=0, flip=True))
    mirrored = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, IMAGES, strict=True)]
    same = [np.array_equal(o, x) for o, x in zip(out, IMAGES, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 0 < sum(mirrored) < len(IMAGES)  # per-example draws, not one for the batch


def test_crop_is_a_window_of_the_zero_padded_image():
    padding = 2
    out = np.asarray(_augment(jax.random.key(5), IMAGES, crop_padding=padding, flip=False))
    padded = np.pad(IMAGES, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = []
    for o, p in zip(out, padded, strict=True):
        windows = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if np.array_equal(o, p[dy : dy + 8, dx : dx + 8])
        ]
        assert windows, "each output must be a window of the padded input"
        offsets.append(windows[0])
    assert len(set(offsets)) > 1


def test_normalize():
    mean, std = np.array([0.5, 0.25, 0.0], np.float32), np.array([0.5, 0.25, 1.0], np.float32)
    out = data.normalize(IMAGES, mean, std, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == IMAGES.shape
    expected = (IMAGES / 255.0 - mean) / std
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(data.normalize(IMAGES, mean, std), expected, rtol=1e-5, atol=1e-5)
