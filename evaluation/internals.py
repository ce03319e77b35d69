"""What the layers do, read off a trained model: which layers' activation maps to draw, the
first layer's filters, and pooling worked through with real numbers: one spatial window
(max, average and L2 of it) and one channel window (depth pooling's max) of the model's own
map, with the model's pooling layer's real output wherever it has one of that kind.

Pure NumPy on host arrays (activations from `models.capture_activations`), except the pooling
results, which come from the model's own pooling functions (`models.layers`).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from evaluation.taps import source_of
from models import layers
from models.shapes import LayerSpec

# Above this many conv/pool layers (deep ResNets), draw only the first layer of each new map
# shape: one figure per stage rather than one per layer.
MAX_STAGES = 12
# Pooling functions over an H x W window (depth pooling pools channels: `depth_example`).
WINDOW_POOLS = ("max", "avg", "l2")
# Without a pooling layer, the worked example pools a 2 x 2 window with stride 2.
DEFAULT_WINDOW = 2


def activation_stages(specs: Sequence[LayerSpec], limit: int = MAX_STAGES) -> list[LayerSpec]:
    """Returns the layers whose activation maps are drawn: every conv, locally connected and
    pooling layer with an (H, W, C) output, or, when there are more than `limit`, the first of
    each run of layers with the same output shape."""
    spatial = [s for s in specs if s.kind in ("conv", "local", "pool") and len(s.out_shape) == 3]
    if len(spatial) <= limit:
        return spatial
    return [s for i, s in enumerate(spatial) if i == 0 or s.out_shape != spatial[i - 1].out_shape]


def first_layer_filters(model: nnx.Module, specs: Sequence[LayerSpec]) -> tuple[np.ndarray, str]:
    """Returns (filters float32 [K, h, w, C], description) of the first layer with weights.

    conv: its K filters [F, F, C]. local (no weight sharing): the filter bank of the central
    output position. dense (an MLP): each unit's weights laid out as an image [H, W, C].
    """
    first = next(s for s in specs if s.kind in ("conv", "local", "dense"))
    kernel = np.asarray(model.layers[first.name].kernel[...], np.float32)
    f = first.kernel_size
    if first.kind == "conv":
        _, _, channels, count = kernel.shape
        return kernel.transpose(3, 0, 1, 2), f"{first.name}: {count} filters of {f}x{f}x{channels}"
    if first.kind == "local":
        h2, w2, _, count = kernel.shape
        channels = first.in_shape[-1]
        centre = kernel[h2 // 2, w2 // 2].reshape(f, f, channels, count)
        return centre.transpose(3, 0, 1, 2), (
            f"{first.name} (locally connected, no weight sharing): the {count} filters of "
            f"{f}x{f}x{channels} at output position ({h2 // 2}, {w2 // 2}) of {h2}x{w2}; every "
            "position has its own"
        )
    image_shape = specs[0].in_shape
    count = kernel.shape[1]
    return kernel.T.reshape(count, *image_shape), (
        f"{first.name} (dense): the weights of each of its {count} units laid out as an image "
        f"{'x'.join(map(str, image_shape))}"
    )


def pooling_example(
    activations: Mapping[str, np.ndarray], specs: Sequence[LayerSpec], image_index: int = 0
) -> dict[str, Any] | None:
    """Returns one pooling window of a real feature map worked through (JSON-ready), or None.

    The map is the input of the model's first max/avg/L2 pooling layer (window F, stride S,
    padding P), or, for a model without one, the first activation layer's output with a 2x2
    window, stride 2. Among the windows that lie inside the map, on the pooling grid, in any
    channel, the one whose values spread most is chosen (so max, average and L2 differ).
    Keys: layer, pool_layer, function, window, stride, padding, output_position (row, col),
    input_position (top, left), channel, values [F][F], max, avg, l2 (by the model's pooling
    functions), model_output (the pooling layer's real output there, None without one),
    model_pooling (the model's pooling functions), depth (`depth_example` on the model's
    depth-pooled map, or else on this map).
    `activations`: {layer name: [N, ...]} as from `models.capture_activations`.
    """
    pool = next((s for s in specs if s.kind == "pool" and s.function in WINDOW_POOLS), None)
    if pool is not None and source_of(pool, specs) in activations:
        source, f, s, p = source_of(pool, specs), pool.kernel_size, pool.stride, pool.padding
    else:
        pool = None
        maps = [x for x in specs if x.kind == "act" and len(x.out_shape) == 3]
        maps = maps or [x for x in specs if len(x.out_shape) == 3]
        if not maps:
            return None
        source, f, s, p = maps[0].name, DEFAULT_WINDOW, DEFAULT_WINDOW, 0
    feature_map = np.asarray(activations[source][image_index])  # [H, W, C]
    height, width, _ = feature_map.shape
    rows = [o for o in range((height + 2 * p - f) // s + 1) if 0 <= o * s - p <= height - f]
    cols = [o for o in range((width + 2 * p - f) // s + 1) if 0 <= o * s - p <= width - f]
    if not rows or not cols:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(feature_map, (f, f), axis=(0, 1))
    grid = windows[np.array(rows)[:, None] * s - p, np.array(cols)[None, :] * s - p]
    spread = grid.max(axis=(-2, -1)).astype(np.float32) - grid.min(axis=(-2, -1))
    r, c, channel = np.unravel_index(np.argmax(spread), spread.shape)
    row, col = rows[r], cols[c]
    window = grid[r, c, channel]  # [F, F], in the activations' dtype
    x = jnp.asarray(window)[None, :, :, None]
    results = {name: float(layers.pool(x, name, f, f, 0)[0, 0, 0, 0]) for name in WINDOW_POOLS}
    top, left = row * s - p, col * s - p
    return {
        "layer": source,
        "pool_layer": pool.name if pool else None,
        "function": pool.function if pool else None,
        "window": f,
        "stride": s,
        "padding": p,
        "output_position": [row, col],
        "input_position": [top, left],
        "channel": int(channel),
        "values": np.asarray(window, np.float32).tolist(),
        **results,
        "model_output": float(activations[pool.name][image_index, row, col, channel])
        if pool
        else None,
        "model_pooling": sorted({x.function for x in specs if x.kind == "pool"}),
        "depth": depth_example(activations, specs, source, image_index),
    }


def depth_example(
    activations: Mapping[str, np.ndarray],
    specs: Sequence[LayerSpec],
    fallback: str,
    image_index: int = 0,
) -> dict[str, Any] | None:
    """Returns one depth-pooling window of a real feature map worked through (JSON-ready):
    the F channels one output channel of depth pooling takes the max of, at one position.

    The map is the input of the model's first depth pooling layer (window F, stride S,
    padding P over the channels), or, for a model without one, the map `fallback` (the
    spatial example's) with a window of 2 channels, stride 2. Among the output channels whose
    window lies inside the channels, at any position, the window whose values spread most is
    chosen. Keys: layer, pool_layer, window, stride, padding, position (row, col),
    output_channel, channels (first, last), values [F], depth (the max, by the model's depth
    pooling function), model_output (the depth pooling layer's output there, None without).
    """
    pool = next((s for s in specs if s.kind == "pool" and s.function == "depth"), None)
    if pool is not None and source_of(pool, specs) in activations:
        source, f, s, p = source_of(pool, specs), pool.kernel_size, pool.stride, pool.padding
    else:
        pool, source, f, s, p = None, fallback, DEFAULT_WINDOW, DEFAULT_WINDOW, 0
    feature_map = np.asarray(activations[source][image_index])  # [H, W, C]
    channels = feature_map.shape[-1]
    outputs = [d for d in range((channels + 2 * p - f) // s + 1) if 0 <= d * s - p <= channels - f]
    if not outputs:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(feature_map, f, axis=2)
    grid = windows[:, :, np.array(outputs) * s - p]  # [H, W, outputs, F]
    spread = grid.max(axis=-1).astype(np.float32) - grid.min(axis=-1)
    row, col, d = np.unravel_index(np.argmax(spread), spread.shape)
    values = grid[row, col, d]
    first = outputs[d] * s - p
    x = jnp.asarray(values)[None, None, None, :]
    return {
        "layer": source,
        "pool_layer": pool.name if pool else None,
        "window": f,
        "stride": s,
        "padding": p,
        "position": [int(row), int(col)],
        "output_channel": int(outputs[d]),
        "channels": [int(first), int(first + f - 1)],
        "values": np.asarray(values, np.float32).tolist(),
        "depth": float(layers.pool(x, "depth", f, f, 0)[0, 0, 0, 0]),
        "model_output": float(activations[pool.name][image_index, row, col, outputs[d]])
        if pool
        else None,
    }
