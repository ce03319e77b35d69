"""The claims report's figures (matplotlib's object API: no pyplot state, Agg rendering):
invariance through the layers, one panel per model, and the probe-accuracy curves of every
model by relative depth and by receptive field."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DPI = 110


def _values(layers: Sequence[dict], representation: str, shift: int) -> np.ndarray:
    values = [layer[representation]["invariance"][shift] for layer in layers]
    return np.array([np.nan if v is None else v for v in values], np.float64)


def invariance_panels(path: Path, models: Sequence[tuple[str, list[dict[str, Any]]]], shift: int):
    """One panel per model (name, its layer_invariance layers, seed means): the whole-map
    invariance at shifts 1 and `shift` and the globally pooled one at `shift`, layers along x."""
    fig = Figure(figsize=(5 * len(models), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(models), sharey=True))
    for ax, (name, layers) in zip(axes, models, strict=True):
        x = np.arange(len(layers))
        ax.plot(x, _values(layers, "map", 1), "o-", markersize=3, label="whole map, shift 1")
        if shift > 1:
            label = f"whole map, shift {shift}"
            ax.plot(x, _values(layers, "map", shift), "s-", markersize=3, label=label)
        ax.plot(x, _values(layers, "pooled", shift), "--", label=f"globally pooled, shift {shift}")
        step = max(1, int(np.ceil(len(layers) / 16)))
        ticks = list(range(0, len(layers), step))
        ax.set_xticks(ticks, [layers[i]["layer"] for i in ticks], rotation=90, fontsize=7)
        ax.axhline(0, color="gray", linestyle=":")
        ax.axhline(1, color="gray", linestyle=":")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("invariance to circular shifts\n(1 unchanged, 0 as two different images)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def probe_panels(path: Path, models: Sequence[tuple[str, list[dict[str, Any]]]], chance: float):
    """Probe test accuracy of each model (name, its probes layers, seed means) against the
    relative depth (0 the input, 1 the class scores) and against the receptive field."""
    fig = Figure(figsize=(11, 4.5))
    by_depth, by_field = fig.subplots(1, 2, sharey=True)
    for name, layers in models:
        accuracy = 100 * np.array([layer["test_accuracy"] for layer in layers])
        depth = np.array([layer["depth"] for layer in layers], np.float64)
        by_depth.plot(depth / max(depth[-1], 1), accuracy, "o-", markersize=3, label=name)
        fields = [layer["receptive_field"] for layer in layers]
        by_field.plot(fields, accuracy, "o-", markersize=3, label=name)
    for ax in (by_depth, by_field):
        ax.axhline(100 * chance, color="gray", linestyle=":")
        ax.grid(alpha=0.3)
    by_depth.set_xlabel("relative depth (probe point / last probe point)")
    by_depth.set_ylabel("linear probe test accuracy (%), global pooling")
    by_field.set_xscale("log", base=2)
    by_field.set_xlabel("receptive field (pixels)")
    by_field.legend(fontsize="small")
    by_depth.set_title("by depth (gray: majority class)")
    by_field.set_title("by receptive field")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
