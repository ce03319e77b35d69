"""Detection figures: detections drawn on test images, the proposals of an image, and the
precision-recall curves behind AP50. Each function writes one PNG from plain arrays, so the
experiment's report and `python -m detection eval` draw the same figures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402

from detection import boxes as box_ops  # noqa: E402

COLORS = plt.get_cmap("tab10").colors


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def _box(ax, box, color, *, style="-", width=1.5) -> None:
    x1, y1, x2, y2 = box
    # pixel i covers [i, i + 1): imshow puts its centre at i, so the edges sit at -0.5
    ax.add_patch(
        patches.Rectangle(
            (x1 - 0.5, y1 - 0.5),
            x2 - x1,
            y2 - y1,
            fill=False,
            edgecolor=color,
            linestyle=style,
            linewidth=width,
        )
    )


def detections_grid(
    path: Path,
    images: np.ndarray,
    truth: Sequence[tuple[np.ndarray, np.ndarray]],
    detections: Sequence[Mapping],
    class_names: Sequence[str],
    *,
    min_score: float = 0.5,
    title: str = "",
) -> Path:
    """Draws each image with its ground truth (dashed white) and its detections scoring at
    least `min_score` (solid, one colour per class, labelled 'class score'); `detections[i]`
    holds 'boxes', 'scores', 'classes' as `detection.train.evaluate` keeps them."""
    n = len(detections)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    cells = zip(axes.flat[:n], images, truth, detections, strict=True)
    for ax, image, (true_boxes, _), found in cells:
        _show(ax, image)
        for box in true_boxes:
            _box(ax, box, "white", style="--", width=1.0)
        shown = 0
        for box, score, c in zip(found["boxes"], found["scores"], found["classes"], strict=True):
            if score < min_score:
                continue
            color = COLORS[c % len(COLORS)]
            _box(ax, box, color)
            ax.text(
                box[0] - 0.5,
                box[1] - 1.5,
                f"{class_names[c]} {score:.2f}",
                color="black",
                fontsize=6,
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "linewidth": 0},
            )
            shown += 1
        ax.set_title(f"{shown} detections >= {min_score}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def proposals_figure(
    path: Path,
    image: np.ndarray,
    proposals: np.ndarray,
    true_boxes: np.ndarray,
    *,
    count: int = 50,
) -> Path:
    """Draws the first `count` proposals of an image (thin, by rank) beside its ground truth
    (thick), and names how many proposals the image has and how many objects they find at
    IoU >= 0.5 and 0.7."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    for ax in axes:
        _show(ax, image)
    for box in proposals[:count]:
        _box(axes[0], box, "yellow", width=0.6)
    for box in true_boxes:
        _box(axes[1], box, "lime", width=1.5)
    best = box_ops.iou(true_boxes, proposals).max(axis=1) if len(proposals) else np.zeros(0)
    found = {t: int((best >= t).sum()) for t in (0.5, 0.7)}
    axes[0].set_title(
        f"the first {min(count, len(proposals))} of {len(proposals)} proposals", fontsize=8
    )
    axes[1].set_title(
        f"{len(true_boxes)} objects: {found[0.5]} found at IoU 0.5, {found[0.7]} at 0.7",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pr_curves(path: Path, curves: Mapping[str, Mapping[str, Sequence[float]]]) -> Path:
    """One panel per method: the precision-recall curve at IoU 0.5 of each class (thin) and
    their mean (thick), from `curves[method][class]` at COCO's 101 recall points."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), squeeze=False)
    recall = np.linspace(0, 1, 101)
    for ax, (method, per_class) in zip(axes[0], curves.items(), strict=True):
        for i, (name, precision) in enumerate(per_class.items()):
            ax.plot(recall, precision, color=COLORS[i % len(COLORS)], lw=0.8, label=name)
        if per_class:
            mean = np.mean([np.asarray(p) for p in per_class.values()], axis=0)
            ax.plot(recall, mean, color="black", lw=2.2, label=f"mean (AP50 {mean.mean():.3f})")
        ax.set_title(method)
        ax.set_xlabel("recall")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision (IoU 0.5)")
    axes[0][-1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
