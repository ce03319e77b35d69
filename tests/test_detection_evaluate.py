"""detection.evaluate.coco_ap on toy cases with a known AP."""

import numpy as np
import pytest

from detection import evaluate
from errors import UserError

NAMES = ("a", "b")
SIZE = (100, 100)


def _truth():
    return [
        (np.array([[10, 10, 40, 40], [50, 50, 90, 80]], np.float32), np.array([0, 1])),
        (np.array([[0, 0, 20, 30]], np.float32), np.array([0])),
        (np.zeros((0, 4), np.float32), np.zeros(0, int)),  # an image without objects
    ]


def test_perfect_detections_score_one():
    truth = _truth()
    dets = [(b, np.linspace(0.9, 0.5, len(b)), c) for b, c in truth]
    r = evaluate.coco_ap(truth, dets, NAMES, image_size=SIZE)
    assert r["ap"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0)
    assert r["ap75"] == pytest.approx(1.0)
    assert r["per_class"] == pytest.approx({"a": 1.0, "b": 1.0})
    assert (r["images"], r["objects"], r["detections"]) == (3, 3, 3)
    assert r["pr50"] == {"a": [1.0] * 101, "b": [1.0] * 101}  # the curves behind AP50


def test_a_false_positive_above_a_true_one_halves_the_ap():
    truth = [(np.array([[10, 10, 40, 40]], np.float32), np.array([0]))]
    fp, tp = [60, 60, 90, 90], [10, 10, 40, 40]
    dets = [(np.array([fp, tp], np.float32), np.array([0.9, 0.8]), np.array([0, 0]))]
    r = evaluate.coco_ap(truth, dets, NAMES, image_size=SIZE)
    # precision 1/2 at recall 1, so the interpolated precision is 1/2 at every recall point
    assert r["ap"] == pytest.approx(0.5) and r["ap50"] == pytest.approx(0.5)
    assert set(r["per_class"]) == {"a"}  # class b has no ground truth: no AP
    assert r["pr50"] == {"a": [0.5] * 101}


def test_two_objects_with_a_false_positive_between_them():
    truth = [(np.array([[10, 10, 40, 40], [50, 50, 90, 80]], np.float32), np.array([0, 0]))]
    dets = [
        (
            np.array([[10, 10, 40, 40], [0, 60, 20, 90], [50, 50, 90, 80]], np.float32),
            np.array([0.9, 0.8, 0.7]),
            np.array([0, 0, 0]),
        )
    ]
    r = evaluate.coco_ap(truth, dets, NAMES, image_size=SIZE)
    # PR points: (1/2, 1), (1/2, 1/2), (1, 2/3); COCO's 101 recall points: 0..0.5 (51 of them)
    # at precision 1, 0.51..1 (50) at 2/3
    assert r["ap"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_a_loose_box_counts_at_low_iou_only():
    truth = [(np.array([[0, 0, 40, 40]], np.float32), np.array([1]))]
    dets = [(np.array([[0, 0, 40, 60]], np.float32), np.array([0.9]), np.array([1]))]  # IoU 2/3
    r = evaluate.coco_ap(truth, dets, NAMES, image_size=SIZE)
    assert r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(0.0)
    assert r["ap"] == pytest.approx(0.4)  # thresholds .50 .55 .60 .65 of the ten


def test_no_detections_and_bad_input():
    truth = _truth()
    empty = [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))] * 3
    assert evaluate.coco_ap(truth, empty, NAMES, image_size=SIZE)["ap"] == 0.0
    with pytest.raises(UserError, match=r"ground truth of image 0: boxes\[0\].*empty"):
        evaluate.coco_ap([(np.array([[5, 5, 1, 9]]), np.array([0]))], empty[:1], NAMES,
                         image_size=SIZE)  # fmt: skip
    nan = [(np.array([[np.nan, 0, 1, 1]]), np.array([0.5]), np.array([0]))]
    with pytest.raises(UserError, match="NaN"):
        evaluate.coco_ap(truth[:1], nan, NAMES, image_size=SIZE)
    with pytest.raises(UserError, match=r"classes span \[2, 2\], outside \[0, 2\)"):
        evaluate.coco_ap(truth[:1], [(np.zeros((1, 4)), np.ones(1), np.array([2]))], NAMES,
                         image_size=SIZE)  # fmt: skip
    with pytest.raises(UserError, match=r"ground truth of image 0: boxes\[0\].*outside"):
        evaluate.coco_ap([(np.array([[50, 50, 120, 90]]), np.array([0]))], empty[:1], NAMES,
                         image_size=SIZE)  # fmt: skip
    with pytest.raises(UserError, match="no ground-truth"):
        evaluate.coco_ap(truth[2:], empty[:1], NAMES, image_size=SIZE)
    # the VOC AP refuses the same input, not scoring it in silence
    one = [(np.array([[10.0, 10, 30, 30]]), np.array([0.9]), np.array([0]))]
    with pytest.raises(UserError, match=r"ground truth of image 0: boxes\[0\].*empty"):
        evaluate.voc_ap([(np.array([[5, 5, 1, 9]]), np.array([0]))], one, NAMES, image_size=SIZE)
    with pytest.raises(UserError, match="NaN"):
        evaluate.voc_ap(truth[:1], nan, NAMES, image_size=SIZE)
    with pytest.raises(UserError, match=r"detections of image 0: classes span \[2, 2\]"):
        evaluate.voc_ap(truth[:1], [(np.zeros((1, 4)), np.ones(1), np.array([2]))], NAMES,
                        image_size=SIZE)  # fmt: skip
    with pytest.raises(UserError, match="2 boxes, 1 scores, 1 classes"):
        evaluate.voc_ap(truth[:1], [(np.zeros((2, 4)), np.ones(1), np.array([0]))], NAMES,
                        image_size=SIZE)  # fmt: skip
    with pytest.raises(UserError, match=r"boxes\[0\].*outside the 100x100 image"):
        evaluate.voc_ap([(np.array([[50, 50, 120, 90]]), np.array([0]))], one, NAMES,
                        image_size=SIZE)  # fmt: skip
