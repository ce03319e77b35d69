"""Boxes: IoU, the R-CNN box-regression parameterisation, greedy per-class NMS, checks.

A box is (x1, y1, x2, y2) in pixels, continuous coordinates: the pixel with column index i
covers [i, i + 1), so a box's width is x2 - x1 and a one-pixel box is (i, j, i + 1, j + 1).
(R-CNN's Caffe code used inclusive pixel indices, width x2 - x1 + 1; the continuous form is
COCO's and TFDS's, and needs no +1 anywhere.) Arrays hold boxes on their last axis, [..., 4].

`iou`, `encode` and `decode` work on NumPy or JAX arrays (and are jit-able); `nms` runs on the
host, after the network, through OpenCV.
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from errors import UserError


def area(boxes):
    """Returns [...] the area of each box; 0 for empty boxes (x2 <= x1 or y2 <= y1)."""
    xp = jnp if isinstance(boxes, jax.Array) else np
    w = xp.maximum(boxes[..., 2] - boxes[..., 0], 0)
    h = xp.maximum(boxes[..., 3] - boxes[..., 1], 0)
    return w * h


def iou(a, b):
    """Returns [N, M]: the intersection over union of every box of `a` [N, 4] with every box
    of `b` [M, 4] (0 where the union is empty). Vectorised, jit-able."""
    xp = jnp if isinstance(a, jax.Array) or isinstance(b, jax.Array) else np
    a, b = xp.asarray(a, dtype=xp.float32), xp.asarray(b, dtype=xp.float32)
    top_left = xp.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = xp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = xp.maximum(bottom_right - top_left, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0).astype(xp.float32)


def _centre_size(boxes, xp):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(proposals, targets):
    """Returns [..., 4] the regression targets (tx, ty, tw, th) that take each proposal P to
    its target box G (Girshick et al. 2014, arXiv 1311.2524, appendix C):

        tx = (Gx - Px) / Pw    ty = (Gy - Py) / Ph    tw = log(Gw / Pw)    th = log(Gh / Ph)

    with (x, y) the box centre and (w, h) its size. Proposals and targets must have positive
    width and height (an empty box has no scale: `check_boxes` catches them)."""
    xp = jnp if isinstance(proposals, jax.Array) or isinstance(targets, jax.Array) else np
    px, py, pw, ph = _centre_size(proposals, xp)
    gx, gy, gw, gh = _centre_size(targets, xp)
    return xp.stack([(gx - px) / pw, (gy - py) / ph, xp.log(gw / pw), xp.log(gh / ph)], axis=-1)


def decode(proposals, deltas, *, max_log_scale: float = float(np.log(1000.0 / 16))):
    """Returns [..., 4] the boxes that `deltas` (tx, ty, tw, th) make of `proposals`: the
    inverse of `encode`. tw, th are clipped at `max_log_scale` (as Detectron does) so that an
    untrained regressor cannot overflow exp()."""
    xp = jnp if isinstance(proposals, jax.Array) or isinstance(deltas, jax.Array) else np
    px, py, pw, ph = _centre_size(proposals, xp)
    tx, ty = deltas[..., 0], deltas[..., 1]
    tw = xp.minimum(deltas[..., 2], max_log_scale)
    th = xp.minimum(deltas[..., 3], max_log_scale)
    cx, cy = px + pw * tx, py + ph * ty
    w, h = pw * xp.exp(tw), ph * xp.exp(th)
    return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def clip(boxes, height: int, width: int):
    """Returns the boxes clipped to the image [0, width] x [0, height]."""
    xp = jnp if isinstance(boxes, jax.Array) else np
    limits = xp.asarray([width, height, width, height], dtype=boxes.dtype)
    return xp.clip(boxes, 0, limits)


def nms(boxes, scores, classes=None, *, threshold: float = 0.3) -> np.ndarray:
    """Greedy non-maximum suppression, per class: returns int [K], the indices of the kept
    boxes [N, 4] by decreasing score [N] (ties in input order). A box is kept unless a kept box
    of the same class (`classes` [N] int; None: one class) with a higher score overlaps it with
    IoU > `threshold` (R-CNN used 0.3 at test time).

    OpenCV's `cv2.dnn.NMSBoxesBatched` (C++) does the work: per class through its coordinate
    offset, with the same IoU as `iou` (widths x2 - x1). The boxes are moved to non-negative
    coordinates first (IoU does not change), which its offset between classes assumes."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    n = len(boxes)
    if n == 0:
        return np.zeros((0,), np.int64)
    classes = np.zeros(n, np.int32) if classes is None else np.asarray(classes, np.int32)
    xy = boxes[:, :2] - min(0.0, float(boxes.min()))
    xywh = np.concatenate([xy, boxes[:, 2:] - boxes[:, :2]], axis=1)
    kept = cv2.dnn.NMSBoxesBatched(
        xywh.tolist(), scores.tolist(), classes.tolist(), -np.inf, float(threshold)
    )
    kept = np.asarray(kept, np.int64).reshape(-1)
    return kept[np.argsort(-scores[kept], kind="stable")]


def check_boxes(boxes, *, height: int, width: int, what: str = "boxes") -> np.ndarray:
    """Returns `boxes` as float32 [N, 4] after checking them; raises UserError with one line
    naming the first bad box: NaN or infinite coordinates, x2 <= x1 or y2 <= y1 (empty), or a
    box outside the image [0, width] x [0, height]."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    bad = ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{what}[{i}] = {boxes[i].tolist()} has NaN or infinite coordinates")
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise UserError(
            f"{what}[{i}] = {boxes[i].tolist()} is empty: boxes are (x1, y1, x2, y2) with "
            "x2 > x1 and y2 > y1"
        )
    outside = (boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise UserError(
            f"{what}[{i}] = {boxes[i].tolist()} lies outside the {width}x{height} image"
        )
    return boxes
