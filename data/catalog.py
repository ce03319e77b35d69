"""What each dataset is (shape, classes), known without reading any data."""

import dataclasses

import ml_collections

from data import builtin
from errors import UserError

SOURCES = ("auto", "builtin", "tfds", "files")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset's static description: `image_shape` is (height, width, channels)."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]


_DIGITS = tuple(str(d) for d in range(10))
_CIFAR10 = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_FASHION = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# CIFAR-100 fine labels in label order (the `fine_label_names` of the official `meta` file).
_CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
)  # fmt: skip

_INFOS = {
    info.name: info
    for info in (
        DatasetInfo("builtin", (32, 32, 3), builtin.NUM_CLASSES, builtin.CLASS_NAMES),
        DatasetInfo("cifar10", (32, 32, 3), 10, _CIFAR10),
        DatasetInfo("cifar100", (32, 32, 3), 100, _CIFAR100),
        DatasetInfo("fashion_mnist", (28, 28, 1), 10, _FASHION),
        DatasetInfo("mnist", (28, 28, 1), 10, _DIGITS),
        DatasetInfo("svhn_cropped", (32, 32, 3), 10, _DIGITS),
    )
}
NAMES = tuple(_INFOS)


def dataset_info(ds_cfg: ml_collections.ConfigDict) -> DatasetInfo:
    """Returns the DatasetInfo of `ds_cfg.name` without loading anything.

    Raises UserError for an unknown name or source, listing the valid ones.
    """
    if ds_cfg.name not in _INFOS:
        raise UserError(
            f"config.dataset.name: unknown dataset {ds_cfg.name!r}; "
            f"choose one of {', '.join(NAMES)}."
        )
    if ds_cfg.source not in SOURCES:
        raise UserError(
            f"config.dataset.source: {ds_cfg.source!r} is not one of {', '.join(SOURCES)}."
        )
    if ds_cfg.source == "builtin" and ds_cfg.name != "builtin":
        raise UserError(
            f"config.dataset.source='builtin' only serves dataset.name='builtin', not "
            f"{ds_cfg.name!r}; use source 'auto', 'files' or 'tfds'."
        )
    if ds_cfg.name == "builtin" and ds_cfg.source not in ("auto", "builtin"):
        raise UserError(
            f"config.dataset.name='builtin' is generated, not read: set dataset.source to "
            f"'auto' or 'builtin' (it is {ds_cfg.source!r})."
        )
    if ds_cfg.name == "builtin":
        size = ds_cfg.get("builtin_image_size", builtin.IMAGE_SIZE)
        if isinstance(size, bool) or not isinstance(size, int) or size < builtin.MIN_IMAGE_SIZE:
            raise UserError(
                f"config.dataset.builtin_image_size={size!r}: must be an integer >= "
                f"{builtin.MIN_IMAGE_SIZE} (pixels)."
            )
        clutter = ds_cfg.get("builtin_clutter", 1.0)
        if (
            isinstance(clutter, bool)
            or not isinstance(clutter, int | float)
            or not 0 <= clutter <= 1
        ):
            raise UserError(
                f"config.dataset.builtin_clutter={clutter!r}: must be a number in [0, 1] "
                "(1: 5 distractors and full pixel noise; 0: none)."
            )
        return dataclasses.replace(_INFOS["builtin"], image_shape=(size, size, 3))
    return _INFOS[ds_cfg.name]
