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


def pooling_window(path: Path, example: dict[str, Any]):
    """Draws one pooling window with its values and the max, average and L2 results."""
    values = np.asarray(example["values"])
    f = example["window"]
    fig = Figure(figsize=(8, 3.8))
    ax_window, ax_text = fig.subplots(1, 2, gridspec_kw={"width_ratios": (1, 1.2)})
    ax_window.imshow(values, cmap="viridis")
    for (i, j), value in np.ndenumerate(values):
        ax_window.text(
            j,
            i,
            f"{value:.3g}",
            ha="center",
            va="center",
            color="white",
            fontsize=max(6, 14 - 2 * f),
        )
    ax_window.set_xticks([])
    ax_window.set_yticks([])
    top, left = example["input_position"]
    ax_window.set_title(
        f"{example['layer']}, channel {example['channel']}, rows {top}-{top + f - 1}, "
        f"columns {left}-{left + f - 1}",
        fontsize=9,
    )
    lines = [
        f"{f}x{f} window, stride {example['stride']}",
        f"max     = {example['max']:.4g}",
        f"average = {example['avg']:.4g}",
        f"L2      = sqrt(mean of squares) = {example['l2']:.4g}",
    ]
    if example["pool_layer"]:
        lines.append(
            f"\n{example['pool_layer']} ({example['function']} pooling) outputs "
            f"{example['model_output']:.4g} at {tuple(example['output_position'])}"
        )
    else:
        lines.append("\n(the model has no pooling layer:\nthis window is for illustration)")
    ax_text.text(0.0, 0.5, "\n".join(lines), family="monospace", va="center", fontsize=10)
    ax_text.set_axis_off()
    return _save(fig, path)
