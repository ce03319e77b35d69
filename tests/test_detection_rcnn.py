"""detection.rcnn: the warp with context padding, fine-tuning labels and batches."""

import jax.numpy as jnp
import numpy as np

from detection import rcnn


def test_warp_without_context_is_a_resize_of_the_box():
    # a linear ramp image: bilinear sampling reproduces it exactly inside the image
    h, w = 20, 30
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    image = np.stack([xx, yy], axis=-1).astype(np.float32)[None]  # channel 0: x, 1: y
    boxes = np.array([[4, 2, 12, 10], [10, 5, 26, 13]], np.float32)
    got = np.asarray(rcnn.warp(image, boxes, np.array([0, 0]), size=8, context=0.0))
    assert got.shape == (2, 8, 8, 2)
    # output pixel i samples the box at x1 + (i + 0.5) * width / 8
    centres = (np.arange(8) + 0.5) / 8
    np.testing.assert_allclose(got[0, 0, :, 0], 4 + centres * 8, atol=1e-4)
    np.testing.assert_allclose(got[1, :, 0, 1], 5 + centres * 8, atol=1e-4)
    np.testing.assert_allclose(got[1, 0, :, 0], 10 + centres * 16, atol=1e-4)


def test_warp_context_padding_and_fill():
    image = np.full((1, 16, 16, 1), 10.0, np.float32)
    image[0, 4:12, 4:12] = 200.0  # an object; mean = (64*200 + 192*10)/256
    size = 227
    box = np.array([[4, 4, 12, 12]], np.float32)
    got = np.asarray(rcnn.warp(jnp.asarray(image), box, np.array([0]), size=size))[0, ..., 0]
    p = rcnn.context_pixels(size)
    assert p == 16.0
    # the box fills the middle 195 px (blended at its edges: bilinear), the outer 16 px are
    # its surroundings (0.66 image px here)
    assert got[113, 113] == 200.0 and got[40, 113] == 200.0
    np.testing.assert_allclose(got[0, 113], 10.0, rtol=1e-5)
    # a box at the image corner: context beyond the image is the image mean
    corner = np.asarray(rcnn.warp(image, np.array([[0, 0, 4, 4]], np.float32), np.array([0]),
                                  size=size, context=100.0))[0, ..., 0]  # fmt: skip
    np.testing.assert_allclose(corner[2, 2], (64 * 200 + 192 * 10) / 256, rtol=1e-5)
    np.testing.assert_allclose(corner[113, 113], 10.0, rtol=1e-5)


def test_labels_and_batches_follow_the_paper():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    props = np.array([[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 20, 20], [20, 20, 30, 40]])
    labels, matched, ious = rcnn.label_proposals(props, gt, np.array([3, 5]))
    # IoUs 1, 0.83, 0.25, 0.5: the first two are class 3 (+1), the last class 5 (+1)
    assert labels.tolist() == [4, 4, 0, 6]
    np.testing.assert_allclose(ious, [1, 100 / 120, 0.25, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(matched[3], gt[1])
    assert rcnn.label_proposals(props, np.zeros((0, 4)), np.zeros(0))[0].tolist() == [0] * 4

    rng = np.random.default_rng(0)
    pool = np.array([1] * 50 + [0] * 500)
    batch = rcnn.sample_batch(rng, pool)
    assert len(batch) == 128 and (pool[batch] > 0).sum() == 32 and len(set(batch)) == 128
    few = np.array([2] * 5 + [0] * 500)  # fewer positives than 32: background fills the batch
    assert (few[rcnn.sample_batch(rng, few)] > 0).sum() == 5
