"""Boxes: IoU, the R-CNN box-regression parameterisation, greedy per-class NMS, checks.

A box is (x1, y1, x2, y2) in pixels, continuous coordinates: the pixel with column index i
covers [i, i + 1), so a box's width is x2 - x1 and a one-pixel box is (i, j, i + 1, j + 1).
(R-CNN's Caffe code used inclusive pixel indices, width x2 - x1 + 1; the continuous form is
COCO's and TFDS's, and needs no +1 anywhere.) Arrays hold boxes on their last axis, [..., 4].

Everything here works on NumPy arrays or JAX arrays (`iou`, `encode`, `decode`, `nms_mask`
are jit-able); `nms` is the NumPy convenience around `nms_mask` that returns indices.
"""

from __future__ import annotations

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


def nms_mask(boxes, scores, classes=None, *, threshold: float = 0.3, valid=None) -> jax.Array:
    """Greedy non-maximum suppression, per class; jit-able (fixed shapes).

    Visits the boxes [N, 4] by decreasing score [N] and keeps a box unless a kept box of the
    same class (`classes` [N] int; None: one class) overlaps it with IoU > `threshold`.
    `valid` [N] bool leaves boxes out altogether (padding). Returns bool [N] in the input's
    order: True for the kept boxes. R-CNN used threshold 0.3 at test time.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros((0,), bool)
    classes = jnp.zeros((n,), jnp.int32) if classes is None else jnp.asarray(classes)
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    order = jnp.argsort(-scores, stable=True)
    b, c, v = boxes[order], classes[order], valid[order]
    # suppresses[j, i]: box j (earlier, higher score) suppresses box i if j is kept
    suppresses = (iou(b, b) > threshold) & (c[:, None] == c[None, :])
    suppresses &= jnp.arange(n)[:, None] < jnp.arange(n)[None, :]

    def visit(i, keep):
        return keep.at[i].set(v[i] & ~jnp.any(keep & suppresses[:, i]))

    keep = jax.lax.fori_loop(0, n, visit, jnp.zeros((n,), bool))
    return jnp.zeros((n,), bool).at[order].set(keep)


_nms_mask_jit = jax.jit(nms_mask)


def nms(boxes, scores, classes=None, *, threshold: float = 0.3) -> np.ndarray:
    """Returns int [K]: the indices of the boxes `nms_mask` keeps, by decreasing score.

    Compiled once per power-of-two size bucket (the boxes are padded with invalid ones)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32)
    n = len(boxes)
    if n == 0:
        return np.zeros((0,), np.int64)
    classes = np.zeros(n, np.int32) if classes is None else np.asarray(classes, np.int32)
    bucket = max(16, 1 << (n - 1).bit_length())
    pad = bucket - n
    keep = _nms_mask_jit(
        np.pad(boxes, ((0, pad), (0, 0))),
        np.pad(scores, (0, pad), constant_values=-np.inf),
        np.pad(classes, (0, pad)),
        threshold=np.float32(threshold),
        valid=np.arange(bucket) < n,
    )
    keep = np.asarray(keep)[:n]
    kept = np.flatnonzero(keep)
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
