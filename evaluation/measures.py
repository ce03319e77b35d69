"""Today's measures, one class each, registered by name (`--measures=`, in this order):

- accuracy: top-1 accuracy and loss (the compiled eval step's pass), per-class accuracy and
  the confusion matrix.
- calibration: expected calibration error and the reliability bins.
- speed: test-time images/s (a timed pass of the eval step).
- tta: flip test-time augmentation (the mean softmax of the image and its mirror image).
- shift: translation invariance, the shift curves and Zhang 2019's random-pair consistency.
- internals: figures of what the layers do (first-layer filters, activation maps, a pooling
  window worked through).

See `evaluation.base` for what a measure owns and how the hooks are called.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import data
import models
from evaluation import figures as figures_lib
from evaluation import internals, shift
from evaluation.base import Batch, Context, Measure, register
from training import state as state_lib

# Expected calibration error over M = 15 equal-width confidence bins: Guo et al. 2017, "On
# Calibration of Modern Neural Networks" (arXiv 1706.04599), sections 2 and 5.
ECE_BINS = 15
# The random shift pairs are the same for every model and run, so their consistencies compare.
RANDOM_PAIR_SEED = 0
MODES = ("circular", "zero_fill")
# Test images whose activation maps are drawn (the first ones of the split).
ACTIVATION_IMAGES = 2


def percent(value: float | None) -> str:
    """'12.5%' for 0.125; '-' for a value not measured."""
    return "-" if value is None else f"{100 * value:.1f}%"


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


@register
class Accuracy(Measure):
    """Top-1 accuracy and mean loss (from the eval step's pass), per-class accuracy (None for a
    class without examples), and the confusion matrix (rows: true class, columns: predicted)."""

    name = "accuracy"

    def sums(self, batch: Batch) -> dict[str, jax.Array]:
        n = batch.options.num_classes
        predicted = jnp.argmax(batch.logits, axis=-1)
        confusion = jnp.zeros((n, n), jnp.float32).at[batch.labels, predicted].add(batch.mask)
        return {"confusion": confusion}

    def run(self, context: Context, sums) -> dict[str, Any]:
        confusion = np.rint(sums["confusion"]).astype(np.int64)
        per_class = [_ratio(confusion[c, c], confusion[c].sum()) for c in range(len(confusion))]
        return {
            "accuracy": context.evaluation["accuracy"],
            "loss": context.evaluation["loss"],
            "per_class_accuracy": per_class,
            "confusion_matrix": confusion.tolist(),
        }

    def scalars(self, result):
        return {"accuracy": result["accuracy"], "loss": result["loss"]}

    def headline(self, result):
        return [f"accuracy {percent(result['accuracy'])}", f"loss {result['loss']:.4f}"]

    def report(self, result):
        per_class = ", ".join(
            f"{name} {percent(a)}"
            for name, a in zip(result["class_names"], result["per_class_accuracy"], strict=True)
        )
        return [f"per-class accuracy: {per_class}"]

    def figures(self, result, context):
        figures_lib.confusion_matrix(
            context.out_dir / "confusion_matrix.png",
            result["confusion_matrix"],
            result["class_names"],
        )
        return {}


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


@register
class Calibration(Measure):
    """Expected calibration error ('ece') and the reliability bins ('calibration': per bin
    count, accuracy, mean confidence; None for an empty bin)."""

    name = "calibration"

    def sums(self, batch):
        return calibration_sums(batch.logits, batch.labels, batch.mask)

    def run(self, context, sums):
        count, correct, confidence = sums["bin_count"], sums["bin_correct"], sums["bin_confidence"]
        return {
            "ece": float(np.sum(np.abs(correct - confidence)) / context.count),
            "calibration": {
                "bins": len(count),
                "count": [int(round(float(n))) for n in count],
                "accuracy": [_ratio(h, n) for h, n in zip(correct, count, strict=True)],
                "confidence": [_ratio(s, n) for s, n in zip(confidence, count, strict=True)],
            },
        }

    def scalars(self, result):
        return {"ece": result["ece"]}

    def headline(self, result):
        return [f"ECE {percent(result['ece'])}"]

    def figures(self, result, context):
        path = context.out_dir / "reliability.png"
        figures_lib.reliability(path, result["calibration"], result["ece"])
        return {}


@register
class Speed(Measure):
    """Test-time images/s of the compiled eval step (`Run.timed_evaluation`), with the batch
    size and the devices it ran on."""

    name = "speed"

    def run(self, context, sums):
        return {
            "images_per_s": context.evaluation["images_per_s"],
            "batch_size": context.run.config.training.eval_batch_size,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        }

    def scalars(self, result):
        return {"images_per_s": result["images_per_s"]}

    def headline(self, result):
        return [f"{result['images_per_s']:,.0f} images/s"]


@register
class FlipTTA(Measure):
    """Flip test-time augmentation: the top-1 accuracy of the mean softmax of each image and its
    mirror image ('tta_flip_accuracy'; None when not measured, 'tta' says whether it was)."""

    name = "tta"

    def sums(self, batch):
        if not batch.options.tta:
            return {}
        mirrored = batch.apply(batch.images[:, :, ::-1])
        mean_probabilities = jax.nn.softmax(batch.logits) + jax.nn.softmax(mirrored)
        correct = jnp.argmax(mean_probabilities, -1) == batch.labels
        return {"tta_correct": jnp.sum(correct * batch.mask)}

    def run(self, context, sums):
        measured = context.options.tta
        accuracy = float(sums["tta_correct"]) / context.count if measured else None
        return {"tta": measured, "tta_flip_accuracy": accuracy}

    def scalars(self, result):
        accuracy = result["tta_flip_accuracy"]
        return {} if accuracy is None else {"tta_flip_accuracy": accuracy}

    def headline(self, result):
        return [f"flip TTA accuracy {percent(result['tta_flip_accuracy'])}"]


@register
class Shift(Measure):
    """Translation invariance, in pixel space before normalisation ('shift'): for shifts
    k = 0..max_shift, circular and zero fill, the accuracy and the consistency (top-1 class
    equal to the unshifted image's) with example r of each batch moved in direction r mod 4;
    and Zhang 2019's random-pair consistency (two random circular shifts in [-k, k]^2 of one
    image give the same top-1 class; fixed seed, the same pairs for every model)."""

    name = "shift"
    shift_curves = True

    def sums(self, batch):
        predictions = jnp.argmax(batch.shift_logits, axis=-1)  # [K + 1, 2, B]
        size, max_shift = batch.images.shape[0], batch.options.max_shift
        key = jax.random.fold_in(jax.random.key(RANDOM_PAIR_SEED), batch.index)
        first, second = (
            jnp.argmax(
                batch.apply(
                    shift.translate(
                        batch.images, shift.random_offsets(k, size, max_shift), circular=True
                    )
                ),
                axis=-1,
            )
            for k in jax.random.split(key)
        )
        return {
            "shift_correct": jnp.sum((predictions == batch.labels) * batch.mask, axis=-1),
            "shift_same": jnp.sum((predictions == predictions[:1]) * batch.mask, axis=-1),
            "pair_same": jnp.sum((first == second) * batch.mask),
        }

    def run(self, context, sums):
        count, max_shift = context.count, context.options.max_shift
        curves = {
            mode: {
                "accuracy": [float(v) / count for v in sums["shift_correct"][:, m]],
                "consistency": [float(v) / count for v in sums["shift_same"][:, m]],
            }
            for m, mode in enumerate(MODES)
        }
        return {
            "shift": {
                "max_shift": max_shift,
                "shifts": list(range(max_shift + 1)),
                **curves,
                "random_pair_consistency": float(sums["pair_same"]) / count,
            }
        }

    def scalars(self, result):
        shift_result = result["shift"]
        scalars = {"random_pair_consistency": shift_result["random_pair_consistency"]}
        for mode in MODES:
            scalars[f"{mode}_consistency_at_max_shift"] = shift_result[mode]["consistency"][-1]
        return scalars

    def report(self, result):
        shift_result = result["shift"]
        lines = ["shift (pixels)        " + "".join(f"{k:>7}" for k in shift_result["shifts"])]
        for mode in MODES:
            for key in ("accuracy", "consistency"):
                label = f"{mode.replace('_', ' ')} {key}"
                values = shift_result[mode][key]
                lines.append(f"{label:<22}" + "".join(f"{percent(v):>7}" for v in values))
        lines.append(
            f"random-pair consistency (circular, |dy|, |dx| <= {shift_result['max_shift']}): "
            f"{percent(shift_result['random_pair_consistency'])}"
        )
        return lines

    def figures(self, result, context):
        figures_lib.shift_curves(context.out_dir / "shift_curves.png", result["shift"])
        return {}


@register
class Internals(Measure):
    """What the layers do, as figures: the first layer's filters, the activation maps of each
    stage for the first ACTIVATION_IMAGES images, and one pooling window worked through; its
    eval.json fields ('first_layer', 'activation_maps', 'pooling_example') describe them."""

    name = "internals"

    def figures(self, result, context):
        run, out_dir = context.run, context.out_dir
        model = state_lib.merge_model(run.graphdef, run.state)
        weights, description = internals.first_layer_filters(model, run.specs)
        figures_lib.filters(out_dir / "filters.png", weights, description)
        images = context.split.images[:ACTIVATION_IMAGES]
        activations = _activations(run, images)
        maps = []
        for i, image in enumerate(images):
            label = run.info.class_names[context.split.labels[i]]
            for spec in internals.activation_stages(run.specs):
                name = f"activations_{i}_{spec.name}.png"
                layer_maps = np.asarray(activations[spec.name][i])
                figures_lib.activation_maps(
                    out_dir / name, image, spec.name, layer_maps, f"image {i}: {label}"
                )
                maps.append(
                    {"image": i, "layer": spec.name, "shape": list(layer_maps.shape), "file": name}
                )
        example = internals.pooling_example(activations, run.specs)
        if example is not None:
            figures_lib.pooling_window(out_dir / "pooling_window.png", example)
        return {
            "first_layer": {"description": description, "file": "filters.png"},
            "activation_maps": maps,
            "pooling_example": example,
        }


def _activations(run, images: np.ndarray) -> dict[str, np.ndarray]:
    """Returns {layer name: activations [N, ...]} of `run`'s model for uint8 `images`."""
    norm = run.normalization()
    dtype = jnp.dtype(run.config.model.dtype)

    @jax.jit
    def capture(state, images):
        x = data.normalize(images, norm["mean"], norm["std"], dtype)
        return models.capture_activations(state_lib.merge_model(run.graphdef, state), x)[1]

    return jax.device_get(capture(run.state, images))


# The per-layer measures live in their own modules; importing them registers them.
from evaluation import invariance, patches, probes  # noqa: E402, F401

# What eval measures unless told otherwise (--measures), in this order: everything that costs
# at most a few passes over the eval split. Opt-in: 'probes' (a pass over training images and
# a fitted classifier per layer) and 'top_patches' (a pass keeping every unit's maxima, and a
# figure of crops).
DEFAULT = ("accuracy", "calibration", "speed", "tta", "shift", "layer_invariance", "internals")
