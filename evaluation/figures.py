"""The PNG figures of an evaluation, drawn with matplotlib's object API (no pyplot state, no
display: `Figure.savefig` renders with Agg), so they work in threads and on headless machines.

Grids of many small images (filters, activation maps) are tiled into one mosaic array and drawn
with a single `imshow`: hundreds of subplots would take seconds per figure.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DPI = 110
# Above this many classes the confusion matrix cells carry no numbers (they would not fit).
ANNOTATED_CLASSES = 20


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _unit_range(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Returns `x` scaled to [0, 1] over `axes` (constant slices become 0.5)."""
    low = x.min(axis=axes, keepdims=True)
    span = x.max(axis=axes, keepdims=True) - low
    return np.where(span > 0, (x - low) / np.where(span > 0, span, 1), 0.5)


def mosaic(tiles: np.ndarray, columns: int | None = None, gap: int = 1) -> np.ndarray:
    """Returns tiles [N, h, w] or [N, h, w, 3] laid out in a grid, `gap` NaN pixels apart
    (drawn as the background), as one float array [rows*(h+gap)-gap, columns*(w+gap)-gap, ...]."""
    count, h, w = tiles.shape[:3]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, *tiles.shape[3:]), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def confusion_matrix(path: Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str]):
    """Draws the confusion matrix (rows: true class, columns: predicted) with counts."""
    matrix = np.asarray(matrix)
    n = len(matrix)
    size = min(4 + 0.45 * n, 16)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    ticks = np.arange(n)
    font = "small" if n <= ANNOTATED_CLASSES else 4
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=font)
    ax.set_yticks(ticks, class_names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"confusion matrix: {matrix.sum()} images, accuracy {100 * accuracy:.1f}%")
    if n <= ANNOTATED_CLASSES:
        threshold = matrix.max() / 2
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                color = "white" if value > threshold else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    return _save(fig, path)


def shift_curves(path: Path, shift: dict[str, Any]):
    """Draws accuracy and consistency against the shift, circular and zero fill, with the
    random-pair consistency as a reference line."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key in zip(axes, ("accuracy", "consistency"), strict=True):
        for mode, style in (("circular", "o-"), ("zero_fill", "s--")):
            values = [100 * v for v in shift[mode][key]]
            ax.plot(shift["shifts"], values, style, label=mode.replace("_", " "))
        ax.set_xlabel("shift (pixels)")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
    pair = 100 * shift["random_pair_consistency"]
    axes[1].axhline(
        pair, color="gray", linestyle=":", label=f"random pairs, |shift| <= k: {pair:.1f}%"
    )
    axes[0].set_title("accuracy of shifted images")
    axes[1].set_title("prediction unchanged by the shift")
    axes[1].legend(fontsize="small")
    return _save(fig, path)


def reliability(path: Path, calibration: dict[str, Any], ece: float):
    """Draws the reliability diagram: accuracy against confidence per bin, with the diagonal."""
    bins = calibration["bins"]
    centres = (np.arange(bins) + 0.5) / bins
    accuracy = [np.nan if a is None else a for a in calibration["accuracy"]]
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.bar(centres, accuracy, width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {100 * ece:.2f}% ({bins} bins)")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def _rgb_or_gray(images: np.ndarray) -> np.ndarray:
    """[N, h, w, C] -> [N, h, w, 3] for C == 3, else the channel mean [N, h, w]."""
    return images if images.shape[-1] == 3 else images.mean(axis=-1)


def filters(path: Path, weights: np.ndarray, description: str):
    """Draws filters [K, h, w, C] as a grid of images, each scaled to its own range."""
    tiles = _rgb_or_gray(_unit_range(np.asarray(weights, np.float32), (1, 2, 3)))
    grid = mosaic(tiles)
    fig = Figure(figsize=(7, 7.5))
    ax = fig.add_subplot()
    if grid.ndim == 3:
        ax.imshow(np.where(np.isnan(grid), 1.0, grid), interpolation="nearest")
    else:
        ax.imshow(grid, cmap="gray", interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"first layer: {description}\n(each filter scaled to its own range)", fontsize=9)
    return _save(fig, path)


def activation_maps(path: Path, image: np.ndarray, name: str, maps: np.ndarray, caption: str):
    """Draws the input `image` [H, W, C] (uint8) beside the activation maps [h, w, n] of layer
    `name`, one map per filter, each scaled to its own range; the title names the layer and
    its shape, e.g. 'conv1 (32, 32, 16): 16 maps'."""
    maps = np.asarray(maps, np.float32)
    tiles = _unit_range(maps.transpose(2, 0, 1), (1, 2))
    fig = Figure(figsize=(11, 6))
    grid_spec = fig.add_gridspec(1, 2, width_ratios=(1, 3))
    ax_image = fig.add_subplot(grid_spec[0])
    ax_image.imshow(image if image.shape[-1] == 3 else image[..., 0], cmap="gray")
    ax_image.set_title(caption, fontsize=9)
    ax_image.set_axis_off()
    ax_maps = fig.add_subplot(grid_spec[1])
    ax_maps.imshow(mosaic(tiles), cmap="viridis", interpolation="nearest")
    ax_maps.set_axis_off()
    ax_maps.set_title(
        f"{name} {tuple(maps.shape)}: {maps.shape[-1]} maps (each scaled to its own range)"
    )
    return _save(fig, path)


def _annotated_values(ax, values: np.ndarray, size: int) -> None:
    """Draws a small array of values as coloured cells, each with its number."""
    ax.imshow(values, cmap="viridis")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", color="white", fontsize=size)
    ax.set_xticks([])
    ax.set_yticks([])


def _pooling_lines(example: dict[str, Any]) -> list[str]:
    """The text of the pooling figure: each kind's result, and the model's own outputs."""
    f, depth = example["window"], example.get("depth")
    lines = [
        f"{f}x{f} window, stride {example['stride']}:",
        f"max     = {example['max']:.4g}",
        f"average = {example['avg']:.4g}",
        f"L2      = sqrt(mean of squares) = {example['l2']:.4g}",
    ]
    if depth:
        lines.append(f"depth   = max of {depth['window']} channels = {depth['depth']:.4g}")
    if example["pool_layer"]:
        lines.append(
            f"\n{example['pool_layer']} ({example['function']} pooling) outputs "
            f"{example['model_output']:.4g} at {tuple(example['output_position'])}"
        )
    else:
        lines.append("\n(no spatial pooling layer in the model:\nits window is for illustration)")
    if depth and depth["pool_layer"]:
        lines.append(
            f"{depth['pool_layer']} (depth pooling) outputs {depth['model_output']:.4g}\n"
            f"at {tuple(depth['position'])}, channel {depth['output_channel']}"
        )
    elif depth:
        lines.append("(no depth pooling layer in the model:\nits window is for illustration)")
    return lines


def pooling_window(path: Path, example: dict[str, Any]):
    """Draws pooling worked through on the model's own map: one spatial window with its
    values, one window of channels at one position (depth pooling), and what max, average,
    L2 and depth pooling make of them, with the model's pooling layers' real outputs."""
    values = np.asarray(example["values"])
    f, depth = example["window"], example.get("depth")
    fig = Figure(figsize=(12, 3.8))
    ax_window, ax_depth, ax_text = fig.subplots(1, 3, gridspec_kw={"width_ratios": (1, 1, 1.4)})
    _annotated_values(ax_window, values, max(6, 14 - 2 * f))
    top, left = example["input_position"]
    ax_window.set_title(
        f"{example['layer']}, channel {example['channel']}, rows {top}-{top + f - 1}, "
        f"columns {left}-{left + f - 1}",
        fontsize=9,
    )
    if depth:
        strip = np.asarray(depth["values"])[:, None]
        _annotated_values(ax_depth, strip, max(6, 14 - depth["window"]))
        first, last = depth["channels"]
        ax_depth.set_title(
            f"{depth['layer']} at {tuple(depth['position'])}, channels {first}-{last}", fontsize=9
        )
    else:
        ax_depth.set_axis_off()
    ax_text.text(0.0, 0.5, "\n".join(_pooling_lines(example)), family="monospace", va="center")
    ax_text.set_axis_off()
    return _save(fig, path)


def _layer_ticks(ax, names: Sequence[str], limit: int = 30) -> None:
    """Labels the x axis with layer names (every n-th one above `limit` layers)."""
    step = max(1, math.ceil(len(names) / limit))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)


def layer_invariance(path: Path, result: dict[str, Any]):
    """Draws the invariance of each probe point to circular shifts: layers along x, one curve
    per shift k = 1..K; left the globally pooled output, right the whole map."""
    layers = result["layers"]
    names = [layer["layer"] for layer in layers]
    fig = Figure(figsize=(max(8, 0.35 * len(names) + 4), 5))
    axes = fig.subplots(1, 2, sharey=True)
    titles = {
        "pooled": "globally pooled output (what strides and borders break)",
        "map": "whole map (where invariance is built)",
    }
    for ax, representation in zip(axes, ("pooled", "map"), strict=True):
        for k in result["shifts"][1:]:
            values = [layer[representation]["invariance"][k] for layer in layers]
            values = [np.nan if v is None else v for v in values]
            ax.plot(range(len(names)), values, marker=".", label=f"shift {k}")
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.axhline(0.0, color="gray", linestyle=":")
        _layer_ticks(ax, names)
        ax.set_title(titles[representation], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("invariance: (cos(x, shifted x) - cos(x, x')) / (1 - cos(x, x'))")
    axes[0].legend(fontsize="small")
    return _save(fig, path)


def probe_curves(path: Path, probes: dict[str, Any]):
    """Draws the linear probes' accuracy against depth (left, layers along x) and against the
    receptive field (right): test accuracy of the globally pooled and 2 x 2 grid features,
    train accuracy dotted, the majority class as chance."""
    layers = probes["layers"]
    names = [layer["layer"] for layer in layers]
    fields = [layer["receptive_field"] for layer in layers]
    curves = {
        "test, global pool": ([layer["test_accuracy"] for layer in layers], "o-"),
        "test, 2x2 grid": (
            [layer["grid2"]["test_accuracy"] if layer["grid2"] else np.nan for layer in layers],
            "s--",
        ),
        "train, global pool": ([layer["train_accuracy"] for layer in layers], ":"),
    }
    fig = Figure(figsize=(max(10, 0.35 * len(names) + 6), 5))
    axes = fig.subplots(1, 2, sharey=True)
    for label, (values, style) in curves.items():
        values = 100 * np.asarray(values, np.float64)
        axes[0].plot(range(len(names)), values, style, label=label, markersize=4)
        axes[1].plot(fields, values, style, label=label, markersize=4)
    for ax in axes:
        ax.axhline(100 * probes["majority_class_accuracy"], color="gray", linestyle=":")
        ax.grid(alpha=0.3)
    _layer_ticks(axes[0], names)
    axes[0].set_ylabel("linear probe accuracy (%)")
    axes[0].set_title(f"by depth ({probes['test_examples']} {probes['split']} images)", fontsize=9)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("receptive field (pixels)")
    axes[1].set_title("by receptive field (gray: majority class)", fontsize=9)
    axes[1].legend(fontsize="small")
    return _save(fig, path)


def top_patches(path: Path, rows: Sequence[tuple[dict[str, Any], list[list[np.ndarray]]]]):
    """Draws, one row per layer, the top patches of its units: `rows` holds (layer, crops),
    crops[unit][patch] a float image [s, s, C] in [0, 1] (NaN outside the image), units
    side by side with a gap between them."""
    fig = Figure(figsize=(12, 1.6 * len(rows) + 0.6))
    axes = np.atleast_1d(fig.subplots(len(rows), 1))
    for ax, (layer, crops) in zip(axes, rows, strict=True):
        side, channels = crops[0][0].shape[0], crops[0][0].shape[-1]
        blank = np.full((side, side, channels), np.nan)
        tiles = [tile for unit in crops for tile in [*unit, blank]][:-1]
        grid = mosaic(np.stack(tiles), columns=len(tiles), gap=max(1, side // 16))
        if channels == 3:
            ax.imshow(np.where(np.isnan(grid), 1.0, grid), interpolation="nearest")
        else:
            ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        units = ", ".join(str(unit["channel"]) for unit in layer["units"])
        ax.set_title(
            f"{layer['layer']} (RF {layer['receptive_field']}, jump {layer['jump']}): "
            f"channels {units}",
            fontsize=8,
        )
    fig.suptitle("the eval images that activate each unit most, cropped to its receptive field")
    return _save(fig, path)
