"""Fast R-CNN (Girshick 2015, arXiv 1504.08083) on the project's classifiers.

The network is written down as LayerSpecs like every model here (`detector_specs`): the
backbone is a preset's own layers (its specs, its layer kinds, so a classifier trained by
this project fits it), then the `roi_pool` layer kind, the hidden FC layers and two sibling
outputs: `cls` (K + 1 scores, 0 = background) and `bbox` (4 K class-specific box deltas).

    specs = detector_specs(config.model, (96, 96, 3), num_classes=10, detection=config.detection)
    model = FastRCNN(specs, dtype="float32", rngs=nnx.Rngs(0))
    scores, deltas = model(images, rois, roi_image, train=True, rngs=...)

The image's feature map is computed once per image; every RoI is max-pooled from it
(`models.roi.roi_max_pool`, spatial scale = 1 / the backbone's jump; or with
`detection.roi_pool = 'align'`, RoIAlign's bilinear samples, `models.roi.roi_align`) and goes
through the head. `loss` is the multi-task loss of section 2.3 (eq. 1).

With an image pyramid (section 5.2, "multi-scale"; `scales` of more than one level) the
backbone runs on the image resized by each scale, and each RoI is pooled from the one level
where its size (the square root of its area, times the level's scale) comes closest to
`target` pixels: the paper's test-time rule (the level where the scaled RoI is closest to
224 x 224, its networks' input), used here in training as at test (as FPN assigns RoIs to
levels, Lin et al. 2017, eq. 1), so the head sees every object at about the size its
classifier learned, as R-CNN's warp shows it.

With `context` > 1 (`detection.roi_context`) each RoI is pooled from its box scaled about its
centre by that factor, the region R-CNN's warp shows the classifier (its context padding:
the box fills the warp less 16/227 of it on each side, so the region is 28/24 of the box at
28 px); its class scores and box deltas are still the box's. Not in the paper, whose RoIs
are pooled as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

import models
from errors import UserError
from models import roi
from models.builder import Builder
from models.kinds import KINDS
from models.shapes import LayerSpec

ROI_POOL, CLS, BBOX = "roi_pool", "cls", "bbox"


def backbone_specs(
    model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int]
) -> list[LayerSpec]:
    """Returns the preset's layers that map an image to its feature map: those before the
    first layer that depends on the number of classes or leaves the spatial layout (flatten,
    global pooling, dense), less a final max pooling (Fast R-CNN replaces it by RoI pooling).
    UserError when nothing spatial is left."""
    ten = models.architecture(model_cfg, tuple(image_shape), 10)
    eleven = models.architecture(model_cfg, tuple(image_shape), 11)
    cut = next(
        i
        for i, (a, b) in enumerate(zip(ten, eleven, strict=True))
        if a != b or len(a.out_shape) != 3
    )
    specs = ten[:cut]
    if specs and specs[-1].kind == "pool" and specs[-1].function == "max":
        specs = specs[:-1]
    if not specs:
        raise UserError(
            f"model.name={model_cfg.name!r}: no convolutional layers to use as a detection "
            "backbone; choose a convolutional preset"
        )
    return specs


def detector_specs(
    model_cfg: ml_collections.ConfigDict,
    image_shape: Sequence[int],
    num_classes: int,
    detection: ml_collections.ConfigDict,
) -> list[LayerSpec]:
    """Returns the detector's layers: the backbone, `roi_pool`, flatten, the hidden FC layers
    (ReLU, dropout), then `cls` [K + 1] and `bbox` [4 K], both reading the last hidden layer.
    The numbers of the layers after the RoI pooling are per region."""
    backbone = backbone_specs(model_cfg, image_shape)
    # the RoI pooling reads the backbone's last layer (its jump is the spatial scale); the
    # layers after it work on one region's grid
    pooling = KINDS["roi_pool"].spec(
        ROI_POOL,
        (backbone[-1],),
        (),
        output_size=detection.roi_size,
        function=detection.roi_pool,
    )
    b = Builder(pooling.out_shape)
    b.flatten("roi_flatten")
    for i, width in enumerate(detection.hidden_widths, start=6):  # the paper's fc6, fc7
        b.dense(f"fc{i}", width, use_bias=True)
        b.act(f"fc{i}_relu", "relu")
        b.dropout(f"fc{i}_dropout", detection.hidden_dropout)
    trunk = b.last
    b.dense(CLS, num_classes + 1, use_bias=True)
    b.dense(BBOX, 4 * num_classes, use_bias=True, source=trunk)
    return [*backbone, pooling, *b.specs]


class FastRCNN(nnx.Module):
    """The detector of `specs` (from `detector_specs`).

    `__call__(images, rois, roi_image, *, train=False, rngs=None)`: normalised images [B, H,
    W, C], RoIs [R, 4] (x1, y1, x2, y2 image pixels) on images `roi_image` [R] -> (float32
    class scores [R, K + 1], box deltas [R, K, 4]).

    `scales`: the image pyramid's levels (image scale factors; (1.0,): the image as it is,
    the paper's single scale), `target`: the RoI size in pixels each RoI's level is chosen
    for (the module docstring); only read with more than one level. `context`: the factor
    each RoI is scaled by about its centre before it is pooled (1.0: as it is, the paper's).
    """

    def __init__(
        self,
        specs: Sequence[LayerSpec],
        *,
        dtype: str = "float32",
        rngs: nnx.Rngs,
        scales: Sequence[float] = (1.0,),
        target: float = 0.0,
        context: float = 1.0,
    ):
        specs = tuple(specs)
        if not context >= 1.0:
            raise ValueError(f"FastRCNN: context {context} must be >= 1 (1: the RoI as it is)")
        self.context = float(context)
        self.scales = tuple(float(s) for s in scales)
        if len(self.scales) > 1 and not target > 0:
            raise ValueError(f"FastRCNN: an image pyramid {self.scales} needs a target > 0")
        self.target = float(target)
        at = [s.name for s in specs].index(ROI_POOL)
        self.roi_spec = specs[at]
        self.backbone = models.Network(specs[:at], dtype=dtype, rngs=rngs)
        self.trunk = models.Network(specs[at + 1 : -2], dtype=dtype, rngs=rngs)
        self.cls_spec, self.bbox_spec = specs[-2], specs[-1]
        dense = KINDS["dense"]
        self.cls = dense.module(self.cls_spec, jnp.dtype(dtype), rngs)
        self.bbox = dense.module(self.bbox_spec, jnp.dtype(dtype), rngs)
        # the paper's initialisation: N(0, 0.01) scores, N(0, 0.001) box deltas; the scores
        # start at exactly 0 here, as every classifier of the project (Network)
        dense.init_scores(self.cls)
        self.bbox.kernel[...] = 0.001 * jax.random.normal(
            rngs.params(), self.bbox.kernel[...].shape
        )

    def features(
        self, images: jax.Array, *, train: bool = False, rngs=None
    ) -> list[tuple[float, jax.Array]]:
        """The backbone's feature maps of normalised images [B, H, W, C], one per pyramid
        level: [(the level's scale, as resized, [B, h, w, C])]."""
        levels = []
        for size, scale in pyramid_sizes(images.shape[1:3], self.scales):
            x = images
            if size != images.shape[1:3]:  # bilinear, antialiased when shrinking
                x = jax.image.resize(images, (images.shape[0], *size, images.shape[3]), "linear")
            levels.append((scale, self.backbone(x, train=train, rngs=rngs)))
        return levels

    def head(self, features, rois, roi_image, *, train: bool = False, rngs=None):
        """(scores [R, K + 1], deltas [R, K, 4]) of the RoIs on the feature maps of
        `features()`, each RoI pooled from its level (`pyramid_level`)."""
        pool = roi.ROI_FUNCTIONS[self.roi_spec.function]
        # max: the pooled regions are clipped to the image (a faster table; the same result
        # for proposals and ground truth, which lie in it, and for a region with context,
        # whose part outside the image holds nothing to pool)
        inside = {"inside": True} if self.roi_spec.function == "max" else {}
        regions = rois if self.context == 1.0 else scale_boxes(rois, self.context)
        pooled = [
            pool(
                level,
                regions,
                roi_image,
                self.roi_spec.out_shape[:2],
                spatial_scale=scale / self.roi_spec.jump,
                **inside,
            )
            for scale, level in features
        ]
        if len(pooled) == 1:
            pooled = pooled[0]
        else:
            chosen = pyramid_level(rois, [scale for scale, _ in features], self.target)
            pooled = jnp.choose(chosen[:, None, None, None], pooled, mode="clip")
        hidden = self.trunk(pooled, train=train, rngs=rngs)
        scores = self.cls(hidden).astype(jnp.float32)
        deltas = self.bbox(hidden).astype(jnp.float32)
        return scores, deltas.reshape(deltas.shape[0], -1, 4)

    def __call__(self, images, rois, roi_image, *, train: bool = False, rngs=None):
        features = self.features(images, train=train, rngs=rngs)
        return self.head(features, rois, roi_image, train=train, rngs=rngs)


def scale_boxes(boxes: jax.Array, factor: float) -> jax.Array:
    """Boxes [R, 4] (x1, y1, x2, y2) scaled about their centres by `factor`."""
    centre = 0.5 * (boxes[:, :2] + boxes[:, 2:])
    half = (0.5 * factor) * (boxes[:, 2:] - boxes[:, :2])
    return jnp.concatenate([centre - half, centre + half], axis=1)


def pyramid_sizes(
    image_size: Sequence[int], scales: Sequence[float]
) -> list[tuple[tuple[int, int], float]]:
    """Each pyramid level's image size (H, W), rounded, and its exact scale (the rounded
    height over the image's), for an image of `image_size` (H, W) and `scales`."""
    height, width = int(image_size[0]), int(image_size[1])
    out = []
    for s in scales:
        h, w = max(1, round(height * s)), max(1, round(width * s))
        out.append(((h, w), h / height))
    return out


def pyramid_level(rois: jax.Array, scales: Sequence[float], target: float) -> jax.Array:
    """int32 [R]: for each RoI [R, 4] (image pixels) the level whose scale brings its size
    (the square root of its area) closest to `target` pixels in log scale (the first of
    equals)."""
    w = jnp.maximum(rois[:, 2] - rois[:, 0], 1e-3)
    h = jnp.maximum(rois[:, 3] - rois[:, 1], 1e-3)
    size = 0.5 * (jnp.log(w) + jnp.log(h))
    logs = jnp.log(jnp.asarray(scales, jnp.float32))
    gap = jnp.abs(size[:, None] + logs[None, :] - math.log(target))
    return jnp.argmin(gap, axis=1).astype(jnp.int32)


def smooth_l1(x: jax.Array) -> jax.Array:
    """The robust loss of eq. 3: 0.5 x^2 where |x| < 1, |x| - 0.5 elsewhere."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1, 0.5 * x * x, ax - 0.5)


def loss(
    scores: jax.Array,
    deltas: jax.Array,
    labels: jax.Array,
    targets: jax.Array,
    weight: jax.Array,
    *,
    bbox_loss_weight: float,
) -> tuple[jax.Array, dict]:
    """The multi-task loss (eq. 1): mean over the RoIs of the cross-entropy of the true class
    `labels` [R] (0 = background) plus `bbox_loss_weight` times the smooth L1 of the true
    class's deltas against `targets` [R, 4] (normalised), for foreground RoIs only. `weight`
    [R] (0 or 1) leaves padding RoIs out. Returns (loss, {'cls', 'bbox', 'correct', 'count'})."""
    count = jnp.maximum(jnp.sum(weight), 1.0)
    cls = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(scores, labels) * weight)
    true_class = jnp.maximum(labels - 1, 0)
    chosen = jnp.take_along_axis(deltas, true_class[:, None, None], axis=1)[:, 0]
    foreground = (labels > 0).astype(jnp.float32) * weight
    box = jnp.sum(smooth_l1(chosen - targets).sum(-1) * foreground)
    correct = jnp.sum((jnp.argmax(scores, -1) == labels) * weight)
    total = (cls + bbox_loss_weight * box) / count
    return total, {"cls": cls / count, "bbox": box / count, "correct": correct, "count": count}
