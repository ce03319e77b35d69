"""Linear probes per layer (Alain & Bengio 2016, "Understanding intermediate layers using
linear classifier probes", arXiv 1610.01644): how linearly decodable the class is from each
probe point's output (`evaluation.taps.probe_points`), so that "deeper layers hold more
abstract features" is a measured curve, not a picture.

For each probe point, the output is pooled into a feature vector (global average pooling,
and a 2 x 2 grid of averages that keeps a little of where things are: `taps.pooled`) for
PROBE_TRAIN_EXAMPLES training images (a fixed random subset) and every image of the eval
split, read through the model's own intermediates in one jit-compiled pass per split. A
multinomial logistic regression (softmax, with a small L2 penalty) is fitted on the
standardised training features by optax's L-BFGS (full batch, jit-compiled, stopped at a
gradient norm below TOLERANCE or MAX_ITERATIONS) and scored on the eval split.

Opt-in (`--measures=...,probes`): it reads thousands of training images on top of the eval
split and fits two classifiers per layer (seconds to a minute on a CPU for the CPU models).
"""

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import data
from evaluation import figures as figures_lib
from evaluation.base import Context, Measure, register
from evaluation.measures import percent
from training import optim

PROBE_TRAIN_EXAMPLES = 4096  # training images the probes are fitted on (fewer if the split is)
PROBE_GRIDS = (1, 2)  # global average pooling, then a 2 x 2 grid of averages
SUBSET_SEED = 0  # the same training images for every model
# The L2 penalty on the weights (standardised features, mean cross-entropy): small, so it only
# keeps separable classes from pushing the weights to infinity.
WEIGHT_DECAY = 1e-4
MAX_ITERATIONS = 500
TOLERANCE = 1e-5  # on the norm of the loss's gradient


@functools.partial(jax.jit, static_argnames=("num_classes", "iterations"))
def _fit(features, labels, num_classes: int, weight_decay, tolerance, iterations: int):
    """Fits softmax regression on standardised features [N, D]; returns (params, mean, scale,
    iterations run, final loss)."""
    mean = jnp.mean(features, axis=0)
    scale = jnp.std(features, axis=0)
    # A constant column (a dead unit, or a padding column) is centred, not blown up.
    scale = jnp.where(scale > 1e-6 * (1 + jnp.abs(mean)), scale, 1.0)
    z = (features - mean) / scale

    def loss(params):
        logits = z @ params["w"] + params["b"]
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return cross_entropy + 0.5 * weight_decay * jnp.sum(params["w"] ** 2)

    params = {
        "w": jnp.zeros((features.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    params, count = optim.minimize_lbfgs(loss, params, tolerance=tolerance, iterations=iterations)
    return params, mean, scale, count, loss(params)


def fit_probe(
    train: np.ndarray,
    train_labels: np.ndarray,
    tests: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    *,
    width: int | None = None,
    weight_decay: float = WEIGHT_DECAY,
    iterations: int = MAX_ITERATIONS,
) -> dict[str, Any]:
    """Fits a linear softmax probe on features `train` [N, D] with `train_labels` and scores
    it on each of `tests` {name: (features [M, D], labels [M])}.

    `width` pads the features with zero columns to that many (a padding column stays at zero
    weight: the fit and its accuracies do not change), so that probes of different layers
    share one compiled solver. Returns {'features': D, 'iterations', 'loss', and
    '<name>_accuracy' for each test set}.
    """
    dim = train.shape[1]
    pad = ((0, 0), (0, max(width or dim, dim) - dim))
    params, mean, scale, count, loss = _fit(
        jnp.asarray(np.pad(train, pad), jnp.float32),
        jnp.asarray(train_labels, jnp.int32),
        num_classes,
        weight_decay,
        TOLERANCE,
        iterations,
    )
    w, b = np.asarray(params["w"])[:dim], np.asarray(params["b"])
    mean, scale = np.asarray(mean)[:dim], np.asarray(scale)[:dim]
    out: dict[str, Any] = {"features": dim, "iterations": int(count), "loss": float(loss)}
    for name, (features, labels) in tests.items():
        predicted = np.argmax(((features - mean) / scale) @ w + b, axis=-1)
        out[f"{name}_accuracy"] = float(np.mean(predicted == labels))
    return out


def training_subset(split: data.Split, size: int = PROBE_TRAIN_EXAMPLES) -> data.Split:
    """Returns `size` examples of `split` drawn without replacement (SUBSET_SEED), in order;
    the whole split when it is smaller."""
    if len(split) <= size:
        return split
    index = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(split), size, replace=False))
    return data.Split(split.images[index], split.labels[index])


def probe_layers(context: Context) -> dict[str, Any]:
    """Reads the probe points' features of the training subset and the eval split, fits a
    probe per point and grid, and returns the 'probes' field of eval.json."""
    tap = context.require_tap(Probes.name)
    train = training_subset(context.train_split)
    read = functools.partial(
        tap.split_features,
        context.variables,
        batch_size=context.batch_size,
        mesh=context.mesh,
        grids=PROBE_GRIDS,
    )
    train_features, test_features = read(train), read(context.split)
    width = max(f.shape[1] for grid in train_features.values() for f in grid.values())
    layers = []
    for point in tap.points:
        entry = point.describe()
        for grid in PROBE_GRIDS:
            if grid > 1 and len(point.shape) != 3:
                entry[f"grid{grid}"] = None  # a vector: no grid to pool over
                continue
            fitted = fit_probe(
                train_features[grid][point.name],
                train.labels,
                {
                    "train": (train_features[grid][point.name], train.labels),
                    "test": (test_features[grid][point.name], context.split.labels),
                },
                context.options.num_classes,
                width=width,
            )
            if grid == 1:
                entry.update(fitted)
            else:
                entry[f"grid{grid}"] = fitted
        layers.append(entry)
    counts = np.bincount(context.split.labels, minlength=context.options.num_classes)
    return {
        "probes": {
            "train_examples": len(train),
            "test_examples": len(context.split),
            "split": context.split_name,
            "solver": "optax.lbfgs, softmax cross-entropy on standardised features",
            "weight_decay": WEIGHT_DECAY,
            "max_iterations": MAX_ITERATIONS,
            "grids": list(PROBE_GRIDS),
            "majority_class_accuracy": float(counts.max() / counts.sum()),
            "layers": layers,
            "trend": trend(layers, len(context.split)),
        }
    }


def trend(layers: list[dict], count: int, key: str = "test_accuracy") -> dict[str, Any]:
    """How the probes' accuracy goes with depth: Spearman's rank correlation of depth and
    accuracy (1: it only rises), and 'falls': each step from one probe point to the next where
    the accuracy drops by more than twice the standard error of the difference (binomial, the
    `count` eval images), with 'first', 'best' and 'last_hidden' ({'layer', 'accuracy'})."""
    from scipy import stats  # a dependency of JAX

    values = [layer[key] for layer in layers]
    falls = []
    for before, after in itertools.pairwise(layers):
        a, b = before[key], after[key]
        error = np.sqrt((a * (1 - a) + b * (1 - b)) / max(count, 1))
        if a - b > 2 * error:
            falls.append({"from": before["layer"], "to": after["layer"], "before": a, "after": b})
    hidden = [layer for layer in layers if layer["kind"] not in ("input", "output")]
    pick = lambda layer: {"layer": layer["layer"], "accuracy": layer[key]}  # noqa: E731
    rho = stats.spearmanr(range(len(values)), values).statistic if len(values) > 2 else None
    return {
        "spearman": None if rho is None or np.isnan(rho) else float(rho),
        "falls": falls,
        "first": pick(layers[0]),
        "best": pick(max(layers, key=lambda layer: layer[key])),
        "last_hidden": pick(hidden[-1]) if hidden else None,
    }


def trend_sentence(probes: dict[str, Any]) -> str:
    """One sentence on what the probe accuracies do with depth, from `trend`'s numbers."""
    t = probes["trend"]
    rho = "undefined" if t["spearman"] is None else f"{t['spearman']:+.2f}"
    last = t["last_hidden"] or t["best"]
    verdict = "rises with depth overall" if (t["spearman"] or 0) > 0.5 else "does not rise steadily"
    text = (
        f"probe accuracy {verdict} (Spearman rho {rho}): {t['first']['layer']} "
        f"{percent(t['first']['accuracy'])} -> {last['layer']} {percent(last['accuracy'])}, "
        f"best {t['best']['layer']} {percent(t['best']['accuracy'])}"
    )
    if not t["falls"]:
        return text + "; it falls at no step by more than 2 standard errors."
    falls = ", ".join(
        f"{f['from']} -> {f['to']} ({percent(f['before'])} -> {percent(f['after'])})"
        for f in t["falls"]
    )
    return text + f"; it falls at: {falls}."


@register
class Probes(Measure):
    """Linear probes per layer ('probes', see the module docstring): per probe point its depth,
    receptive field, feature dimension and the probe's train and test accuracy (global
    average pooling; 'grid2': a 2 x 2 grid of averages), and the trend with depth."""

    name = "probes"

    def run(self, context, sums):
        return probe_layers(context)

    def scalars(self, result):
        t = result["probes"]["trend"]
        scalars = {"probe_input_accuracy": t["first"]["accuracy"]}
        scalars["probe_best_accuracy"] = t["best"]["accuracy"]
        if t["last_hidden"]:
            scalars["probe_last_hidden_accuracy"] = t["last_hidden"]["accuracy"]
        if t["spearman"] is not None:
            scalars["probe_depth_spearman"] = t["spearman"]
        return scalars

    def headline(self, result):
        t = result["probes"]["trend"]
        last = t["last_hidden"] or t["best"]
        return [f"probes {percent(t['first']['accuracy'])} -> {percent(last['accuracy'])}"]

    def report(self, result):
        probes = result["probes"]
        lines = [
            f"linear probes ({probes['train_examples']} training images, scored on "
            f"{probes['test_examples']} {probes['split']} images; chance "
            f"{percent(probes['majority_class_accuracy'])}):",
            f"{'layer':<24} {'kind':<11} {'depth':>5} {'RF':>4} {'dims':>5} {'train':>7} "
            f"{'test':>7} {'2x2 test':>9}",
        ]
        for layer in probes["layers"]:
            grid = layer["grid2"]
            lines.append(
                f"{layer['layer']:<24} {layer['kind']:<11} {layer['depth']:>5} "
                f"{layer['receptive_field']:>4} {layer['features']:>5} "
                f"{percent(layer['train_accuracy']):>7} {percent(layer['test_accuracy']):>7} "
                f"{percent(grid['test_accuracy'] if grid else None):>9}"
            )
        return [*lines, trend_sentence(probes)]

    def figures(self, result, context):
        figures_lib.probe_curves(context.out_dir / "probes.png", result["probes"])
        return {}
