"""The built-in procedural dataset."""

import numpy as np

from data import builtin


def test_shapes_dtypes_and_balanced_classes():
    images, labels, boxes = builtin.generate(200, seed=0, return_boxes=True)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.int32
    assert boxes.shape == (200, 4) and boxes.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(labels), [20] * builtin.NUM_CLASSES)
    assert len(builtin.CLASS_NAMES) == builtin.NUM_CLASSES == 10


def test_deterministic_given_the_seed():
    a, la = builtin.generate(50, seed=3)
    b, lb = builtin.generate(50, seed=3)
    c, _ = builtin.generate(50, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_boxes_are_inside_and_objects_move_around():
    images, _, boxes = builtin.generate(300, seed=1, return_boxes=True)
    ymin, xmin, ymax, xmax = boxes.T
    assert np.all((ymin >= 0) & (ymin < ymax) & (ymax <= 1))
    assert np.all((xmin >= 0) & (xmin < xmax) & (xmax <= 1))
    sides = np.concatenate([ymax - ymin, xmax - xmin]) * 32
    assert sides.min() >= 4 and sides.max() <= 20
    centres = np.stack([ymin + ymax, xmin + xmax], 1) / 2 * 32
    assert centres.std(axis=0).min() > 3  # translation varies: position is not a cue


def test_the_box_holds_the_object():
    images, _, boxes = builtin.generate(50, seed=2, return_boxes=True)
    for image, (ymin, xmin, ymax, xmax) in zip(images, (boxes * 32).astype(int), strict=True):
        outside = np.ones((32, 32), bool)
        outside[ymin:ymax, xmin:xmax] = False
        inside_mean = image[~outside].mean(axis=0)
        outside_mean = image[outside].mean(axis=0)
        # The object's colour is >= 0.2 x 255 away from the background in every channel.
        assert np.abs(inside_mean - outside_mean).max() > 10


def test_other_image_sizes():
    images, _ = builtin.generate(4, seed=0, image_size=48)
    assert images.shape == (4, 48, 48, 3)


def test_image_size_from_the_config_reaches_the_data_and_the_model():
    import pytest

    import data
    from configs import builtin as builtin_config
    from configs import schema
    from errors import UserError

    config = builtin_config.get_config("resnet20")
    config.dataset.builtin_image_size = 16
    config.dataset.builtin_train_size, config.dataset.builtin_test_size = 20, 10
    info, specs = schema.validate(config)
    assert info.image_shape == (16, 16, 3) and specs[0].in_shape == (16, 16, 3)
    splits = data.load(config.dataset, seed=0)
    assert splits.train.images.shape == (20, 16, 16, 3)
    assert splits.test.images.shape == (10, 16, 16, 3)
    config.dataset.builtin_image_size = 4
    with pytest.raises(UserError, match="builtin_image_size=4: must be an integer >= 8"):
        schema.validate(config)


def test_clutter_scales_distractors_and_noise_and_keeps_the_objects():
    import pytest

    import data
    from configs import builtin as builtin_config
    from configs import schema
    from errors import UserError

    full, labels, boxes = builtin.generate(200, seed=2, return_boxes=True)
    half, labels_half, boxes_half = builtin.generate(200, seed=2, clutter=0.5, return_boxes=True)
    clean, labels_clean, boxes_clean = builtin.generate(200, seed=2, clutter=0, return_boxes=True)
    np.testing.assert_array_equal(labels, labels_clean)  # the same objects at any clutter
    np.testing.assert_array_equal(boxes, boxes_clean)
    np.testing.assert_array_equal(labels, labels_half)
    np.testing.assert_array_equal(boxes, boxes_half)
    # Without clutter, the background is the noiseless gradient: its second differences
    # along a row vanish (up to uint8 rounding) away from the object; with clutter they don't.
    rows = np.arange(32)
    ymin, xmin, ymax, xmax = (boxes * 32).T

    def background_roughness(images):
        values = []
        for image, y0, y1 in zip(images.astype(float), ymin, ymax, strict=True):
            free = (rows < int(y0) - 1) | (rows > int(np.ceil(y1)))
            values.append(np.abs(np.diff(image[free], n=2, axis=1)).mean())
        return np.mean(values)

    assert background_roughness(clean) < 1.0 < background_roughness(half)
    assert background_roughness(half) < background_roughness(full)
    config = builtin_config.get_config()
    config.dataset.builtin_clutter = 0.0
    config.dataset.builtin_train_size, config.dataset.builtin_test_size = 20, 10
    test = builtin.generate(10, seed=builtin.TEST_SEED, clutter=0)[0]
    np.testing.assert_array_equal(data.load(config.dataset, seed=0).test.images, test)
    for bad in (1.5, -0.1):
        config.dataset.builtin_clutter = bad
        with pytest.raises(UserError, match="builtin_clutter=.*must be a number in \\[0, 1\\]"):
            schema.validate(config)
