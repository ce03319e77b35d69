"""What each layer's units respond to (Zeiler & Fergus 2014, "Visualizing and Understanding
Convolutional Networks", arXiv 1311.2901, in the simple form of its top-9 patches): for a few
units (channels) of each layer, the eval images that activate the unit most, each cropped to
the receptive field of the output position where it peaks.

A unit's response to an image is its largest value over the map's positions; the unit's
patches are the images with the largest responses (one patch per image). The crop is the
input window of that position: from the spec list, output index i of a layer sees input
pixels i * jump - offset ... + receptive_field - 1 along each axis, where the offset adds up
the paddings on the way (`evaluation.taps.geometries`), clipped to the image.

Opt-in (`--measures=...,top_patches`): one more pass over up to TOP_PATCH_IMAGES eval images,
and a large figure.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
from evaluation import figures as figures_lib
from evaluation import taps
from evaluation.base import Context, Measure, register

TOP_PATCH_IMAGES = 2048  # the first eval images searched
UNITS_PER_LAYER = 6  # the units shown: the most active ones (mean of their per-image maxima)
PATCHES_PER_UNIT = 6
MAX_ROWS = 8  # layers drawn (evenly spaced, first and last always) in deeper networks


def patch_layers(points: tuple[taps.Point, ...], limit: int = MAX_ROWS) -> list[taps.Point]:
    """The probe points with a map output (the input aside), at most `limit` of them, evenly
    spaced with the first and the last."""
    return taps.thin([p for p in points if len(p.shape) == 3 and p.kind != "input"], limit)


def _peaks(tap: taps.Tap, names: tuple[str, ...], variables, images):
    """{name: (values [B, C], flat positions [B, C])}: each unit's largest value over the map
    of each image, and where it is (row * W + col)."""
    _, outputs = tap.capture(variables, images)
    peaks = {}
    for name in names:
        x = outputs[name].astype(jnp.float32)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        peaks[name] = (jnp.max(flat, axis=1), jnp.argmax(flat, axis=1).astype(jnp.int32))
    return peaks


def unit_peaks(context: Context, names: tuple[str, ...], split: data.Split) -> dict[str, Any]:
    """Returns {name: (values [N, C], flat positions [N, C])} over `split`, one jit-compiled
    pass in eval batches."""
    tap = context.require_tap(TopPatches.name)
    step = jax.jit(functools.partial(_peaks, tap, names))
    parts = []
    batches = data.eval_batches(
        split,
        global_batch_size=context.batch_size,
        sharding=NamedSharding(context.mesh, P("data")),
    )
    for batch in batches:
        real = np.asarray(batch["mask"]) > 0
        peaks = jax.device_get(step(context.variables, batch["image"]))
        parts.append(jax.tree.map(lambda a, real=real: a[real], peaks))
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def top_units(
    point: taps.Point,
    geometry: taps.Geometry,
    values: np.ndarray,
    positions: np.ndarray,
    image_shape: tuple[int, ...],
) -> list[dict[str, Any]]:
    """The UNITS_PER_LAYER most active units of one layer, each with its PATCHES_PER_UNIT
    top images: {'channel', 'mean_peak', 'patches': [{'image', 'position', 'window',
    'activation'}]}; 'window' is (top, left, bottom, right), half-open, in the image."""
    width = point.shape[1]
    channels = np.argsort(-values.mean(axis=0), kind="stable")[:UNITS_PER_LAYER]
    units = []
    for c in channels:
        best = np.argsort(-values[:, c], kind="stable")[:PATCHES_PER_UNIT]
        patches = []
        for i in best:
            row, col = divmod(int(positions[i, c]), width)
            window = taps.input_window(geometry, (row, col), image_shape)
            patches.append(
                {
                    "image": int(i),
                    "position": [row, col],
                    "window": list(window),
                    "activation": float(values[i, c]),
                }
            )
        mean_peak = float(values[:, c].mean())
        units.append({"channel": int(c), "mean_peak": mean_peak, "patches": patches})
    return units


def crop(image: np.ndarray, window, geometry: taps.Geometry, position) -> np.ndarray:
    """Returns the receptive field of `position` as a float canvas [s, s, C] (s: the receptive
    field, at most the image's side): the clipped `window` of uint8 `image` [H, W, C] in [0, 1]
    where it lies, NaN where the field falls outside the image."""
    top, left, bottom, right = window
    side = min(geometry.size, max(image.shape[:2]))
    canvas = np.full((side, side, image.shape[2]), np.nan)
    raw_top = position[0] * geometry.jump - geometry.offset
    raw_left = position[1] * geometry.jump - geometry.offset
    dy = min(top - raw_top, side - (bottom - top))
    dx = min(left - raw_left, side - (right - left))
    canvas[dy : dy + bottom - top, dx : dx + right - left] = image[top:bottom, left:right] / 255.0
    return canvas


@register
class TopPatches(Measure):
    """For UNITS_PER_LAYER units of each of up to MAX_ROWS layers, the PATCHES_PER_UNIT eval
    images (of the first TOP_PATCH_IMAGES) that activate each most, cropped to the receptive
    field where it peaks ('top_patches'; the figure top_patches.png, layers as rows)."""

    name = "top_patches"

    def run(self, context, sums):
        tap = context.require_tap(self.name)
        if not tap.specs:
            raise ValueError("top patches need the model's specs (Tap.specs) for the windows")
        count = min(len(context.split), TOP_PATCH_IMAGES)
        split = data.Split(context.split.images[:count], context.split.labels[:count])
        points = patch_layers(tap.points)
        peaks = unit_peaks(context, tuple(p.name for p in points), split)
        geometry = taps.geometries(tap.specs)
        image_shape = split.images.shape[1:]
        layers = [
            {
                **point.describe(),
                "units": top_units(point, geometry[point.name], *peaks[point.name], image_shape),
            }
            for point in points
        ]
        return {
            "top_patches": {
                "images": count,
                "units_per_layer": UNITS_PER_LAYER,
                "patches_per_unit": PATCHES_PER_UNIT,
                "layers": layers,
            }
        }

    def figures(self, result, context):
        tap = context.require_tap(self.name)
        geometry = taps.geometries(tap.specs)
        rows = []
        for layer in result["top_patches"]["layers"]:
            g = geometry[layer["layer"]]
            crops = [
                [
                    crop(context.split.images[p["image"]], p["window"], g, p["position"])
                    for p in unit["patches"]
                ]
                for unit in layer["units"]
            ]
            rows.append((layer, crops))
        figures_lib.top_patches(context.out_dir / "top_patches.png", rows)
        return {}
