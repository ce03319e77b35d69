"""Region proposals: selective search (Uijlings et al. 2013), cached on disk, and their recall.

Selective search is OpenCV contrib's (`cv2.ximgproc.segmentation`, the headless build in the
project's dependencies): 'fast' (one colour space, two strategies) or 'quality' (more colour
spaces and strategies, several segmentation scales; about 4x slower and 2-3x more boxes).

Small images give few, coarse segments, so the image is first upscaled by `upscale` and the
boxes scaled back. Measured on 15 Fashion-MNIST test scenes of 96x96 (2-core CPU, one
thread), recall at IoU 0.5 / 0.7 with all proposals: fast, k=50, upscale 1: 0.98 / 0.87
(54 boxes, 77 ms per image); fast, k=50, upscale 2 (the default): 1.00 / 0.98 (228 boxes,
250 ms); quality, k=50, upscale 2: 1.00 / 1.00 (643 boxes, 1 s).

Proposals are (x1, y1, x2, y2) pixel boxes (`detection.boxes`), in OpenCV's order (its
hierarchical grouping ranks them: level times a random number, seeded by `Settings.seed` so
that the order is reproducible), duplicates and boxes smaller than `min_size` pixels a side
removed, at most `max_proposals`. An image for which selective search returns nothing gets
the whole image as its one proposal.

`ProposalCache` computes each image's proposals once and keeps them in a folder, one file per
(image content, settings): the SHA-256 of the pixels, shape and dtype and of the settings
names the file. A file that cannot be read, or that holds other settings or bad boxes, is
recomputed and overwritten (and counted in `stats['recomputed']`), never used.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from detection import boxes as box_ops
from errors import UserError

MODES = ("fast", "quality")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How proposals are computed (all of it goes into the cache key)."""

    mode: str = "fast"  # fast | quality
    base_k: int = 50  # Felzenszwalb-Huttenlocher k of the first segmentation
    inc_k: int = 50  # its increment between the segmentations of the quality mode
    sigma: float = 0.8  # Gaussian smoothing before segmenting
    upscale: float = 2.0  # the image is resized by this factor first
    min_size: float = 4.0  # boxes narrower or lower than this (pixels, original image) go
    max_proposals: int = 500  # the cap per image
    seed: int = 0  # OpenCV ranks the boxes with C's rand(): seeded with this (see _seed_rand)

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"proposal mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.max_proposals < 1 or self.upscale <= 0 or self.base_k < 1:
            raise UserError(
                f"proposal settings {self}: max_proposals and base_k must be >= 1, upscale > 0"
            )

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _seed_rand(seed: int) -> None:
    """OpenCV's selective search ranks its boxes by level times C's rand(), so the order (the
    set is fixed) changes from call to call unless the C library's generator is seeded."""
    # no C library to seed (not glibc): the order may vary, the set does not
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))


def selective_search(image: np.ndarray, settings: Settings = Settings()) -> np.ndarray:
    """Returns float32 [R, 4] proposals (x1, y1, x2, y2) of one image uint8 [H, W, C] (C = 1
    or 3, RGB), 1 <= R <= settings.max_proposals."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.dtype != np.uint8:
        raise UserError(
            f"selective search needs a uint8 image [H, W, 1 or 3], got {image.dtype} "
            f"{list(image.shape)}"
        )
    h, w = image.shape[:2]
    bgr = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., ::-1]
    if settings.upscale != 1:
        size = (max(1, round(w * settings.upscale)), max(1, round(h * settings.upscale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(bgr))
    if settings.mode == "fast":
        search.switchToSelectiveSearchFast(settings.base_k, settings.inc_k, settings.sigma)
    else:
        search.switchToSelectiveSearchQuality(settings.base_k, settings.inc_k, settings.sigma)
    _seed_rand(settings.seed)
    rects = np.asarray(search.process(), np.float32).reshape(-1, 4)  # x, y, w, h
    found = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    found = box_ops.clip(found / np.float32(settings.upscale), h, w)
    sizes = found[:, 2:] - found[:, :2]
    found = found[(sizes >= settings.min_size).all(axis=1)]
    found = np.round(found, 2)
    _, first = np.unique(found, axis=0, return_index=True)
    found = found[np.sort(first)][: settings.max_proposals]
    if not len(found):
        return np.array([[0, 0, w, h]], np.float32)
    return found.astype(np.float32)


def image_key(image: np.ndarray, settings: Settings) -> str:
    """The cache key of (image, settings): a SHA-256 of the pixels, shape, dtype, settings."""
    image = np.ascontiguousarray(image)
    digest = hashlib.sha256()
    digest.update(f"{image.shape}|{image.dtype}|{settings.key()}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ProposalCache:
    """Selective-search proposals computed once per (image, settings), kept in `folder`.

    `get(image)` returns the image's proposals (from disk, or computed and saved);
    `stats` counts hits, misses and recomputed (unreadable or mismatched) files.
    """

    def __init__(self, folder: str | os.PathLike, settings: Settings = Settings()):
        self.folder = Path(folder)
        self.settings = settings
        self.stats = {"hits": 0, "misses": 0, "recomputed": 0}

    def path(self, image: np.ndarray) -> Path:
        key = image_key(image, self.settings)
        return self.folder / key[:2] / f"{key}.npz"

    def _load(self, path: Path, image: np.ndarray) -> np.ndarray | None:
        try:
            with np.load(path, allow_pickle=False) as f:
                settings, proposals = str(f["settings"]), np.asarray(f["boxes"], np.float32)
        except Exception:  # truncated, not an npz, missing fields: recompute
            return None
        if settings != self.settings.key() or proposals.ndim != 2 or proposals.shape[1] != 4:
            return None
        try:
            box_ops.check_boxes(proposals, height=image.shape[0], width=image.shape[1])
        except UserError:
            return None
        return proposals if len(proposals) else None

    def get(self, image: np.ndarray) -> np.ndarray:
        path = self.path(image)
        if path.exists():
            proposals = self._load(path, image)
            if proposals is not None:
                self.stats["hits"] += 1
                return proposals
            self.stats["recomputed"] += 1
        else:
            self.stats["misses"] += 1
        proposals = selective_search(image, self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a killed run leaves a stray temporary file, never a half-written cache file
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.savez(f, boxes=proposals, settings=np.array(self.settings.key()))
        os.replace(f.name, path)
        return proposals

    def get_all(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        return [self.get(image) for image in images]


def recall(
    proposals: Sequence[np.ndarray],
    ground_truth: Sequence[np.ndarray],
    *,
    counts: Sequence[int] = (10, 20, 50, 100, 200, 500, 1000, 2000),
    thresholds: Sequence[float] = (0.5, 0.7),
) -> dict[float, dict[int, float]]:
    """Returns {IoU threshold: {N: recall}}: the fraction of the ground-truth boxes (over all
    images) that one of the image's first N proposals covers with IoU >= the threshold.
    Images without objects count for nothing; no ground truth at all raises UserError."""
    if len(proposals) != len(ground_truth):
        raise UserError(f"{len(proposals)} proposal lists for {len(ground_truth)} images")
    best = {n: [] for n in counts}
    for props, truth in zip(proposals, ground_truth, strict=True):
        truth = np.asarray(truth, np.float32).reshape(-1, 4)
        if not len(truth):
            continue
        overlaps = box_ops.iou(truth, np.asarray(props, np.float32).reshape(-1, 4))
        for n in counts:
            top = overlaps[:, :n]
            best[n].append(top.max(axis=1) if top.shape[1] else np.zeros(len(truth)))
    if not any(len(b) for b in best.values()):
        raise UserError("proposal recall: the images hold no ground-truth boxes")
    return {
        t: {n: float((np.concatenate(best[n]) >= t).mean()) for n in counts} for t in thresholds
    }
