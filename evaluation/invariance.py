"""Invariance through the layers (Lenc & Vedaldi 2015, arXiv 1411.5908; Zhang 2019, arXiv
1904.11486): how much each probe point's output changes when the input moves by 1..k pixels,
so that one sees where in the network invariance is built.

For probe point l (`evaluation.taps.probe_points`), representation phi_l (below) and circular
shift T_k (example r of each eval batch moved k pixels in direction r mod 4, as the shift
curves), over the N images x of the split:

    S_l(k) = 1/N sum_x cos(phi_l(x), phi_l(T_k x))
    B_l    = 1/M sum_(x, x') cos(phi_l(x), phi_l(x'))   (x' the next image of x's eval batch:
                                                         M pairs of two different images)
    I_l(k) = (S_l(k) - B_l) / (1 - B_l)                 (None when 1 - B_l < 1e-6)

so I = 1: the representation does not change under the shift; I = 0: an image and its shifted
copy are no more alike than two different images. Two representations:

- 'pooled': phi = the output averaged over H and W (the vector a global average pool would
  give). Global pooling of an equivariant map is invariant to circular shifts, so a stride-1
  layer is near 1 here; what lowers it is what breaks equivariance: strides and pooling
  (aliasing) and zero padding at the borders.
- 'map': phi = the whole output map, flattened. A stride-1 layer moves its map with the input,
  so it changes with the shift; pooling, strides and wider receptive fields make neighbouring
  positions alike; the global pool makes it exactly 'pooled'. This curve shows where
  invariance is built.

Circular shifts only: they lose no pixel, so whatever is not invariant is the network's doing.
Every probe point of networks up to `base.SHIFT_POINTS` points (ResNet-44); deeper ones get that
many, evenly spaced (each point's unshifted output is held through the shift loop).
Cheap enough to run by default: it shares the shift curves' forward passes (the tapped passes
return the logits too), adding one unshifted pass and the cosines.
"""

import itertools
from typing import Any

import jax.numpy as jnp

from evaluation import base, taps
from evaluation import figures as figures_lib
from evaluation.base import Batch, Context, Measure, register

REPRESENTATIONS = ("pooled", "map")
# Below this, 1 - B_l (how unlike two different images are) leaves nothing to normalise by.
MIN_SPREAD = 1e-6


def normalised(similar: float, pair: float) -> float | None:
    """(S - B) / (1 - B): 1 for an unchanged representation, 0 for one no more alike than two
    different images'; None when 1 - B < MIN_SPREAD."""
    spread = 1.0 - pair
    return None if spread < MIN_SPREAD else (similar - pair) / spread


@register
class LayerInvariance(Measure):
    """Invariance of every probe point's output to circular shifts k = 0..max_shift
    ('layer_invariance'; the formula is in the module docstring): per layer and per
    representation (globally pooled, whole map), the mean cosine S(k), the two-image baseline
    B and the normalised invariance I(k)."""

    name = "layer_invariance"
    shift_features = True

    def sums(self, batch: Batch) -> dict[str, Any]:
        mask = batch.mask
        pairs = mask * jnp.roll(mask, -1)  # (x, next x), both real images
        _, outputs = batch.layer_outputs
        layers = {}
        for name, similarity in batch.shift_similarity.items():
            other = taps.similarity(outputs[name], jnp.roll(outputs[name], -1, axis=0))
            layers[name] = {
                r: {
                    "shifted": jnp.sum(similarity[r] * mask, axis=-1),
                    "pair": jnp.sum(other[r] * pairs),
                }
                for r in REPRESENTATIONS
            }
        return {"pairs": jnp.sum(pairs), "layers": layers}

    def run(self, context: Context, sums) -> dict[str, Any]:
        tap = context.require_tap(self.name)
        count, pairs = context.count, float(sums["pairs"])
        layers = []
        for point in taps.thin(tap.points, base.SHIFT_POINTS):
            entry = point.describe()
            for r in REPRESENTATIONS:
                totals = sums["layers"][point.name][r]
                cosine = [float(v) / count for v in totals["shifted"]]
                pair = float(totals["pair"]) / pairs if pairs else None
                entry[r] = {
                    "cosine": cosine,
                    "pair_cosine": pair,
                    "invariance": [None if pair is None else normalised(c, pair) for c in cosine],
                }
            layers.append(entry)
        return {
            "layer_invariance": {
                "shifts": list(range(context.options.max_shift + 1)),
                "mode": "circular",
                "count": count,
                "pairs": int(round(pairs)),
                "layers": layers,
            }
        }

    def scalars(self, result):
        result = result["layer_invariance"]
        hidden = _hidden(result["layers"])
        if len(result["shifts"]) < 2 or not hidden:
            return {}
        scalars = {}
        for where, layer in (("first_layer", hidden[0]), ("last_hidden", hidden[-1])):
            for r in REPRESENTATIONS:
                value = layer[r]["invariance"][-1]
                if value is not None:
                    scalars[f"invariance_{r}_at_max_shift_{where}"] = value
        return scalars

    def report(self, result):
        return invariance_lines(result["layer_invariance"])

    def figures(self, result, context):
        path = context.out_dir / "layer_invariance.png"
        figures_lib.layer_invariance(path, result["layer_invariance"])
        return {}


def _hidden(layers: list[dict]) -> list[dict]:
    """The layers between the input and the class scores."""
    return [layer for layer in layers if layer["kind"] not in ("input", "output")]


def _value(v: float | None) -> str:
    return "    -" if v is None else f"{v:5.2f}"


def invariance_lines(result: dict[str, Any]) -> list[str]:
    """The report's lines: a table (layer, receptive field, jump, I(k) pooled and map for
    k = 1..K) and where the whole-map invariance at the largest shift rises most."""
    shifts = result["shifts"][1:]
    if not shifts:
        return ["layer invariance: no shift measured (--max_shift=0)"]
    ks = " ".join(f"{k:>5}" for k in shifts)
    lines = [
        "invariance to circular shifts by layer (1 = unchanged, 0 = as alike as two different "
        "images)",
        f"{'layer':<24} {'RF':>4} {'jump':>4}  pooled k={ks}  map k={ks}",
    ]
    for layer in result["layers"]:
        pooled = " ".join(_value(v) for v in layer["pooled"]["invariance"][1:])
        whole = " ".join(_value(v) for v in layer["map"]["invariance"][1:])
        lines.append(
            f"{layer['layer']:<24} {layer['receptive_field']:>4} {layer['jump']:>4}  "
            f"{'':7}{pooled}  {'':4}{whole}"
        )
    gain = invariance_gain(result["layers"], "map")
    if gain:
        lines.append(
            f"whole-map invariance at shift {shifts[-1]} rises most at {gain['layer']} "
            f"({gain['kind']}): {gain['before']:.2f} -> {gain['after']:.2f}"
        )
    return lines


def invariance_gain(layers: list[dict], representation: str) -> dict[str, Any] | None:
    """The layer whose invariance at the largest shift rises most over the previous layer's:
    {'layer', 'kind', 'before', 'after'}; None without two measured layers."""
    values = [(layer, layer[representation]["invariance"][-1]) for layer in layers]
    values = [(layer, v) for layer, v in values if v is not None]
    if len(values) < 2:
        return None
    steps = [(b - a, layer, a, b) for (_, a), (layer, b) in itertools.pairwise(values)]
    _, layer, before, after = max(steps, key=lambda step: step[0])
    return {"layer": layer["layer"], "kind": layer["kind"], "before": before, "after": after}
