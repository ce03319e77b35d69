"""R-CNN: the warp with context padding, fine-tuning labels and batches, the network (the
classifier with K + 1 scores and a box regressor), its batches, its config checks and its
initialisation from a classification run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import models
from detection import boxes, rcnn, regions, scenes
from detection import train as det_train
from errors import UserError


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


def _config(**overrides):
    c = configs.load("configs/detection.py:pooled_max,builtin,rcnn")
    configs.override(c, overrides)
    return c


def test_rcnn_is_the_classifier_with_k_plus_1_scores_and_a_box_regressor():
    c = _config()
    specs = det_train.validate(c)
    classifier = models.architecture(c.model, (32, 32, 3), 11)
    assert [s.name for s in specs] == [s.name for s in classifier] + ["bbox"]
    bbox = specs[-1]
    # the regressor reads the features that feed the class scores (pool3, flattened)
    assert bbox.inputs == ("flatten",) and bbox.in_shape == (4 * 4 * 128,)
    assert bbox.out_shape == (40,) and specs[-2].out_shape == (11,)
    model = rcnn.RCNN(specs, rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert params == sum(s.params for s in specs)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    rois = jnp.array([[0, 0, 40, 40], [10, 20, 60, 50], [5, 5, 30, 12]], jnp.float32)
    scores, deltas = model(images, rois, jnp.array([0, 1, 1]))
    assert scores.shape == (3, 11) and deltas.shape == (3, 10, 4)
    np.testing.assert_array_equal(np.asarray(scores), 0)  # the new class layer starts at zero
    # All-CNN-C's class scores come from a conv: the regressor flattens the map before it
    allconv = det_train.validate(configs.load("configs/detection.py:allcnn_c,builtin,rcnn"))
    assert allconv[-2].name == "bbox_flatten" and allconv[-2].inputs[0] != "conv9"


def test_rcnn_sees_only_the_warped_region():
    """Each RoI is classified from its warp alone: changing the image outside a box and its
    context leaves that RoI's outputs unchanged, and changes those of a RoI that sees it."""
    specs = det_train.validate(_config())
    model = rcnn.RCNN(specs, rngs=nnx.Rngs(1))
    # non-zero class scores, so that a change of the input can show
    model.classifier.layers["fc"].kernel[...] = 0.01 * jnp.ones_like(
        model.classifier.layers["fc"].kernel[...]
    )
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 64, 64, 3)).astype(np.float32)
    other = image.copy()
    other[:, 40:, 40:] += 3.0  # far from the first box (16 px + context), inside the second
    # the first box's warp with its context reads x, y in [0.7, 19.3]: inside the image, so
    # the fill (the image's mean, which the change moves) does not enter either
    rois = jnp.array([[2, 2, 18, 18], [30, 30, 60, 60]], jnp.float32)
    a = model(jnp.asarray(image), rois, jnp.zeros(2, jnp.int32))
    b = model(jnp.asarray(other), rois, jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(np.asarray(a[0][0]), np.asarray(b[0][0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a[1][0]), np.asarray(b[1][0]), atol=1e-5)
    assert np.abs(np.asarray(a[0][1]) - np.asarray(b[0][1])).max() > 1e-3


def test_rcnn_batches_draw_32_positives_over_all_images():
    data = scenes.builtin_scenes(8, seed=0, image_size=64)
    rng = np.random.default_rng(0)
    proposals = [
        np.concatenate([xy := rng.uniform(0, 40, (40, 2)), xy + rng.uniform(6, 24, (40, 2))], 1)
        for _ in range(8)
    ]
    std = (0.1, 0.1, 0.2, 0.2)
    pool = regions.label_pool(data, proposals, fg_iou=0.5, target_std=std)
    flat = regions.FlatPool.of(pool)
    assert len(flat.labels) == sum(len(r) for r in pool.rois)
    args = dict(batch_size=128, fg_fraction=0.25, flip=True, seed=3)
    a = regions.sample_regions(flat, data, 4, **args)
    b = regions.sample_regions(flat, data, 4, **args)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert (a["labels"] > 0).sum() == 32 and (a["labels"] == 0).sum() == 96
    assert a["image"].shape == (128, 64, 64, 3) and a["roi_image"].tolist() == list(range(128))
    assert not np.array_equal(a["rois"], regions.sample_regions(flat, data, 5, **args)["rois"])
    # every positive's target decodes to a ground-truth box of its scene, flipped with it
    decoded = boxes.decode(a["rois"], a["targets"] * np.asarray(std, np.float32))
    for r in np.flatnonzero(a["labels"] > 0):
        scene = [i for i in range(8) if np.array_equal(data.images[i], a["image"][r])]
        flipped = [i for i in range(8) if np.array_equal(data.images[i, :, ::-1], a["image"][r])]
        (i,) = scene or flipped
        gt = data.objects(i)[0]
        if not scene:
            gt = np.stack([64 - gt[:, 2], gt[:, 1], 64 - gt[:, 0], gt[:, 3]], 1)
        assert np.isclose(decoded[r], gt, atol=1e-3).all(-1).any(), r
    assert len({tuple(x) for x in a["rois"][a["labels"] > 0]}) > 4  # from several scenes


def test_rcnn_config_mistakes_are_one_line_errors():
    with pytest.raises(UserError, match="detection.mode: 'svm'"):
        det_train.validate(_config(**{"detection.mode": "svm"}))
    with pytest.raises(UserError, match="warp_size"):
        det_train.validate(_config(**{"detection.warp_size": -1}))
    with pytest.raises(UserError, match="method 'slow'"):
        configs.load("configs/detection.py:pooled_max,builtin,slow")
    with pytest.raises(UserError, match=r"PRESET\[,SCENES\[,MODE\]\]"):
        configs.load("configs/detection.py:pooled_max,builtin,rcnn,extra")
    assert det_train.warp_shape(_config(**{"dataset.name": "fashion_mnist"})) == (28, 28, 1)
    assert det_train.warp_shape(_config(**{"detection.warp_size": 48})) == (48, 48, 3)


def test_rcnn_starts_from_a_classification_run(workdir):
    """`workdir`: conftest's tiny pooled_max classifier on 32x32 built-in images."""
    from test_detection_fast_rcnn import start_from_classifier

    c = _config(**{"detection.backbone_workdir": str(workdir)})
    _, mesh, fresh, loaded = start_from_classifier(c, workdir)
    mine = nnx.to_pure_dict(loaded["params"])
    before = nnx.to_pure_dict(fresh["params"])
    for name in ("conv1", "conv2", "conv3"):
        assert not np.array_equal(mine["backbone"]["layers"][name]["kernel"],
                                  before["backbone"]["layers"][name]["kernel"])  # fmt: skip
    # the (K + 1)-way class layer and the regressor keep their initialisation
    np.testing.assert_array_equal(mine["classifier"]["layers"]["fc"]["kernel"],
                                  before["classifier"]["layers"]["fc"]["kernel"])  # fmt: skip
    np.testing.assert_array_equal(mine["bbox"]["kernel"], before["bbox"]["kernel"])
    other = _config(**{"detection.backbone_workdir": str(workdir), "dataset.name": "fashion_mnist"})
    other_specs = det_train.validate(other)
    other_state = det_train._init_program(other, other_specs, mesh)[0]()
    with pytest.raises(UserError, match="layer 'conv1' has"):
        det_train.with_pretrained_backbone(other_state, str(workdir), other, other_specs, mesh)


@pytest.mark.slow
def test_rcnn_trains_far_above_random_boxes(tmp_path):
    from test_detection_fast_rcnn import _random_boxes, end_to_end_overrides

    from detection import evaluate

    config = _config(**end_to_end_overrides(tmp_path))
    results = det_train.train_and_evaluate(config, tmp_path / "run")
    test = scenes.builtin_scenes(30, seed=scenes.TEST_SEED, image_size=96)
    truth = [test.objects(i) for i in range(len(test))]
    baseline = evaluate.coco_ap(truth, _random_boxes(test, np.random.default_rng(0)),
                                test.class_names, image_size=(96, 96))  # fmt: skip
    assert results["method"] == "rcnn"
    assert results["ap50"] > max(0.1, 10 * baseline["ap50"]), (results, baseline["ap50"])
    assert results["train_images_per_s"] == pytest.approx(results["train_rois_per_s"])


def test_test_flops_count_rcnn_per_proposal_and_fast_rcnn_backbone_once():
    rcnn_config = _config(**{"detection.test_proposals": 100})
    fast_config = configs.load("configs/detection.py:pooled_max,builtin,fast_rcnn")
    fast_config.detection.test_proposals = 100
    rcnn_specs, fast_specs = det_train.validate(rcnn_config), det_train.validate(fast_config)
    classifier = models.architecture(rcnn_config.model, (32, 32, 3), 11)
    box_layer = rcnn_specs[-1]
    assert box_layer.name == "bbox" and box_layer.flops > 0
    per_region = sum(s.flops for s in classifier) + box_layer.flops
    assert det_train.test_flops_per_image(rcnn_specs, rcnn_config) == 100 * per_region
    backbone = models.architecture(fast_config.model, (96, 96, 3), 10)[:8]  # conv1 .. relu3
    assert [s.name for s in backbone][-1] == "relu3"
    head = sum(s.flops for s in fast_specs[len(backbone) :])
    assert det_train.test_flops_per_image(fast_specs, fast_config) == (
        sum(s.flops for s in backbone) + 100 * head
    )


def test_inputs_can_be_normalised_as_the_backbone_classifier_learned(workdir):
    import data
    from evaluation import run as run_lib

    scenes_images = scenes.builtin_scenes(4, seed=0, image_size=64).images
    c = _config(**{"detection.backbone_workdir": str(workdir)})
    mean, std = det_train.input_stats(c, scenes_images)
    pixels = scenes_images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), atol=1e-5)
    c.detection.input_stats = "backbone"
    mean, std = det_train.input_stats(c, scenes_images)
    classifier = run_lib.read_config(workdir)
    splits = data.load(classifier.dataset, seed=classifier.seed)
    np.testing.assert_array_equal(mean, splits.mean)
    np.testing.assert_array_equal(std, splits.std)
    with pytest.raises(UserError, match="'backbone' needs detection.backbone_workdir"):
        det_train.validate(_config(**{"detection.input_stats": "backbone"}))


def test_over_kept_rois_runs_the_network_on_the_proposals_only():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    rois = jnp.asarray(rng.uniform(0, 90, (4 * 6, 4)), jnp.float32)
    roi_image = jnp.repeat(jnp.arange(4), 6)
    keep = jnp.asarray(rng.random(24) < 0.4)  # ~10 proposals among 24 slots
    calls = []

    def fn(r, i):
        jax.debug.callback(lambda: calls.append(1))
        return r.sum(-1) * (i + 1), r[:, :2]

    sums, corners = jax.jit(lambda r, i, k: regions.over_kept_rois(fn, r, i, k, chunk=6))(
        rois, roi_image, keep
    )
    want_sums, want_corners = fn(rois, roi_image)
    np.testing.assert_allclose(sums, np.where(keep, want_sums, 0), rtol=1e-6)
    np.testing.assert_allclose(corners, np.where(keep[:, None], want_corners, 0), rtol=1e-6)
    # fn runs once per 6 proposals (rounded up), not once per image's 6 slots
    calls.clear()
    jax.block_until_ready(regions.over_kept_rois(fn, rois, roi_image, keep, chunk=6))
    assert 0 < len(calls) == -(-int(keep.sum()) // 6) < 4
    # no proposal at all: nothing runs, every output is zero
    calls.clear()
    sums, _ = regions.over_kept_rois(fn, rois, roi_image, jnp.zeros(24, bool), chunk=6)
    assert not calls and not np.any(sums)
    with pytest.raises(ValueError, match="not a multiple of chunk=5"):
        regions.over_kept_rois(fn, rois, roi_image, keep, chunk=5)
