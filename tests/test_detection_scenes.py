"""detection.scenes: boxes hold their objects, scenes are deterministic, splits disjoint."""

from pathlib import Path

import numpy as np
import pytest

from detection import boxes as box_ops
from detection import scenes

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _check_boxes_hold_the_objects(s: scenes.Scenes):
    assert s.owners is not None
    size = s.images.shape[1]
    for i in range(len(s)):
        b, c = s.objects(i)
        assert len(b) >= 1 and (c >= 0).all() and (c < len(s.class_names)).all()
        box_ops.check_boxes(b, height=size, width=size)
        for j, box in enumerate(b):
            mask = s.owners[i] == j
            x1, y1, x2, y2 = box.astype(int)
            inside = np.zeros_like(mask)
            inside[y1:y2, x1:x2] = True
            assert mask.sum() > 0 and not (mask & ~inside).any()  # the box holds the object
            # ... tightly: every edge row/column has one of its pixels
            assert mask[y1].any() and mask[y2 - 1].any()
            assert mask[:, x1].any() and mask[:, x2 - 1].any()
        # nothing beyond the objects placed is owned
        assert s.owners[i].max() == len(b) - 1


def test_builtin_scenes_boxes_and_determinism():
    s = scenes.builtin_scenes(12, seed=3, image_size=64, return_owners=True)
    assert s.images.shape == (12, 64, 64, 3) and s.images.dtype == np.uint8
    _check_boxes_hold_the_objects(s)
    counts = (s.classes >= 0).sum(axis=1)
    assert counts.min() >= 2 and counts.max() <= 5
    again = scenes.builtin_scenes(12, seed=3, image_size=64)
    np.testing.assert_array_equal(again.images, s.images)
    np.testing.assert_array_equal(again.boxes, s.boxes)
    other = scenes.builtin_scenes(12, seed=4, image_size=64)
    assert not np.array_equal(other.images, s.images)


def test_objects_touch_or_overlap_but_stay_visible():
    s = scenes.builtin_scenes(40, seed=0, image_size=64, return_owners=True)
    overlaps = [
        box_ops.iou(s.objects(i)[0], s.objects(i)[0])[np.triu_indices(len(s.objects(i)[0]), 1)]
        for i in range(len(s))
    ]
    assert max(o.max(initial=0) for o in overlaps) > 0.05  # some boxes overlap


def _toy_items(n=50, seed=0):
    """Items like Fashion-MNIST's: bright blobs of varying extent on black, 28x28."""
    rng = np.random.default_rng(seed)
    items = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        h, w = rng.integers(8, 27, 2)
        y, x = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
        items[i, y : y + h, x : x + w] = rng.integers(60, 255)
    return items, np.arange(n, dtype=np.int32) % 10


def test_scenes_from_items_boxes_hold_the_items():
    items, labels = _toy_items()
    names = tuple(str(i) for i in range(10))
    s = scenes.scenes_from_items(items, labels, 10, seed=1, class_names=names, image_size=80,
                                 return_owners=True)  # fmt: skip
    assert s.images.shape == (10, 80, 80, 1)
    _check_boxes_hold_the_objects(s)
    real = s.classes >= 0
    np.testing.assert_array_equal(labels[s.item_ids[real]], s.classes[real])
    again = scenes.scenes_from_items(items, labels, 10, seed=1, class_names=names, image_size=80)
    np.testing.assert_array_equal(again.images, s.images)


@pytest.mark.skipif(not Path(FASHION_DIR).is_dir(), reason="no Fashion-MNIST files")
def test_fashion_mnist_scenes_use_their_split_items():
    train = scenes.fashion_mnist_scenes(6, split="train", data_dir=FASHION_DIR, return_owners=True)
    test = scenes.fashion_mnist_scenes(6, split="test", data_dir=FASHION_DIR, return_owners=True)
    _check_boxes_hold_the_objects(train)
    _check_boxes_hold_the_objects(test)
    assert train.class_names[0] == test.class_names[0] and len(train.class_names) == 10
    for s, split in ((train, "train"), (test, "test")):
        items, labels = scenes.fashion_mnist_items(FASHION_DIR, split)
        real = s.classes >= 0
        np.testing.assert_array_equal(labels[s.item_ids[real]], s.classes[real])
        # each object's pixels are its item's (rescaled): the item's pool is the split's
        assert (s.item_ids[real] < len(items)).all()
    # the two splits draw from different files; the seeds differ too
    assert not np.array_equal(train.images, test.images)
