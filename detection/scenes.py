"""Detection scenes: several objects per canvas, with their boxes and classes.

Two kinds, both deterministic given their arguments (one `numpy.random.Generator` per call):

- `builtin_scenes`: the built-in dataset's shapes (`data.builtin`: its 10 classes and masks)
  drawn at random sizes, colours and orientations on a larger canvas with a colour gradient,
  distractor rectangles and pixel noise. No files.
- `fashion_mnist_scenes`: real Fashion-MNIST items, rescaled and placed on a larger dark
  canvas, touching or overlapping, over clutter (small fragments of other items of the same
  split) and noise. Training scenes use only training items and test scenes only test items
  (`item_ids` says which item each object is).

Objects are painted in order, a later one over an earlier one. A position is redrawn (up to
`_TRIES` times, then the object is left out) if it would hide more than 1 - `min_visible` of
an object's pixels. Each box is the tight box of the object's *visible* pixels (VOC's rule),
(x1, y1, x2, y2) in pixels with exclusive max edges (`detection.boxes`).
"""

from __future__ import annotations

import dataclasses

import cv2
import ml_collections
import numpy as np

from data import builtin, catalog, files

TRAIN_SEED = 0  # as data.builtin: fixed streams, so every run sees the same scenes
TEST_SEED = 1
_TRIES = 20
_INK = 24  # Fashion-MNIST: a (rescaled) item pixel above this is the item's, below background
FASHION_MNIST_CLASSES = catalog.dataset_info(
    ml_collections.ConfigDict({"name": "fashion_mnist", "source": "files"})
).class_names


@dataclasses.dataclass(frozen=True)
class Scenes:
    """N scenes of side S with up to K objects each (padded).

    images uint8 [N, S, S, C]; boxes float32 [N, K, 4] (x1, y1, x2, y2) pixels, padding 0;
    classes int32 [N, K], padding -1; item_ids int64 [N, K]: the source dataset index of each
    object (-1: padding or generated); owners int8 [N, S, S] (only with `return_owners`): the
    object visible at each pixel, -1 for none.
    """

    images: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...]
    item_ids: np.ndarray
    owners: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def objects(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (boxes float32 [k, 4], classes int32 [k]) of scene `i`, without padding."""
        real = self.classes[i] >= 0
        return self.boxes[i][real], self.classes[i][real]


def _tight_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _compose(
    rng: np.random.Generator,
    size: int,
    patches: list[tuple[np.ndarray, int]],
    min_visible: float,
    touching: float,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Places boolean masks `patches` [(mask [h, w], class)] on an S x S canvas in order.

    Returns (owners int8 [S, S], [(patch index, y0, x0)] of the placed patches, in paint
    order). With probability `touching` a patch is placed against an earlier one's box edge.
    """
    owners = np.full((size, size), -1, np.int8)
    full: list[int] = []  # pixel count of each placed patch
    placed: list[tuple[int, int, int]] = []
    for index, (mask, _) in enumerate(patches):
        h, w = mask.shape
        if h > size or w > size:
            continue
        k = len(placed)
        for _ in range(_TRIES):
            if placed and rng.random() < touching:
                other, py, px = placed[rng.integers(len(placed))]
                ph, pw = patches[other][0].shape
                side = rng.integers(4)  # left, right, above, below that patch, +-2 px
                jitter = rng.integers(-2, 3)
                y0 = (py + rng.integers(-h // 2, ph // 2 + 1), py - h + jitter, py + ph + jitter)
                x0 = (px - w + jitter, px + pw + jitter, px + rng.integers(-w // 2, pw // 2 + 1))
                y0 = y0[0] if side < 2 else (y0[1] if side == 2 else y0[2])
                x0 = x0[0] if side == 0 else (x0[1] if side == 1 else x0[2])
                y0, x0 = int(np.clip(y0, 0, size - h)), int(np.clip(x0, 0, size - w))
            else:
                y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            trial = owners.copy()
            trial[y0 : y0 + h, x0 : x0 + w][mask] = k
            counts = np.bincount(trial.ravel().astype(np.int64) + 1, minlength=k + 2)[1:]
            if all(counts[j] >= min_visible * full[j] for j in range(k)):
                owners = trial
                full.append(int(mask.sum()))
                placed.append((index, y0, x0))
                break
    return owners, placed


def _finish(owners_list, placed_list, patches_list, images, class_names, ids_list, keep_owners):
    n = len(images)
    k = max((len(p) for p in placed_list), default=0)
    boxes = np.zeros((n, max(k, 1), 4), np.float32)
    classes = np.full((n, max(k, 1)), -1, np.int32)
    item_ids = np.full((n, max(k, 1)), -1, np.int64)
    for i, (owners, placed, patches, ids) in enumerate(
        zip(owners_list, placed_list, patches_list, ids_list, strict=True)
    ):
        for j, (index, _, _) in enumerate(placed):
            boxes[i, j] = _tight_box(owners == j)
            classes[i, j] = patches[index][1]
            item_ids[i, j] = ids[index]
    return Scenes(
        images,
        boxes,
        classes,
        class_names,
        item_ids,
        np.stack(owners_list) if keep_owners else None,
    )


# --- built-in shapes ------------------------------------------------------------------------


def builtin_scenes(
    n: int,
    *,
    seed: int,
    image_size: int = 96,
    objects: tuple[int, int] = (2, 5),
    object_size: tuple[float, float] = (14.0, 32.0),
    min_visible: float = 0.7,
    touching: float = 0.3,
    distractors: int = 12,
    noise: float = 0.06,
    return_owners: bool = False,
) -> Scenes:
    """Returns `n` RGB scenes of side `image_size`, each with `objects` (min, max inclusive)
    of the built-in dataset's shapes, sides drawn from `object_size` pixels."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    owners_list, placed_list, patches_list = [], [], []
    ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    for i in range(n):
        count = int(rng.integers(objects[0], objects[1] + 1))
        labels = rng.integers(0, builtin.NUM_CLASSES, count)
        sides = rng.uniform(*object_size, count)
        patches = []
        for label, side in zip(labels, sides, strict=True):
            s = int(np.ceil(side)) + 1
            p = {
                "labels": np.array([label]),
                "half": np.array([side / 2]),
                "cx": np.array([s / 2]),
                "cy": np.array([s / 2]),
                "turns": np.array([rng.integers(0, 4) if builtin._ORIENTED[label] else 0]),
                "mirror": np.array([builtin._ORIENTED[label] and rng.random() < 0.5]),
                "phase": rng.random(1),
            }
            mask = builtin._object_masks(p, s)[0]
            mask = mask[mask.any(axis=1)][:, mask.any(axis=0)]  # crop to the shape
            patches.append((mask, int(label)))
        owners, placed = _compose(rng, image_size, patches, min_visible, touching)
        # the canvas: a background colour with a gradient, distractor rectangles, the objects
        background = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        gradient = rng.uniform(-0.25, 0.25, (2, 3)).astype(np.float32)
        canvas = background + ramp[:, None, None] * gradient[0] + ramp[None, :, None] * gradient[1]
        for _ in range(distractors):
            h, w = rng.integers(1, 7, 2)
            y0, x0 = rng.integers(0, image_size, 2)
            canvas[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.0, 1.0, 3)
        for j in range(len(placed)):
            delta = rng.uniform(0.2, 0.55, 3)
            colour = np.where(background < 0.5, background + delta, background - delta)
            canvas[owners == j] = colour
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(noise)
        images[i] = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
        owners_list.append(owners)
        placed_list.append(placed)
        patches_list.append(patches)
    ids = [[-1] * len(p) for p in patches_list]
    return _finish(
        owners_list, placed_list, patches_list, images, builtin.CLASS_NAMES, ids, return_owners
    )


# --- Fashion-MNIST items ----------------------------------------------------------------------


def fashion_mnist_items(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (items uint8 [N, 28, 28], labels int32 [N]) of a Fashion-MNIST split, read
    offline from the official idx files in `data_dir` (`data.files`)."""
    images, labels = files.read("fashion_mnist", data_dir)[split]
    return images[..., 0], labels


def scenes_from_items(
    items: np.ndarray,
    labels: np.ndarray,
    n: int,
    *,
    seed: int,
    class_names: tuple[str, ...],
    image_size: int = 96,
    objects: tuple[int, int] = (2, 5),
    scale: tuple[float, float] = (0.8, 1.7),
    min_visible: float = 0.7,
    touching: float = 0.35,
    clutter: int = 6,
    noise: float = 8.0,
    return_owners: bool = False,
) -> Scenes:
    """Returns `n` grayscale scenes [N, S, S, 1] made of `items` uint8 [M, h, w] (bright on a
    black background, as Fashion-MNIST), each rescaled by a factor drawn from `scale`, placed
    by `_compose`, over `clutter` fragments (4-10 px pieces of other items of `items`) and a
    faint background with Gaussian noise of std `noise` (grey levels)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 1), np.uint8)
    owners_list, placed_list, patches_list, ids_list = [], [], [], []
    for i in range(n):
        count = int(rng.integers(objects[0], objects[1] + 1))
        ids = rng.integers(0, len(items), count)
        patches, pixels = [], []
        for item_id in ids:
            factor = rng.uniform(*scale)
            h, w = items.shape[1:]
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            item = cv2.resize(items[item_id], size, interpolation=cv2.INTER_LINEAR)
            mask = item > _INK
            if not mask.any():
                mask = item >= item.max()  # a (nearly) blank item: its brightest pixels
            rows, cols = mask.any(axis=1), mask.any(axis=0)
            patches.append((mask[rows][:, cols], int(labels[item_id])))
            pixels.append(item[rows][:, cols])
        owners, placed = _compose(rng, image_size, patches, min_visible, touching)
        canvas = np.full((image_size, image_size), rng.uniform(0, 30), np.float32)
        for _ in range(clutter):  # fragments of other items, under the objects
            piece = items[rng.integers(len(items))]
            ph, pw = rng.integers(4, 11, 2)
            y = rng.integers(0, piece.shape[0] - ph + 1)
            x = rng.integers(0, piece.shape[1] - pw + 1)
            fragment = piece[y : y + ph, x : x + pw].astype(np.float32)
            y0, x0 = rng.integers(0, image_size - ph + 1), rng.integers(0, image_size - pw + 1)
            region = canvas[y0 : y0 + ph, x0 : x0 + pw]
            region[:] = np.where(fragment > _INK, fragment, region)
        for j, (index, y0, x0) in enumerate(placed):
            h, w = patches[index][0].shape
            visible = owners[y0 : y0 + h, x0 : x0 + w] == j
            canvas[y0 : y0 + h, x0 : x0 + w][visible] = pixels[index][visible]
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(noise)
        images[i, ..., 0] = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        owners_list.append(owners)
        placed_list.append(placed)
        patches_list.append(patches)
        ids_list.append(ids)
    return _finish(
        owners_list, placed_list, patches_list, images, class_names, ids_list, return_owners
    )


def fashion_mnist_scenes(
    n: int, *, split: str, data_dir: str, seed: int | None = None, **options
) -> Scenes:
    """Returns `n` Fashion-MNIST scenes of `split` ('train': training items only, 'test': test
    items only), from the idx files in `data_dir`; `seed` defaults to TRAIN_SEED or TEST_SEED.
    `options` as `scenes_from_items`."""
    items, labels = fashion_mnist_items(data_dir, split)
    if seed is None:
        seed = TRAIN_SEED if split == "train" else TEST_SEED
    return scenes_from_items(
        items, labels, n, seed=seed, class_names=FASHION_MNIST_CLASSES, **options
    )
