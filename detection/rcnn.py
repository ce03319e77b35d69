"""R-CNN's pieces (Girshick et al. 2014, arXiv 1311.2524): the warp of proposals with context
padding to the classifier's input, and the fine-tuning labels and batches.

`warp` is batched and jit-compiled: every proposal of a batch is resampled at once
(bilinear, `jax.scipy.ndimage.map_coordinates` vmapped over boxes), never a Python loop per
box. The paper's context padding: the box is dilated so that, once warped to the input
size, `16 * size / 227` pixels of the image surround it (16 px at 227, section 2.1 and
appendix A); samples outside the image take the image's mean (the paper's choice).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from detection import boxes as box_ops

PAPER_INPUT = 227
PAPER_CONTEXT = 16


def context_pixels(size: int) -> float:
    """The context padding at input side `size`: the paper's 16 px at 227, scaled."""
    return PAPER_CONTEXT * size / PAPER_INPUT


def _warp_one(image, box, fill, size, context):
    # the box maps onto [context, size - context) of the output; the rest is context
    x1, y1, x2, y2 = box[0], box[1], box[2], box[3]
    inner = size - 2 * context
    sx, sy = (x2 - x1) / inner, (y2 - y1) / inner  # image pixels per output pixel
    grid = jnp.arange(size, dtype=jnp.float32) + 0.5 - context  # output pixel centres
    xs = x1 + grid * sx - 0.5  # image coordinates of the sample, pixel centres at i + 0.5
    ys = y1 + grid * sy - 0.5
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")

    def channel(c):
        # samples outside the image read 0 of (image - fill), i.e. the fill
        centred = image[..., c] - fill[c]
        sampled = jax.scipy.ndimage.map_coordinates(centred, [yy, xx], order=1, mode="constant")
        return sampled + fill[c]

    return jax.vmap(channel, out_axes=-1)(jnp.arange(image.shape[-1]))


@functools.partial(jax.jit, static_argnames=("size", "context"))
def warp(
    images: jax.Array,
    boxes: jax.Array,
    batch_index: jax.Array,
    *,
    size: int,
    context: float | None = None,
) -> jax.Array:
    """Returns float32 [R, size, size, C]: proposal r (`boxes` [R, 4], image pixels) of image
    `batch_index[r]` of `images` [B, H, W, C], warped with context padding (default: the
    paper's, `context_pixels(size)`)."""
    context = context_pixels(size) if context is None else context
    images = images.astype(jnp.float32)
    fill = images.mean(axis=(1, 2))  # [B, C]
    return jax.vmap(lambda b, box: _warp_one(images[b], box, fill[b], size, context))(
        batch_index, boxes.astype(jnp.float32)
    )


def label_proposals(
    proposals: np.ndarray,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    *,
    positive_iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (labels int32 [R]: 1 + the class of the best-overlapping ground-truth box if
    its IoU >= `positive_iou`, else 0 (background); matched boxes float32 [R, 4]; max IoU
    [R]) of each proposal, as R-CNN's fine-tuning labels them. An image without objects:
    every proposal is background."""
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    if not len(gt_boxes):
        n = len(proposals)
        return np.zeros(n, np.int32), np.zeros((n, 4), np.float32), np.zeros(n, np.float32)
    overlaps = box_ops.iou(proposals, gt_boxes)
    best = overlaps.argmax(axis=1)
    max_iou = overlaps[np.arange(len(proposals)), best]
    labels = np.where(max_iou >= positive_iou, np.asarray(gt_classes)[best] + 1, 0)
    return labels.astype(np.int32), gt_boxes[best], max_iou.astype(np.float32)


def sample_batch(
    rng: np.random.Generator, labels: np.ndarray, *, batch_size: int = 128, positives: int = 32
) -> np.ndarray:
    """Returns `batch_size` indices into `labels` (a pool of labelled proposals, 0 =
    background): up to `positives` foreground ones (the paper's 32 of 128), the rest
    background, each drawn uniformly without replacement while the pool lasts (then with
    it). Fewer positives in the pool: more background."""
    labels = np.asarray(labels)
    fg, bg = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
    n_fg = min(positives, len(fg))
    if not len(bg):
        n_fg = batch_size
    picks = [rng.choice(fg, n_fg, replace=n_fg > len(fg))] if n_fg else []
    n_bg = batch_size - n_fg
    if n_bg:
        picks.append(rng.choice(bg, n_bg, replace=n_bg > len(bg)))
    return rng.permutation(np.concatenate(picks)).astype(np.int64)
