"""Detection AP through pycocotools: COCO-style AP@[.5:.95], AP50, AP75 and per-class AP.

    result = coco_ap(truth, detections, class_names)

`truth` is one (boxes [k, 4], classes [k]) pair per image (an image may have no objects),
`detections` one (boxes [d, 4], scores [d], classes [d]) triple per image, boxes (x1, y1, x2,
y2) in pixels (`detection.boxes`). Both are turned into COCO records in memory (bbox
[x, y, w, h]) and scored by `pycocotools.cocoeval.COCOeval` (its printing silenced), with at
most `max_detections` per image. Classes without ground truth get no AP (pycocotools' -1)
and are left out of the means, as in COCO.

Bad input is refused with one line (UserError): a ground-truth box that is empty, outside
the image or NaN, a detection with NaN coordinates or score, lengths that disagree, a class
outside [0, num_classes). Detection boxes are clipped to the image. No detections at all
gives AP 0 (pycocotools cannot load an empty result), no ground truth at all raises.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from detection import boxes as box_ops
from errors import UserError

Truth = tuple[np.ndarray, np.ndarray]  # boxes [k, 4], classes [k]
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [d, 4], scores [d], classes [d]


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _check_classes(classes: np.ndarray, num_classes: int, what: str) -> None:
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise UserError(f"{what}: classes span [{classes.min()}, {classes.max()}], outside "
                        f"[0, {num_classes})")  # fmt: skip


def _checked_truth(i: int, image_truth: Truth, image_size, num_classes: int) -> tuple:
    """Image `i`'s ground truth (boxes float32 [k, 4], classes int64 [k]), checked: UserError
    with one line for a bad box, a class outside [0, num_classes) or mismatched lengths."""
    height, width = image_size
    gt_boxes, gt_classes = image_truth
    gt_boxes = box_ops.check_boxes(
        gt_boxes, height=height, width=width, what=f"ground truth of image {i}: boxes"
    )
    gt_classes = np.asarray(gt_classes, np.int64).reshape(-1)
    if len(gt_classes) != len(gt_boxes):
        raise UserError(f"image {i}: {len(gt_boxes)} boxes, {len(gt_classes)} classes")
    _check_classes(gt_classes, num_classes, f"ground truth of image {i}")
    return gt_boxes, gt_classes


def _checked_detections(i: int, image_detections: Detections, num_classes: int) -> tuple:
    """Image `i`'s detections (boxes float32 [d, 4], scores float32 [d], classes int64 [d]),
    checked: UserError with one line for mismatched lengths, NaN or infinite boxes or scores,
    a class outside [0, num_classes)."""
    boxes, scores, classes = image_detections
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    classes = np.asarray(classes, np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise UserError(
            f"detections of image {i}: {len(boxes)} boxes, {len(scores)} scores, "
            f"{len(classes)} classes"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise UserError(f"detections of image {i}: NaN or infinite boxes or scores")
    _check_classes(classes, num_classes, f"detections of image {i}")
    return boxes, scores, classes


def _coco_truth(i: int, image_truth: Truth, image_size, num_classes: int, so_far) -> list:
    """COCO annotations of image `i`'s ground truth (ids continue from `so_far`)."""
    gt_boxes, gt_classes = _checked_truth(i, image_truth, image_size, num_classes)
    return [
        {
            "id": len(so_far) + k + 1,
            "image_id": i + 1,
            "category_id": int(c) + 1,
            "bbox": [float(v) for v in box],
            "area": float(box[2] * box[3]),
            "iscrowd": 0,
        }
        for k, (box, c) in enumerate(zip(_xywh(gt_boxes), gt_classes, strict=True))
    ]


def _coco_detections(i: int, image_detections: Detections, image_size, num_classes) -> list:
    """COCO results of image `i`'s detections, boxes clipped to the image."""
    height, width = image_size
    boxes, scores, classes = _checked_detections(i, image_detections, num_classes)
    xywh = _xywh(box_ops.clip(boxes, height, width))
    return [
        {"image_id": i + 1, "category_id": int(c) + 1, "bbox": [float(v) for v in box],
         "score": float(sc)}
        for box, sc, c in zip(xywh, scores, classes, strict=True)
    ]  # fmt: skip


def coco_ap(
    truth: Sequence[Truth],
    detections: Sequence[Detections],
    class_names: Sequence[str],
    *,
    image_size: tuple[int, int],
    max_detections: int = 100,
) -> dict:
    """Returns {'ap': AP@[.5:.95], 'ap50', 'ap75', 'per_class': {name: AP@[.5:.95]},
    'per_class_ap50': {...}, 'pr50': {name: precision at COCO's 101 recall points
    (0, 0.01, ..., 1) at IoU 0.5, interpolated as COCO does, 0 beyond the highest recall},
    'images', 'objects', 'detections'} for images of `image_size` (height, width)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(detections):
        raise UserError(f"{len(detections)} detection lists for {len(truth)} images")
    height, width = image_size
    images, annotations, results = [], [], []
    for i, (image_truth, image_detections) in enumerate(zip(truth, detections, strict=True)):
        images.append({"id": i + 1, "height": height, "width": width})
        annotations += _coco_truth(i, image_truth, image_size, len(class_names), annotations)
        results += _coco_detections(i, image_detections, image_size, len(class_names))
    if not annotations:
        raise UserError("detection AP: the images hold no ground-truth boxes")
    summary = {"images": len(images), "objects": len(annotations), "detections": len(results)}
    if not results:
        zeros = {name: 0.0 for c, name in enumerate(class_names)}
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "per_class": zeros,
                "per_class_ap50": dict(zeros), "pr50": {}, **summary}  # fmt: skip
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(class_names)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision [T IoU thresholds, R recall points, K classes, A areas, M maxDets]; area 'all',
    # the largest maxDets; -1 marks a class without ground truth
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_class, per_class_50, pr50 = {}, {}, {}
    for c, name in enumerate(class_names):
        p = precision[:, :, c]
        if (p > -1).any():
            per_class[name] = float(p[p > -1].mean())
            per_class_50[name] = float(p[0][p[0] > -1].mean())
            pr50[name] = [round(float(v), 4) for v in p[0]]
    stats = evaluation.stats
    return {
        "ap": float(stats[0]),
        "ap50": float(stats[1]),
        "ap75": float(stats[2]),
        "per_class": per_class,
        "per_class_ap50": per_class_50,
        "pr50": pr50,
        **summary,
    }


def voc_ap(
    truth: Sequence[Truth],
    detections: Sequence[Detections],
    class_names: Sequence[str],
    *,
    image_size: tuple[int, int],
    iou_threshold: float = 0.5,
) -> dict:
    """Returns {'map': the mean over classes with ground truth, 'per_class': {name: AP}}: the
    PASCAL VOC 2007 11-point interpolated AP (the R-CNN and Fast R-CNN papers' measure).

    Per class, detections of every image are ranked by score; each is a true positive if it
    overlaps a not yet matched ground-truth box of its class and image with IoU >=
    `iou_threshold` (the most-overlapping one), else a false positive. AP = the mean over
    recall levels t = 0, 0.1, ..., 1 of the highest precision at recall >= t (0 if none).
    No 'difficult' objects here (the scenes have none); IoU in the continuous convention.
    UserError with one line for the bad input `coco_ap` refuses (images of `image_size`,
    height and width).
    """
    if len(truth) != len(detections):
        raise UserError(f"{len(detections)} detection lists for {len(truth)} images")
    n = len(class_names)
    truth = [_checked_truth(i, t, image_size, n) for i, t in enumerate(truth)]
    detections = [_checked_detections(i, d, n) for i, d in enumerate(detections)]
    per_class = {}
    for c, name in enumerate(class_names):
        gt = [boxes[classes == c] for boxes, classes in truth]  # checked arrays, above
        total = sum(len(g) for g in gt)
        if not total:
            continue
        found = [
            (float(scores[j]), i, boxes[j])
            for i, (boxes, scores, classes) in enumerate(detections)
            for j in np.flatnonzero(classes == c)
        ]
        found.sort(key=lambda item: -item[0])
        used = [np.zeros(len(g), bool) for g in gt]
        hits = np.zeros(len(found))
        for rank, (_, i, box) in enumerate(found):
            if not len(gt[i]):
                continue
            overlaps = box_ops.iou(box[None], gt[i])[0]
            best = int(overlaps.argmax())
            if overlaps[best] >= iou_threshold and not used[i][best]:
                used[i][best] = True
                hits[rank] = 1
        tp = np.cumsum(hits)
        recall = tp / total
        precision = tp / np.arange(1, len(found) + 1) if len(found) else np.zeros(0)
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0
                  for t in np.linspace(0, 1, 11)]  # fmt: skip
        per_class[name] = float(np.mean(points))
    if not per_class:
        raise UserError("VOC AP: the images hold no ground-truth boxes")
    return {"map": float(np.mean(list(per_class.values()))), "per_class": per_class}
