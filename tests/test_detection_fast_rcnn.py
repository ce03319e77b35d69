"""Fast R-CNN: the detector's layers, its loss, the RoI batches, the VOC AP, the config
checks, and a short end-to-end run on built-in scenes against a random-box baseline."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import data
import models
from detection import evaluate, fast_rcnn, regions, scenes
from detection import train as det_train
from errors import UserError
from models import roi


def _config(**overrides):
    c = configs.load("configs/detection.py:pooled_max")
    configs.override(c, overrides)
    return c


def test_backbone_is_the_presets_conv_layers_without_the_last_max_pool():
    specs = models.architecture(models.preset("pooled_max"), (96, 96, 3), 10)
    names = [s.name for s in fast_rcnn.backbone_specs(models.preset("pooled_max"), (96, 96, 3))]
    assert names == [s.name for s in specs[: names.index("relu3") + 1]]
    assert "pool3" not in names and names[-1] == "relu3"
    # All-CNN-C's last conv computes class maps: it is left out with what follows it
    allconv = fast_rcnn.backbone_specs(models.preset("allcnn_c"), (96, 96, 3))
    assert "conv9" not in [s.name for s in allconv] and allconv[-1].out_shape[2] == 192
    resnet = fast_rcnn.backbone_specs(models.preset("resnet20"), (96, 96, 3))
    assert resnet[-1].out_shape == (24, 24, 64)


def test_detector_specs_and_module_agree():
    c = _config()
    specs = fast_rcnn.detector_specs(c.model, (96, 96, 3), 10, c.detection)
    by_name = {s.name: s for s in specs}
    assert by_name["roi_pool"].out_shape == (7, 7, 128) and by_name["roi_pool"].jump == 4
    assert by_name["cls"].out_shape == (11,) and by_name["bbox"].out_shape == (40,)
    model = fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0))
    images = jnp.zeros((2, 96, 96, 3))
    rois = jnp.array([[0, 0, 40, 40], [10, 20, 60, 90], [5, 5, 30, 12]], jnp.float32)
    scores, deltas = model(images, rois, jnp.array([0, 1, 1]))
    assert scores.shape == (3, 11) and deltas.shape == (3, 10, 4)
    np.testing.assert_array_equal(np.asarray(scores), 0)  # the scores start at zero
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert params == sum(s.params for s in specs)


def test_roi_align_detector_pools_with_roi_align():
    c = _config(**{"detection.roi_pool": "align", "detection.roi_size": 3})
    specs = fast_rcnn.detector_specs(c.model, (64, 64, 3), 10, c.detection)
    assert {s.name: s for s in specs}["roi_pool"].function == "align"
    model = fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0))
    model.cls.kernel[...] = jax.random.normal(jax.random.key(1), model.cls.kernel.shape)
    images = jax.random.uniform(jax.random.key(2), (1, 64, 64, 3))
    rois, first = jnp.array([[4.3, 4.0, 36.6, 36.1]], jnp.float32), jnp.array([0])
    features = model.features(images)
    scores = model.head(features, rois, first)[0]
    for pool, same in ((roi.roi_align, True), (roi.roi_max_pool, False)):
        pooled = pool(features[0][1], rois, first, (3, 3), spatial_scale=1 / 4)
        assert np.allclose(model.cls(model.trunk(pooled)), scores, rtol=1e-5, atol=1e-6) == same
    with pytest.raises(UserError, match="roi_pool: 'avg': max or align"):
        det_train.validate(_config(**{"detection.roi_pool": "avg"}))


def test_pyramid_level_is_the_scale_closest_to_the_target_size():
    # sizes (sqrt of area) 12, 24, 48 and 10x40 (20); levels 0.5, 1, 2; target 24 px
    rois = jnp.array([[0, 0, 12, 12], [4, 4, 28, 28], [0, 0, 48, 48], [0, 0, 10, 40]], jnp.float32)
    level = fast_rcnn.pyramid_level(rois, (0.5, 1.0, 2.0), 24.0)
    # 12 px x 2 = 24; 24 x 1; 48 x 0.5; 20: x1 -> 20 (log gap 0.18), x2 -> 40 (0.51)
    np.testing.assert_array_equal(np.asarray(level), [2, 1, 0, 1])
    assert fast_rcnn.pyramid_sizes((96, 96), (0.5, 0.71, 1.0)) == [
        ((48, 48), 0.5),
        ((68, 68), 68 / 96),
        ((96, 96), 1.0),
    ]


def test_pyramid_pools_each_roi_from_its_level_as_one_scale_would_there():
    """A RoI assigned to the half-size level scores as the one-scale detector (same weights)
    scores the half-size image with the RoI halved; one at full size as on the image."""
    c = _config(**{"detection.roi_size": 3})
    specs = fast_rcnn.detector_specs(c.model, (64, 64, 3), 10, c.detection)
    pyramid = fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0), scales=(0.5, 1.0), target=16.0)
    single = fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0))
    for model in (pyramid, single):  # scores start at zero: give them weights to compare
        model.cls.kernel[...] = jax.random.normal(jax.random.key(1), model.cls.kernel.shape)
    images = jax.random.uniform(jax.random.key(2), (2, 64, 64, 3))
    rois = jnp.array([[4, 4, 36, 36], [20, 8, 36, 24]], jnp.float32)  # 32 px, 16 px
    roi_image = jnp.array([0, 1])
    np.testing.assert_array_equal(
        np.asarray(fast_rcnn.pyramid_level(rois, (0.5, 1.0), 16.0)), [0, 1]
    )
    scores, deltas = pyramid(images, rois, roi_image)
    half = jax.image.resize(images, (2, 32, 32, 3), "linear")
    big_scores, big_deltas = single(half, rois[:1] * 0.5, roi_image[:1])
    small_scores, small_deltas = single(images, rois[1:], roi_image[1:])
    np.testing.assert_allclose(scores[0], big_scores[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores[1], small_scores[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas[0], big_deltas[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas[1], small_deltas[0], rtol=1e-5, atol=1e-5)
    # both levels get gradients in training: each from its own RoIs
    grads = nnx.grad(lambda m: jnp.sum(m(images, rois, roi_image)[0] ** 2))(pyramid)
    assert float(jnp.abs(grads["backbone"]["layers"]["conv1"]["kernel"][...]).sum()) > 0


def test_roi_context_pools_the_region_r_cnns_warp_shows():
    """With detection.roi_context each RoI is pooled from its box scaled about its centre by
    R-CNN's warp size over the warp less its context padding (32/(32 - 2 x 16 x 32/227) on
    the built-in scenes): the same scores as the detector without context on those boxes,
    different from its scores on the boxes themselves; the pyramid level stays the box's."""
    c = _config(**{"detection.roi_size": 3, "detection.roi_context": True})
    factor = det_train.roi_context(c)
    assert factor == pytest.approx(32 / (32 - 2 * 16 * 32 / 227))
    assert det_train.roi_context(_config()) == 1.0
    specs = fast_rcnn.detector_specs(c.model, (64, 64, 3), 10, c.detection)
    wide = fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0), context=factor)
    plain = fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0))
    for model in (wide, plain):  # scores start at zero: give them weights to compare
        model.cls.kernel[...] = jax.random.normal(jax.random.key(1), model.cls.kernel.shape)
    images = jax.random.uniform(jax.random.key(2), (1, 64, 64, 3))
    rois, first = jnp.array([[10, 12, 34, 40], [0, 0, 30, 30]], jnp.float32), jnp.array([0, 0])
    scaled = fast_rcnn.scale_boxes(rois, factor)
    np.testing.assert_allclose(  # centres kept, sides x factor
        np.asarray(scaled[0]),
        [22 - 12 * factor, 26 - 14 * factor, 22 + 12 * factor, 26 + 14 * factor],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        wide(images, rois, first)[0], plain(images, scaled, first)[0], rtol=1e-5
    )
    assert not np.allclose(wide(images, rois, first)[0], plain(images, rois, first)[0], rtol=1e-3)
    pyramid = fast_rcnn.FastRCNN(
        specs, rngs=nnx.Rngs(0), scales=(0.5, 1.0), target=16.0, context=1.2
    )
    one_level = fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0), scales=(1.0,), context=1.2)
    small = jnp.array([[20, 8, 36, 24]], jnp.float32)  # 16 px: level 1.0 (19 px with context)
    for model in (pyramid, one_level):
        model.cls.kernel[...] = jax.random.normal(jax.random.key(1), model.cls.kernel.shape)
    np.testing.assert_allclose(
        pyramid(images, small, first[:1])[0], one_level(images, small, first[:1])[0], rtol=1e-5
    )
    with pytest.raises(UserError, match="roi_context: is Fast R-CNN's"):
        det_train.validate(_config(**{"detection.roi_context": True, "detection.mode": "rcnn"}))
    with pytest.raises(ValueError, match="context 0.5 must be >= 1"):
        fast_rcnn.FastRCNN(specs, rngs=nnx.Rngs(0), context=0.5)


def test_pyramid_flops_count_the_backbone_at_every_level():
    one = _config(**{"detection.test_proposals": 100})
    two = _config(**{"detection.test_proposals": 100, "detection.pyramid_scales": (0.5, 1.0)})
    specs = det_train.validate(one)
    assert det_train.validate(two) == specs  # the layers are the same; the levels are not
    at = [s.name for s in specs].index("roi_pool")
    full = sum(s.flops for s in specs[:at])
    half = sum(s.flops for s in fast_rcnn.backbone_specs(one.model, (48, 48, 3)))
    assert 0.2 * full < half < 0.3 * full
    extra = half + 100 * specs[at].flops  # the half-size backbone and a second pooling
    assert det_train.test_flops_per_image(specs, two) == pytest.approx(
        det_train.test_flops_per_image(specs, one) + extra
    )
    # the target: R-CNN's warp (32 px on the built-in scenes) less its context padding
    assert det_train.pyramid_target(two) == pytest.approx(32 - 2 * 16 * 32 / 227)


def test_loss_is_cross_entropy_plus_smooth_l1_on_foreground():
    scores = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    deltas = jnp.zeros((2, 2, 4)).at[1, 1].set(jnp.array([0.5, -2.0, 0.0, 0.0]))
    labels = jnp.array([0, 2])  # background, then class 1 (label 2)
    targets = jnp.zeros((2, 4))
    total, parts = fast_rcnn.loss(
        scores, deltas, labels, targets, jnp.ones(2), bbox_loss_weight=1.0
    )
    ce = [
        np.log(np.exp(s).sum()) - s[label]
        for s, label in zip(np.asarray(scores), [0, 2], strict=True)
    ]
    box = 0.5 * 0.5**2 + (2.0 - 0.5)  # smooth L1 of 0.5 and of -2
    np.testing.assert_allclose(float(parts["cls"]), np.mean(ce), rtol=1e-6)
    np.testing.assert_allclose(float(parts["bbox"]), box / 2, rtol=1e-6)
    np.testing.assert_allclose(float(total), np.mean(ce) + box / 2, rtol=1e-6)
    assert int(parts["correct"]) == 2


def test_voc_ap_on_a_case_computed_by_hand():
    truth = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0, 0]))]
    # ranked: hit, miss, hit -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    found = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31]])
    detections = [(found, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]))]
    result = evaluate.voc_ap(truth, detections, ("a", "b"), image_size=(64, 64))
    want = (6 * 1.0 + 5 * (2 / 3)) / 11  # t = 0..0.5: max precision 1; t = 0.6..1: 2/3
    assert result["per_class"] == {"a": pytest.approx(want)}
    assert result["map"] == pytest.approx(want)
    perfect = [(truth[0][0], np.ones(2), truth[0][1])]
    assert evaluate.voc_ap(truth, perfect, ("a",), image_size=(64, 64))["map"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="no ground-truth"):
        evaluate.voc_ap(
            [(np.zeros((0, 4)), np.zeros(0))], [perfect[0]], ("a",), image_size=(64, 64)
        )


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the empty RoI's target
def test_a_regression_target_that_is_not_finite_is_one_error_naming_the_scene():
    """An empty RoI labelled foreground (possible only with foreground_iou = 0, which the config
    refuses) has an infinite box-regression target: label_pool stops naming the scene and the
    RoI instead of training on it."""
    data = scenes.builtin_scenes(2, seed=0, image_size=64)
    empty = np.array([[10.0, 10.0, 10.0, 30.0]], np.float32)  # zero width
    proposals = [np.zeros((0, 4), np.float32), empty]
    std = (0.1, 0.1, 0.2, 0.2)
    with pytest.raises(
        UserError, match=r"training scene 1: .*\[10.0, 10.0, 10.0, 30.0\].*not finite"
    ):
        regions.label_pool(data, proposals, fg_iou=0.0, target_std=std)
    pool = regions.label_pool(data, proposals, fg_iou=0.5, target_std=std)  # as background
    assert pool.labels[1][0] == 0 and np.isfinite(pool.targets[1]).all()


def test_roi_batches_are_deterministic_with_the_sampled_fractions():
    data = scenes.builtin_scenes(6, seed=0, image_size=64)
    rng = np.random.default_rng(0)
    proposals = [
        np.concatenate([xy := rng.uniform(0, 40, (30, 2)), xy + rng.uniform(6, 24, (30, 2))], 1)
        for _ in range(6)
    ]
    pool = regions.label_pool(data, proposals, fg_iou=0.5, target_std=(0.1, 0.1, 0.2, 0.2))
    args = dict(batch_size=2, rois_per_image=16, fg_fraction=0.25, fg_iou=0.5, bg_iou_low=0.1,
                flip=True, seed=3)  # fmt: skip
    a, b = regions.sample_batch(pool, data, 5, **args), regions.sample_batch(pool, data, 5, **args)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["rois"].shape == (32, 4) and a["roi_image"].tolist() == [0] * 16 + [1] * 16
    for n, i in enumerate(regions.step_images(5, batch_size=2, num_images=6, seed=3)):
        # 25 % of 16 foreground, or all the image has (its ground-truth boxes at least)
        want = min(4, int((pool.labels[i] > 0).sum()))
        assert (a["labels"][a["roi_image"] == n] > 0).sum() == want
    assert not np.array_equal(a["rois"], regions.sample_batch(pool, data, 6, **args)["rois"])
    # the targets of foreground RoIs decode back to their ground-truth boxes
    i = regions.step_images(5, batch_size=2, num_images=6, seed=3)[0]
    fg = np.flatnonzero(pool.labels[i] > 0)
    decoded = fast_rcnn_decode(pool.rois[i][fg], pool.targets[i][fg])
    gt = data.objects(i)[0]
    assert np.isclose(decoded[:, None], gt[None]).all(-1).any(-1).all()
    # an epoch visits every image once
    seen = np.concatenate([regions.step_images(s, batch_size=2, num_images=6, seed=3)
                           for s in range(3)])  # fmt: skip
    assert sorted(seen) == list(range(6))


def fast_rcnn_decode(rois, targets):
    from detection import boxes

    return boxes.decode(rois, targets * np.array([0.1, 0.1, 0.2, 0.2], np.float32))


def test_config_mistakes_are_one_line_errors():
    for field, value, message in [
        ("detection.rois_per_image", 0, "rois_per_image: must be >= 1"),
        ("detection.background_iou_low", 0.6, "background_iou_low"),
        ("detection.bbox_target_std", (0.1, 0.1, 0.2), "bbox_target_std"),
        ("detection.proposal_mode", "slow", "proposal_mode"),
        ("detection.batchnorm", "fixed", r"batchnorm: 'fixed': train or frozen"),
        ("detection.pyramid_scales", (1.0, 1.0), "pyramid_scales: .* different scale factors"),
        ("detection.pyramid_scales", (0.0,), "pyramid_scales: .* > 0"),
        ("detection.pyramid_target", -1.0, "pyramid_target: must be >= 0"),
        ("optimizer.learning_rate", -1.0, "optimizer.learning_rate"),
    ]:
        with pytest.raises(UserError, match=message):
            det_train.validate(_config(**{field: value}))
    with pytest.raises(UserError, match="no convolutional layers"):
        det_train.validate(configs.load("configs/detection.py:mlp"))
    rcnn = configs.load("configs/detection.py:pooled_max,builtin,rcnn")
    rcnn.detection.pyramid_scales = (0.5, 1.0)
    with pytest.raises(UserError, match="an image pyramid is Fast R-CNN's"):
        det_train.validate(rcnn)
    with pytest.raises(UserError, match="scenes 'voc'"):
        configs.load("configs/detection.py:pooled_max,voc")


def test_a_run_saved_before_a_detection_field_existed_reads_with_its_default():
    saved = _config(**{"detection.roi_size": 3}).to_dict()
    del saved["detection"]["pyramid_scales"], saved["detection"]["pyramid_target"]
    config = configs.from_json(json.dumps(saved))
    assert config.detection.pyramid_scales == (1.0,) and config.detection.pyramid_target == 0
    assert config.detection.roi_size == 3  # what was saved stays
    det_train.validate(config)


def _random_boxes(data, rng):
    """A baseline detector: 20 random boxes per image, random classes and scores."""
    size = data.images.shape[1]
    out = []
    for _ in range(len(data)):
        corner = rng.uniform(0, size - 12, (20, 2))
        box = np.concatenate([corner, np.minimum(corner + rng.uniform(12, 36, (20, 2)), size)], 1)
        out.append((box, rng.random(20), rng.integers(0, 10, 20)))
    return out


def end_to_end_overrides(tmp_path) -> dict:
    """The short end-to-end budget both modes' tests train with: 100 training and 30 test
    built-in scenes, 250 steps, proposals cached under `tmp_path`."""
    return {
        "detection.train_scenes": 100,
        "detection.test_scenes": 30,
        "detection.proposal_upscale": 1.0,
        "detection.proposal_cache": str(tmp_path / "proposals"),
        "training.num_steps": 250,
        "training.eval_every_steps": 125,
        "training.checkpoint_every_steps": 125,
        "training.log_every_steps": 25,
        "training.progress": "none",
        "schedule.warmup_steps": 10,
    }


@pytest.mark.slow
def test_fast_rcnn_trains_far_above_random_boxes_and_resumes(tmp_path):
    config = _config(**end_to_end_overrides(tmp_path), **{"detection.hidden_dropout": 0.0})
    workdir = tmp_path / "run"
    results = det_train.train_and_evaluate(config, workdir)
    test = scenes.builtin_scenes(30, seed=scenes.TEST_SEED, image_size=96)
    truth = [test.objects(i) for i in range(len(test))]
    baseline = evaluate.coco_ap(truth, _random_boxes(test, np.random.default_rng(0)),
                                test.class_names, image_size=(96, 96))  # fmt: skip
    assert results["ap50"] > max(0.1, 10 * baseline["ap50"]), (results, baseline["ap50"])
    assert results["voc07_map"] > 0.1
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "test"] == [125, 250]
    assert (workdir / "results.json").is_file()
    # rerunning a finished run resumes at its last checkpoint and ends with the same numbers
    again = det_train.train_and_evaluate(config, workdir)
    assert again["ap50"] == results["ap50"] and again["steps"] == 250


def start_from_classifier(config, workdir):
    """(specs, mesh, a fresh state, that state with the backbone of the classification run
    in `workdir`) of the detector `config` (either mode)."""
    from training import runtime

    specs = det_train.validate(config)
    mesh = runtime.make_mesh()
    fresh = det_train._init_program(config, specs, mesh)[0]()
    loaded = det_train.with_pretrained_backbone(fresh, str(workdir), config, specs, mesh)
    return specs, mesh, fresh, loaded


def test_backbone_starts_from_a_classification_run(workdir):
    """`workdir`: conftest's tiny pooled_max classifier (train.py's workdir)."""
    from training import checkpoint, state

    c = _config(**{"detection.backbone_workdir": str(workdir)})
    specs, mesh, fresh, loaded = start_from_classifier(c, workdir)
    classifier = configs.from_json((workdir / "config.json").read_text())
    info = data.dataset_info(classifier.dataset)
    _, abstract = state.abstract_train_state(classifier, info, mesh)
    best = checkpoint.Checkpoints(workdir, keep=2, read_only=True).restore(abstract, "best")[1]
    mine, theirs = nnx.to_pure_dict(loaded["params"]), nnx.to_pure_dict(best["params"])
    for name in ("conv1", "conv2", "conv3"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(
                mine["backbone"]["layers"][name][leaf], theirs["layers"][name][leaf]
            )
    untouched = nnx.to_pure_dict(fresh["params"])["cls"]["kernel"]
    np.testing.assert_array_equal(mine["cls"]["kernel"], untouched)
    other = _config(**{"model.widths": (16, 32, 64)})
    with pytest.raises(UserError, match="another model.*widths"):
        det_train.with_pretrained_backbone(fresh, str(workdir), other, specs, mesh)


@pytest.mark.parametrize("mode", ["fast_rcnn", "rcnn"])
def test_frozen_batchnorm_keeps_its_statistics_and_still_learns_its_scale(tmp_path, mode):
    """detection.batchnorm: 'train' updates a BatchNorm backbone's running statistics from the
    detector's batches; 'frozen' normalises with them, leaves them as they are, and still
    trains the scale and offset."""
    ends = {}
    for how in ("train", "frozen"):
        config = _config(
            **{
                **end_to_end_overrides(tmp_path),
                "detection.mode": mode,
                "detection.batchnorm": how,
                "detection.train_scenes": 6,
                "detection.test_scenes": 2,
                "model.norm": "batch",
                "training.num_steps": 3,
                "training.eval_every_steps": 3,
                "training.checkpoint_every_steps": 3,
                "training.log_every_steps": 3,
            },
        )
        det_train.train_and_evaluate(config, tmp_path / how)
        run = det_train.setup(config, workdir=tmp_path / how, train=False)
        ends[how] = (
            nnx.to_pure_dict(run.state["batch_stats"]),
            nnx.to_pure_dict(run.state["params"]),
        )
        run.lock.release()
    stats = {how: jax.tree.leaves(ends[how][0]) for how in ends}
    assert stats["frozen"] and len(stats["frozen"]) == len(stats["train"])
    for leaf in stats["frozen"]:  # a fresh BatchNorm's: mean 0, variance 1
        assert np.all(leaf == 0) or np.all(leaf == 1)
    assert any(not (np.all(x == 0) or np.all(x == 1)) for x in stats["train"])
    scale = ends["frozen"][1]["backbone"]["layers"]["norm1"]["scale"]
    assert not np.all(scale == 1)  # the affine part learned


@pytest.mark.slow
def test_training_killed_or_stopped_resumes_to_the_uninterrupted_result(tmp_path):
    """`python -m detection train` killed (SIGKILL, at a random moment after its first
    metrics) and stopped (SIGTERM: the checkpoint saved, exit 143, one line saying to rerun),
    then rerun each time, ends with the uninterrupted run's AP figures and evaluations."""
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.test_train import metrics_size, wait_for_metrics

    args = [
        sys.executable,
        "-m",
        "detection",
        "train",
        "--config=configs/detection.py:pooled_max",
        "--config.detection.train_scenes=16",
        "--config.detection.test_scenes=6",
        "--config.detection.proposal_upscale=1.0",
        f"--config.detection.proposal_cache={tmp_path / 'proposals'}",
        "--config.detection.test_proposals=100",
        "--config.training.num_steps=48",
        "--config.training.eval_every_steps=24",
        "--config.training.checkpoint_every_steps=3",
        "--config.training.log_every_steps=3",
        "--config.training.progress=none",
        "--config.schedule.warmup_steps=2",
    ]
    root = Path(__file__).resolve().parent.parent
    logs = iter(range(100))

    def start(workdir) -> tuple[subprocess.Popen, Path]:
        """A run of `args` in `workdir`, its stderr in a file (a pipe nobody reads could fill)."""
        log = tmp_path / f"run{next(logs)}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [*args, f"--workdir={workdir}"], cwd=root, stdout=subprocess.DEVNULL, stderr=err
            )
        return proc, log

    def finish(workdir) -> str:
        proc, log = start(workdir)
        try:
            code = proc.wait(timeout=600)
        finally:
            proc.kill()
        assert code == 0, log.read_text()[-2000:]
        return log.read_text()

    def start_and_wait(workdir) -> tuple[subprocess.Popen, Path]:
        """Starts a run and returns it once it has written a new metrics line."""
        before = metrics_size(workdir)
        proc, log = start(workdir)
        grown = wait_for_metrics(proc, workdir, since=before, timeout=600)
        if not grown or proc.poll() is not None:
            proc.kill()
        assert grown and proc.poll() is None, log.read_text()[-2000:]
        return proc, log

    finish(tmp_path / "ref")
    workdir = tmp_path / "interrupted"
    proc, _ = start_and_wait(workdir)
    time.sleep(random.Random(0).uniform(0.0, 0.2))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # it was still training
    proc, log = start_and_wait(workdir)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    err = log.read_text()
    assert code == 143, err[-2000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err, err[-2000:]
    assert "resuming from the checkpoint of step" in finish(workdir)  # not from scratch

    def outcome(workdir):
        results = json.loads((workdir / "results.json").read_text())
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        evaluations = [
            {k: r[k] for k in ("step", "split", "ap", "ap50")}
            for r in records
            if r["split"] != "train"
        ]
        figures = {k: results[k] for k in ("steps", "ap", "ap50", "ap75", "voc07_map")}
        return figures, results["final"]["test"]["per_class_ap"], evaluations

    assert outcome(workdir) == outcome(tmp_path / "ref")


def test_scores_that_are_not_finite_stop_the_evaluation_instead_of_scoring_zero():
    """A diverged detector's NaN scores would fail every score threshold and leave AP 0
    without a word: detections_of stops with one line; NaN in padding slots is ignored."""
    d = _config().detection
    probs = np.full((3, 11), 1 / 11, np.float32)
    boxes = np.tile(np.array([10, 10, 40, 40], np.float32), (3, 10, 1))
    valid = np.array([True, True, False])
    probs[2], boxes[2] = np.nan, np.nan  # padding
    assert len(det_train.detections_of(probs, boxes, valid, d)[0]) > 0
    for array in (probs, boxes):
        kept = array[1].copy()
        array[1] = np.nan
        with pytest.raises(UserError, match="not finite.*earlier checkpoint"):
            det_train.detections_of(probs, boxes, valid, d)
        array[1] = kept
