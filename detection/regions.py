"""The regions a detector trains and is tested on: scenes with their proposals, labelled, and
Fast R-CNN's mini-batches of RoIs.

    data = load_scenes(config)                          # train / eval / test Scenes
    pool = label_pool(scenes, proposals, fg_iou=0.5)    # per image: RoIs, labels, targets
    batch = sample_batch(pool, scenes, step, ...)       # Fast R-CNN: the RoIs of step `step`
    batch = sample_regions(FlatPool.of(pool), scenes, step, ...)   # R-CNN's regions

Training RoIs (Fast R-CNN section 2.3): an image's selective-search proposals plus its
ground-truth boxes (as the paper's code), each labelled with the class of the ground-truth
box it overlaps most if IoU >= `fg_iou`, else background; box-regression targets are
`detection.boxes.encode` of the proposal to that box, divided by `target_std`. A step's N
images are the next N of an epoch's permutation and its RoIs a draw of `rois_per_image` per
image, `fg_fraction` foreground, both from (seed, step) alone: a resumed run sees the same
batches.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import builtin
from detection import boxes as box_ops
from detection import proposals as proposals_lib
from detection import rcnn, scenes, voc
from errors import UserError


@dataclasses.dataclass(frozen=True)
class Pool:
    """The labelled RoIs of each training image: rois float32 [n_i, 4], labels int32 [n_i]
    (0 = background, 1 + class), targets float32 [n_i, 4] (normalised; 0 for background),
    max_iou float32 [n_i]."""

    rois: list[np.ndarray]
    labels: list[np.ndarray]
    targets: list[np.ndarray]
    max_iou: list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class SceneKind:
    """What is known of a kind of scenes without loading any: its class names, and the
    classification dataset (`data.catalog`) whose images are like its objects, so that its
    classifiers fit the detector (the input channels, R-CNN's default warp size)."""

    class_names: tuple[str, ...]
    classifier: str


# config.dataset.name -> its scenes; VOC's photographs are like CIFAR-10's (natural, RGB)
SCENES = {
    "builtin": SceneKind(builtin.CLASS_NAMES, "builtin"),
    "fashion_mnist": SceneKind(scenes.FASHION_MNIST_CLASSES, "fashion_mnist"),
    "voc2007": SceneKind(voc.CLASS_NAMES, "cifar10"),
}


def load_scenes(
    config: ml_collections.ConfigDict, splits: tuple[str, ...] | None = None
) -> dict[str, scenes.Scenes]:
    """Returns {'train', 'test'} (and 'validation' when detection.validation_scenes > 0) of
    the config's scenes (dataset.name: builtin | fashion_mnist | voc2007), or only `splits`
    of them (each split's scenes are the same either way)."""
    d, name = config.detection, config.dataset.name
    sizes = {"train": d.train_scenes, "test": d.test_scenes}
    if d.validation_scenes:
        sizes["validation"] = d.validation_scenes
    if splits is not None:
        sizes = {split: n for split, n in sizes.items() if split in splits}
    if name == "voc2007":  # the first N images of each split (VOC's trainval, test)
        return {
            split: voc.voc2007_scenes(
                split,
                n,
                source=config.dataset.source,
                data_dir=config.dataset.data_dir,
                image_size=d.image_size,
            )
            for split, n in sizes.items()
        }
    # validation scenes: training items (as the training scenes), their own seed
    seeds = {"train": scenes.TRAIN_SEED, "test": scenes.TEST_SEED, "validation": 2}
    out = {}
    if name == "builtin":
        for split, n in sizes.items():
            out[split] = scenes.builtin_scenes(n, seed=seeds[split], image_size=d.image_size)
        return out
    names = scenes.FASHION_MNIST_CLASSES
    needed = {"test" if split == "test" else "train" for split in sizes}
    items = {s: scenes.fashion_mnist_items(config.dataset.data_dir, s) for s in needed}
    for split, n in sizes.items():
        pictures, labels = items["test" if split == "test" else "train"]
        out[split] = scenes.scenes_from_items(
            pictures, labels, n, seed=seeds[split], class_names=names, image_size=d.image_size
        )
    return out


def proposal_settings(detection: ml_collections.ConfigDict) -> proposals_lib.Settings:
    return proposals_lib.Settings(
        mode=detection.proposal_mode,
        upscale=detection.proposal_upscale,
        max_proposals=detection.max_proposals,
    )


def proposal_cache(detection: ml_collections.ConfigDict) -> proposals_lib.ProposalCache:
    """The config's proposal cache (detection.proposal_cache, default under ~/.cache)."""
    folder = detection.proposal_cache
    if not folder:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        folder = str(Path(root) / "convnets" / "proposals")
    return proposals_lib.ProposalCache(os.path.expanduser(folder), proposal_settings(detection))


def label_pool(
    data: scenes.Scenes,
    proposals: list[np.ndarray],
    *,
    fg_iou: float,
    target_std: tuple[float, ...],
) -> Pool:
    """Labels every training image's proposals and ground-truth boxes (see the module's
    docstring); an image with neither gets the whole image as its one (background) RoI.
    Raises UserError naming the image for a bad ground-truth box or a regression target that
    is not finite (an empty proposal)."""
    size = data.images.shape[1:3]
    std = np.asarray(target_std, np.float32)
    rois, labels, targets, max_iou = [], [], [], []
    for i, props in enumerate(proposals):
        gt_boxes, gt_classes = data.objects(i)
        box_ops.check_boxes(
            gt_boxes, height=size[0], width=size[1], what=f"training scene {i}: ground truth"
        )
        candidates = np.concatenate([np.asarray(props, np.float32).reshape(-1, 4), gt_boxes])
        if not len(candidates):  # no proposal and no object: the whole image, as background
            candidates = np.array([[0, 0, size[1], size[0]]], np.float32)
        label, matched, overlap = rcnn.label_proposals(
            candidates, gt_boxes, gt_classes, positive_iou=fg_iou
        )
        target = np.zeros_like(candidates)
        fg = label > 0
        if fg.any():
            target[fg] = box_ops.encode(candidates[fg], matched[fg]) / std
        if not np.isfinite(target).all():
            j = int(np.flatnonzero(~np.isfinite(target).all(axis=1))[0])
            raise UserError(
                f"training scene {i}: the box-regression target of RoI {candidates[j].tolist()}"
                f" to {matched[j].tolist()} is not finite (an empty box)"
            )
        rois.append(candidates)
        labels.append(label)
        targets.append(target.astype(np.float32))
        max_iou.append(overlap)
    return Pool(rois, labels, targets, max_iou)


def step_images(step: int, *, batch_size: int, num_images: int, seed: int) -> np.ndarray:
    """The indices of the `batch_size` training images of step `step` (0-based): the next
    ones of each epoch's permutation, which depends on (seed, epoch) only."""
    g = step * batch_size + np.arange(batch_size)
    epochs, positions = g // num_images, g % num_images
    return np.array(
        [
            np.random.default_rng([seed, int(e)]).permutation(num_images)[p]
            for e, p in zip(epochs, positions, strict=True)
        ]
    )


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    if n <= 0 or not len(pool):
        return np.zeros(0, np.int64)
    return rng.choice(pool, n, replace=n > len(pool))


def sample_batch(
    pool: Pool,
    data: scenes.Scenes,
    step: int,
    *,
    batch_size: int,
    rois_per_image: int,
    fg_fraction: float,
    fg_iou: float,
    bg_iou_low: float,
    flip: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    """Returns step `step`'s batch: image uint8 [N, S, S, C], rois float32 [N R, 4],
    roi_image int32 [N R], labels int32 [N R], targets float32 [N R, 4], weight float32 [N R]
    (all 1: every image gets R RoIs, drawn with replacement when it has fewer)."""
    rng = np.random.default_rng([seed, step, 1])
    indices = step_images(step, batch_size=batch_size, num_images=len(data), seed=seed)
    width = data.images.shape[2]
    images, rois, roi_image, labels, targets = [], [], [], [], []
    for n, i in enumerate(indices):
        label, overlap = pool.labels[i], pool.max_iou[i]
        fg = np.flatnonzero(label > 0)
        bg = np.flatnonzero((label == 0) & (overlap >= bg_iou_low) & (overlap < fg_iou))
        if len(bg) < rois_per_image - min(len(fg), round(fg_fraction * rois_per_image)):
            bg = np.flatnonzero(label == 0)  # too few near misses: any background
        n_fg = min(len(fg), round(fg_fraction * rois_per_image)) if len(bg) else rois_per_image
        chosen = np.concatenate([_draw(rng, fg, n_fg), _draw(rng, bg, rois_per_image - n_fg)])
        image, box, target = data.images[i], pool.rois[i][chosen], pool.targets[i][chosen]
        if flip and rng.random() < 0.5:
            image = image[:, ::-1]
            box = np.stack([width - box[:, 2], box[:, 1], width - box[:, 0], box[:, 3]], 1)
            target = target * np.array([-1, 1, 1, 1], np.float32)  # tx changes sign
        images.append(image)
        rois.append(box)
        roi_image.append(np.full(len(chosen), n, np.int32))
        labels.append(pool.labels[i][chosen])
        targets.append(target)
    return {
        "image": np.stack(images),
        "rois": np.concatenate(rois).astype(np.float32),
        "roi_image": np.concatenate(roi_image),
        "labels": np.concatenate(labels).astype(np.int32),
        "targets": np.concatenate(targets).astype(np.float32),
        "weight": np.ones(len(indices) * rois_per_image, np.float32),
    }


@dataclasses.dataclass(frozen=True)
class FlatPool:
    """Every labelled training RoI of every image in one list (R-CNN samples over them all):
    image int32 [M] (its scene), rois float32 [M, 4], labels int32 [M], targets float32 [M, 4].
    """

    image: np.ndarray
    rois: np.ndarray
    labels: np.ndarray
    targets: np.ndarray

    @classmethod
    def of(cls, pool: Pool) -> FlatPool:
        image = np.concatenate([np.full(len(r), i, np.int32) for i, r in enumerate(pool.rois)])
        return cls(
            image,
            np.concatenate(pool.rois).astype(np.float32),
            np.concatenate(pool.labels).astype(np.int32),
            np.concatenate(pool.targets).astype(np.float32),
        )


def sample_regions(
    flat: FlatPool,
    data: scenes.Scenes,
    step: int,
    *,
    batch_size: int,
    fg_fraction: float,
    flip: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    """Returns R-CNN's fine-tuning batch of step `step` (section 2.3: `batch_size` regions
    drawn uniformly over every training image, `fg_fraction` of them positive, the rest
    background; the paper's 32 of 128), from (seed, step) alone: image uint8 [R, S, S, C] (each
    region's scene), rois, roi_image (= arange(R)), labels, targets, weight as `sample_batch`.
    Each region's scene is flipped with p = 0.5 when `flip`."""
    rng = np.random.default_rng([seed, step, 2])
    positives = round(fg_fraction * batch_size)
    chosen = rcnn.sample_batch(rng, flat.labels, batch_size=batch_size, positives=positives)
    images = data.images[flat.image[chosen]]
    box, target = flat.rois[chosen].copy(), flat.targets[chosen].copy()
    if flip:
        flipped = rng.random(batch_size) < 0.5
        width = data.images.shape[2]
        images[flipped] = images[flipped, :, ::-1]
        box[flipped] = np.stack(
            [width - box[flipped, 2], box[flipped, 1], width - box[flipped, 0], box[flipped, 3]], 1
        )
        target[flipped, 0] *= -1  # tx changes sign
    return {
        "image": images,
        "rois": box,
        "roi_image": np.arange(batch_size, dtype=np.int32),
        "labels": flat.labels[chosen],
        "targets": target,
        "weight": np.ones(batch_size, np.float32),
    }


def test_rois(proposals: list[np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (rois float32 [I, count, 4], valid bool [I, count]): each test image's first
    `count` proposals, padded with a dummy box marked invalid."""
    rois = np.zeros((len(proposals), count, 4), np.float32)
    rois[..., 2:] = 1.0
    valid = np.zeros((len(proposals), count), bool)
    for i, props in enumerate(proposals):
        props = np.asarray(props, np.float32).reshape(-1, 4)[:count]
        rois[i, : len(props)] = props
        valid[i, : len(props)] = True
    return rois, valid


def over_kept_rois(fn, rois: jax.Array, roi_image: jax.Array, keep: jax.Array, chunk: int):
    """Runs `fn(rois [chunk, 4], roi_image [chunk]) -> arrays [chunk, ...]` on the RoIs where
    `keep` [R] holds, `chunk` at a time (R a multiple of `chunk`), and returns its outputs
    [R, ...] for every RoI, zeros where `keep` does not hold: the padding of the test RoIs
    (`test_rois`) costs at most one partial chunk, not a chunk per image."""
    total = rois.shape[0]
    if total % chunk:
        raise ValueError(f"over_kept_rois: {total} RoIs are not a multiple of chunk={chunk}")
    order = jnp.argsort(~keep, stable=True)  # the kept RoIs first, each group in its order
    chunks = (jnp.sum(keep) + chunk - 1) // chunk
    shapes = jax.eval_shape(fn, rois[:chunk], roi_image[:chunk])
    zeros = jax.tree.map(lambda a: jnp.zeros((total, *a.shape[1:]), a.dtype), shapes)

    def body(i, outs):
        at = jax.lax.dynamic_slice_in_dim(order, i * chunk, chunk)
        done = fn(rois[at], roi_image[at])
        return jax.tree.map(
            lambda o, d: jax.lax.dynamic_update_slice_in_dim(o, d, i * chunk, 0), outs, done
        )

    sorted_outs = jax.lax.fori_loop(0, chunks, body, zeros)

    def unsort(z, o):  # back to the RoIs' order; the last chunk's padding RoIs zeroed
        kept = keep.reshape(-1, *([1] * (z.ndim - 1)))
        return jnp.where(kept, z.at[order].set(o), z)

    return jax.tree.map(unsort, zeros, sorted_outs)
