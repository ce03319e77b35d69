"""R-CNN (Girshick et al. 2014, arXiv 1311.2524): the warp of proposals with context padding
to the classifier's input, the fine-tuning labels and batches, and the network: a project
classifier at its own input size with K + 1 softmax outputs and a class-specific box
regressor.

    specs = detector_specs(config.model, (32, 32, 3), num_classes=10)
    model = RCNN(specs, rngs=nnx.Rngs(0))
    scores, deltas = model(images, rois, roi_image)   # every RoI warped, then classified

`warp` is batched and jit-compiled: every proposal of a batch is resampled at once
(bilinear, `jax.scipy.ndimage.map_coordinates` vmapped over boxes), never a Python loop per
box. The paper's context padding: the box is dilated so that, once warped to the input
size, `16 * size / 227` pixels of the image surround it (16 px at 227, section 2.1 and
appendix A); samples outside the image take the image's mean (the paper's choice).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import models
from detection import boxes as box_ops
from errors import UserError
from models.builder import Builder
from models.kinds import KINDS
from models.shapes import LayerSpec

PAPER_INPUT = 227
PAPER_CONTEXT = 16
BBOX_FLATTEN, BBOX = "bbox_flatten", "bbox"


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


def detector_specs(
    model_cfg: ml_collections.ConfigDict, input_shape: Sequence[int], num_classes: int
) -> list[LayerSpec]:
    """Returns R-CNN's layers: the preset's own network for warped regions of `input_shape`
    with `num_classes` + 1 outputs (0 = background; section 2.3: the classification layer
    replaced by a randomly initialised (N + 1)-way one), then the class-specific box
    regressor `bbox` [4 K] reading the features that feed the class layers (flattened when
    spatial, as the paper's pool5 features)."""
    shape = tuple(input_shape)
    specs = models.architecture(model_cfg, shape, num_classes + 1)
    other = models.architecture(model_cfg, shape, num_classes + 2)
    cut = next(i for i, (a, b) in enumerate(zip(specs, other, strict=True)) if a != b)
    if cut == 0:
        raise UserError(f"model.name={model_cfg.name!r}: no layers before the class scores")
    features = specs[cut - 1]
    b = Builder(features.out_shape)
    if len(features.out_shape) == 3:
        b.flatten(BBOX_FLATTEN)
    b.dense(BBOX, 4 * num_classes, use_bias=True)
    head = b.specs
    # the regressor reads the features layer, not the class scores listed before it
    head[0] = dataclasses.replace(head[0], inputs=(features.name,))
    return [*specs, *head]


class RCNN(nnx.Module):
    """R-CNN's network over `specs` (from `detector_specs`): `backbone` (the classifier's
    layers up to its features), `classifier` (the rest: K + 1 scores) and `bbox`.

    `__call__(images, rois, roi_image, *, train=False, rngs=None)`: normalised images [B, H,
    W, C], RoIs [R, 4] (x1, y1, x2, y2 image pixels) on images `roi_image` [R] -> (float32
    class scores [R, K + 1], box deltas [R, K, 4]). Each RoI is warped with context padding
    to the classifier's input (`warp`: bilinear is affine, so warping normalised images is
    normalising warped ones) and goes through the whole network: no computation is shared
    between RoIs, which is what Fast R-CNN changes.
    """

    def __init__(self, specs: Sequence[LayerSpec], *, dtype: str = "float32", rngs: nnx.Rngs):
        specs = tuple(specs)
        names = [s.name for s in specs]
        head = min(names.index(n) for n in (BBOX_FLATTEN, BBOX) if n in names)
        cut = names.index(specs[head].inputs[0]) + 1
        self.size = specs[0].in_shape[0]
        self.backbone = models.Network(specs[:cut], dtype=dtype, rngs=rngs)
        self.classifier = models.Network(specs[cut:head], dtype=dtype, rngs=rngs)
        self.bbox_spec = specs[-1]
        self.bbox = KINDS["dense"].module(self.bbox_spec, jnp.dtype(dtype), rngs)
        # the paper's code initialises the box regressor from N(0, 0.001), as Fast R-CNN's
        self.bbox.kernel[...] = 0.001 * jax.random.normal(
            rngs.params(), self.bbox.kernel[...].shape
        )

    def __call__(self, images, rois, roi_image, *, train: bool = False, rngs=None):
        scores, deltas, _ = self.forward(images, rois, roi_image, train=train, rngs=rngs)
        return scores, deltas

    def forward(self, images, rois, roi_image, *, train: bool = False, rngs=None):
        """`__call__`'s (scores, deltas) and the features [R, D] that feed both (flattened):
        what R-CNN's SVMs read (`detection.svm`)."""
        regions = warp(images, rois, roi_image, size=self.size).astype(images.dtype)
        features = self.backbone(regions, train=train, rngs=rngs).astype(images.dtype)
        scores = self.classifier(features, train=train, rngs=rngs)
        flat = features.reshape(features.shape[0], -1)
        deltas = self.bbox(flat).astype(jnp.float32)
        return scores, deltas.reshape(deltas.shape[0], -1, 4), flat.astype(jnp.float32)
