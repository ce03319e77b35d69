"""One jit-compiled pass over a split that sums everything eval reports, and the report's numbers.

The model enters as `apply_fn(variables, images) -> logits`: uint8 images [B, H, W, C] in,
float32 logits [B, classes] out (normalisation inside), so the same pass measures a trained
network (`eval.predict`) or any hand-built module (the tests' exactly shift-invariant one).
Every sum is weighted by the eval batches' mask, so padding never counts and each example
counts once.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import data
from evaluation import shift

ApplyFn = Callable[[Any, jax.Array], jax.Array]

# Expected calibration error over M = 15 equal-width confidence bins: Guo et al. 2017, "On
# Calibration of Modern Neural Networks" (arXiv 1706.04599), sections 2 and 5.
ECE_BINS = 15
# The random shift pairs are the same for every model and run, so their consistencies compare.
RANDOM_PAIR_SEED = 0
MODES = ("circular", "zero_fill")


def calibration_sums(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, bins: int = ECE_BINS
) -> dict[str, jax.Array]:
    """Returns per-bin sums [bins] of the top-1 softmax confidence of logits [B, classes]:
    'bin_count' (examples), 'bin_confidence' (sum of confidences), 'bin_correct' (top-1 hits)."""
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    confidence = jnp.max(probabilities, axis=-1)
    correct = (jnp.argmax(probabilities, axis=-1) == labels).astype(jnp.float32)
    index = jnp.clip(jnp.floor(confidence * bins).astype(jnp.int32), 0, bins - 1)
    zeros = jnp.zeros((bins,), jnp.float32)
    return {
        "bin_count": zeros.at[index].add(mask),
        "bin_confidence": zeros.at[index].add(confidence * mask),
        "bin_correct": zeros.at[index].add(correct * mask),
    }


def batch_sums(
    apply_fn: ApplyFn,
    variables,
    batch: dict[str, jax.Array],
    batch_index: jax.Array,
    *,
    num_classes: int,
    max_shift: int,
    tta: bool,
) -> dict[str, jax.Array]:
    """Returns the sums over the real examples of one eval batch (jit-able):

    count; confusion [classes, classes] (rows: true class, columns: predicted); the calibration
    bins (`calibration_sums`); shift_correct and shift_same [max_shift + 1, 2] (shift k, mode
    circular|zero_fill: top-1 correct, top-1 equal to the unshifted image's); pair_same (two
    random circular shifts in [-max_shift, max_shift]^2 give the same top-1, Zhang 2019); and
    with `tta`, tta_correct (top-1 of the mean softmax of the image and its mirror image).
    """
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    size = images.shape[0]

    def logits_at(k):
        offsets = shift.curve_offsets(size, k)
        return jnp.stack(
            [
                apply_fn(variables, shift.translate(images, offsets, circular=c))
                for c in (True, False)
            ]
        )

    # One compiled loop body serves every shift; shift 0 is the unshifted image, computed by the
    # same code as the others, so its consistency is exactly 1.
    logits = jax.lax.map(logits_at, jnp.arange(max_shift + 1))  # [K + 1, 2, B, classes]
    predictions = jnp.argmax(logits, axis=-1)  # [K + 1, 2, B]
    clean_logits, clean = logits[0, 0], predictions[0, 0]
    sums = {
        "count": jnp.sum(mask),
        "confusion": jnp.zeros((num_classes, num_classes), jnp.float32).at[labels, clean].add(mask),
        **calibration_sums(clean_logits, labels, mask),
        "shift_correct": jnp.sum((predictions == labels) * mask, axis=-1),
        "shift_same": jnp.sum((predictions == predictions[:1]) * mask, axis=-1),
    }
    key = jax.random.fold_in(jax.random.key(RANDOM_PAIR_SEED), batch_index)
    first, second = (
        jnp.argmax(
            apply_fn(
                variables,
                shift.translate(images, shift.random_offsets(k, size, max_shift), circular=True),
            ),
            axis=-1,
        )
        for k in jax.random.split(key)
    )
    sums["pair_same"] = jnp.sum((first == second) * mask)
    if tta:
        mirrored = apply_fn(variables, images[:, :, ::-1])
        mean_probabilities = jax.nn.softmax(clean_logits) + jax.nn.softmax(mirrored)
        sums["tta_correct"] = jnp.sum((jnp.argmax(mean_probabilities, -1) == labels) * mask)
    return sums


def split_sums(
    apply_fn: ApplyFn,
    variables,
    split: data.Split,
    *,
    batch_size: int,
    mesh: Mesh,
    num_classes: int,
    max_shift: int,
    tta: bool,
) -> dict[str, np.ndarray]:
    """Returns `batch_sums` added up over every example of `split` (host numpy arrays).

    Batches of `batch_size` are split over the mesh's 'data' axis; `variables` are used as
    laid out (replicated, for a restored train state). Compiles once.
    """
    step = jax.jit(
        functools.partial(
            batch_sums, apply_fn, num_classes=num_classes, max_shift=max_shift, tta=tta
        )
    )
    totals = None
    batches = data.eval_batches(
        split, global_batch_size=batch_size, sharding=NamedSharding(mesh, P("data"))
    )
    for index, batch in enumerate(batches):
        sums = step(variables, batch, np.int32(index))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return jax.device_get(totals)


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def summarize(sums: dict[str, np.ndarray], max_shift: int) -> dict[str, Any]:
    """Returns the report's numbers (JSON-ready) from `split_sums`' totals.

    Keys: count, accuracy, per_class_accuracy (None for a class without examples),
    confusion_matrix (ints, rows: true class, columns: predicted), ece, calibration (per bin:
    count, accuracy, confidence), tta_flip_accuracy (None when not measured), shift (see
    `eval.py`'s docstring for the layout).
    """
    count = float(sums["count"])
    confusion = np.rint(sums["confusion"]).astype(np.int64)
    per_class = [_ratio(confusion[c, c], confusion[c].sum()) for c in range(len(confusion))]
    bin_count, bin_correct = sums["bin_count"], sums["bin_correct"]
    bin_confidence = sums["bin_confidence"]
    ece = float(np.sum(np.abs(bin_correct - bin_confidence)) / count)
    shift_results = {
        mode: {
            "accuracy": [float(v) / count for v in sums["shift_correct"][:, m]],
            "consistency": [float(v) / count for v in sums["shift_same"][:, m]],
        }
        for m, mode in enumerate(MODES)
    }
    return {
        "count": int(round(count)),
        "accuracy": float(np.trace(confusion)) / count,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "ece": ece,
        "calibration": {
            "bins": len(bin_count),
            "count": [int(round(float(n))) for n in bin_count],
            "accuracy": [_ratio(h, n) for h, n in zip(bin_correct, bin_count, strict=True)],
            "confidence": [_ratio(s, n) for s, n in zip(bin_confidence, bin_count, strict=True)],
        },
        "tta_flip_accuracy": float(sums["tta_correct"]) / count if "tta_correct" in sums else None,
        "shift": {
            "max_shift": max_shift,
            "shifts": list(range(max_shift + 1)),
            **shift_results,
            "random_pair_consistency": float(sums["pair_same"]) / count,
        },
    }
