"""R-CNN's per-class linear SVMs (Girshick et al. 2014, section 2.3 and appendix B): the option
`detection.rcnn_scores = 'svm'`, in place of the fine-tuned network's softmax.

- Features: the fine-tuned network's features that feed its class layer (the box regressor's
  input: the paper's pool5/fc7 role), of regions warped as in training. Positives of a class:
  its ground-truth boxes (the paper's only positives). Negatives: the proposals whose IoU with
  every object of that class is below `svm_negative_iou` (the paper's 0.3); proposals between
  are left out, as in the paper. Regions come from the first `svm_train_scenes` training
  scenes (their features are kept in memory).
- Fit: one linear SVM per class, an L2-regularised squared hinge loss (liblinear's L2-loss
  SVM; the paper ran liblinear's L1-loss dual solver) on standardised features, positives
  weighted `svm_positive_weight` (the paper's w1 = 2), by optax's L-BFGS.
- Hard negative mining (appendix B): each class starts from `svm_cache_size` random
  negatives; after each fit the negatives that violate the margin (score > -1) join the cache
  and those below -1.2 leave it (the paper's thresholds), for `svm_mining_rounds` fits.
- Test: a region's class score is the sigmoid of its SVM margin, a monotone map (the per-class
  ranking, hence AP, is the margin's), in (0, 1) like the softmax's, so that
  `detection.score_threshold` and the figures read the same way.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import data
from detection import boxes as box_ops
from detection import regions
from training import optim
from training import state as state_lib

HARD, EASY = -1.0, -1.2  # appendix B: cache negatives above HARD, evict those below EASY
MAX_ITERATIONS = 300
TOLERANCE = 1e-5  # on the norm of the loss's gradient


def _region_features(state, images, rois, valid, *, graphdef, config, mean, std):
    """[B, P, D] features of each RoI where `valid` [B, P] holds, zeros elsewhere (the
    network's layer that feeds its class scores), P regions at a time over the valid ones, as
    `detection.train.predict_step` runs R-CNN (`regions.over_kept_rois`)."""
    x = data.normalize(images, mean, std, jnp.dtype(config.model.dtype))
    model = state_lib.merge_model(graphdef, state)
    b, p = rois.shape[:2]
    (features,) = regions.over_kept_rois(
        lambda r, i: (model.forward(x, r, i)[2],),
        rois.reshape(-1, 4),
        jnp.repeat(jnp.arange(b), p),
        valid.reshape(-1),
        p,
    )
    return features.reshape(b, p, -1)


def feature_program(run):
    """The jitted `(state, images uint8 [B, S, S, C], rois [B, P, 4], valid bool [B, P]) ->
    features [B, P, D]` of `run` (a detection.train.Run in R-CNN mode)."""
    return jax.jit(
        functools.partial(
            _region_features, graphdef=run.graphdef, config=run.config, mean=run.mean, std=run.std
        )
    )


@functools.partial(jax.jit, static_argnames=("iterations",))
def _fit_one(z, y, weight, weight_decay, tolerance, iterations: int):
    """One linear SVM on standardised features z [N, D], labels y [N] in {-1, +1} and example
    weights [N] (0: padding): minimises the weighted mean squared hinge + L2 by L-BFGS."""

    def loss(params):
        margin = y * (z @ params["w"] + params["b"])
        hinge = jnp.maximum(0.0, 1.0 - margin) ** 2
        return jnp.sum(weight * hinge) / jnp.sum(weight) + 0.5 * weight_decay * jnp.sum(
            params["w"] ** 2
        )

    params = {"w": jnp.zeros((z.shape[1],), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    params, _ = optim.minimize_lbfgs(loss, params, tolerance=tolerance, iterations=iterations)
    return params, loss(params)


def fit_svms(
    features: np.ndarray,
    classes: np.ndarray,
    negative: np.ndarray,
    num_classes: int,
    *,
    positive_weight: float = 2.0,
    cache_size: int = 5000,
    rounds: int = 3,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Fits one SVM per class with hard negative mining.

    features [N, D] of every region; classes [N]: the class of a ground-truth region, -1 for a
    proposal; negative [N, K] bool: whether region n is a negative of class k. Returns {'w' [D,
    K], 'b' [K], 'mean' [D], 'scale' [D] (the standardisation), 'positives' [K], 'cache' [K]
    (negatives in the last fit), 'hard' [K] (negatives above -1 after it), 'loss' [K]}."""
    features = np.asarray(features, np.float32)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-6 * (1 + np.abs(mean)), scale, 1.0).astype(np.float32)
    z = (features - mean) / scale
    rng = np.random.default_rng(seed)
    max_pos = max(1, int(max((classes == k).sum() for k in range(num_classes))))
    size = max_pos + cache_size  # one padded shape: one compilation for every class and round
    w = np.zeros((z.shape[1], num_classes), np.float32)
    b = np.zeros(num_classes, np.float32)
    out = {k: np.zeros(num_classes, np.int64) for k in ("positives", "cache", "hard")}
    out["loss"] = np.zeros(num_classes, np.float32)
    for k in range(num_classes):
        positives = np.flatnonzero(classes == k)
        negatives = np.flatnonzero(negative[:, k])
        out["positives"][k] = len(positives)
        if not len(positives) or not len(negatives):
            b[k] = -10.0  # nothing to learn from: never scores
            continue
        cache = rng.choice(negatives, min(cache_size, len(negatives)), replace=False)
        for _ in range(rounds):
            index = np.concatenate([positives, cache])
            y = np.concatenate([np.ones(len(positives)), -np.ones(len(cache))])
            weight = np.concatenate([np.full(len(positives), positive_weight), np.ones(len(cache))])
            pad = size - len(index)
            params, loss = _fit_one(
                jnp.asarray(np.pad(z[index], ((0, pad), (0, 0)))),
                jnp.asarray(np.pad(y, (0, pad)), jnp.float32),
                jnp.asarray(np.pad(weight, (0, pad)), jnp.float32),
                weight_decay,
                TOLERANCE,
                iterations=MAX_ITERATIONS,
            )
            w[:, k], b[k] = np.asarray(params["w"]), float(params["b"])
            out["loss"][k] = float(loss)
            scores = z[negatives] @ w[:, k] + b[k]
            kept = cache[(z[cache] @ w[:, k] + b[k]) >= EASY]
            hard = negatives[scores > HARD]
            cache = np.union1d(kept, hard)
            if len(cache) > cache_size:  # the hardest first
                cache = cache[np.argsort(-(z[cache] @ w[:, k]))[:cache_size]]
        out["cache"][k] = len(cache)
        out["hard"][k] = int(((z[negatives] @ w[:, k] + b[k]) > HARD).sum())
    return {"w": w, "b": b, "mean": mean, "scale": scale, **out}


def training_regions(run, state) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features, classes and negative masks (as `fit_svms` takes them) of the ground-truth
    boxes and proposals of the first `detection.svm_train_scenes` training scenes."""
    d = run.config.detection
    scenes, proposals = run.scenes["train"], run.proposals["train"]
    n = min(d.svm_train_scenes, len(scenes))
    num_classes = len(scenes.class_names)
    per_scene = [np.concatenate([scenes.objects(i)[0], proposals[i]]) for i in range(n)]
    width = max(len(r) for r in per_scene)  # one padded shape: one compilation
    batch = run.config.training.eval_batch_size
    program = feature_program(run)
    features, classes, negative = [], [], []
    for first in range(0, n, batch):
        chunk = per_scene[first : first + batch]
        rois = np.zeros((batch, width, 4), np.float32)
        valid = np.zeros((batch, width), bool)
        for j, r in enumerate(chunk):
            rois[j, : len(r)] = r
            valid[j, : len(r)] = True
        images = scenes.images[first : first + batch]
        if len(images) < batch:
            images = np.concatenate([images, np.zeros((batch - len(images), *images.shape[1:]))])
        found = np.asarray(program(state, images.astype(np.uint8), rois, valid))
        for j, r in enumerate(chunk):
            truth, labels = scenes.objects(first + j)
            features.append(found[j, : len(r)])
            classes.append(np.concatenate([labels, -np.ones(len(r) - len(truth), np.int64)]))
            overlap = box_ops.iou(r, truth) if len(truth) else np.zeros((len(r), 0))
            below = np.ones((len(r), num_classes), bool)
            for k in range(num_classes):
                mine = labels == k
                if mine.any():
                    below[:, k] = overlap[:, mine].max(axis=1) < d.svm_negative_iou
            below[: len(truth)] = False  # ground-truth boxes are never negatives
            negative.append(below)
    return np.concatenate(features), np.concatenate(classes), np.concatenate(negative)


def fit_for(run, state) -> dict[str, Any]:
    """The SVMs of `state` (a fine-tuned R-CNN), fitted on its training regions."""
    d = run.config.detection
    features, classes, negative = training_regions(run, state)
    return fit_svms(
        features,
        classes,
        negative,
        len(run.class_names),
        positive_weight=d.svm_positive_weight,
        cache_size=d.svm_cache_size,
        rounds=d.svm_mining_rounds,
        weight_decay=d.svm_weight_decay,
        seed=run.config.seed,
    )


def class_probabilities(features: np.ndarray, svms: dict[str, Any]) -> np.ndarray:
    """[..., K + 1] scores of features [..., D]: background 0, then each class's sigmoid of
    its SVM margin."""
    z = (features - svms["mean"]) / svms["scale"]
    margins = z @ svms["w"] + svms["b"]
    scores = 1.0 / (1.0 + np.exp(-margins))
    return np.concatenate([np.zeros((*scores.shape[:-1], 1), scores.dtype), scores], axis=-1)
