"""PASCAL VOC 2007 (Everingham et al. 2010) as detection `Scenes`: photographs, 20 classes.

    train = voc.voc2007_scenes("train", 5011, source="auto", data_dir=DIR, image_size=96)

Splits: 'train' is VOC's trainval (5,011 images; TFDS's train + validation), 'test' VOC's
test (4,952 images), the R-CNN and Fast R-CNN papers' VOC 2007 protocol. `n` takes the first
n images of a split in its reader's order (the ImageSets list for the files, TFDS's record
order, fixed when it was prepared, for TFDS), so a CPU run can use a subset.

Two readers give the same scenes (`source`, as `config.dataset.source`):

- 'files': the official tar files VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar in
  `data_dir`, or the VOCdevkit/VOC2007 folder they extract to. A tar is read in place with
  `tarfile`, never extracted: the (uncompressed) archive's headers are scanned once and only
  the members of the n images used are read, so a subset costs a subset's time and no copy of
  the 900 MB on disk. Annotations are parsed with `xml.etree`, JPEGs decoded by OpenCV in RGB.
- 'tfds': TFDS 'voc/2007' prepared as array_record in `data_dir` ('' = TFDS's default,
  ~/tensorflow_datasets), read by `tfds.data_source` without TensorFlow (`data.tfds_source`).
  TFDS's builder (version 5, the one read) stores each box as the XML's 1-based values
  divided by the image's size: they are turned back into whole pixels (VOC's annotations are
  whole pixels) and converted as the files' boxes, so both readers give the same numbers; TFDS
  decodes the same JPEG bytes with OpenCV when it is installed (it is here), so the same
  pixels.
- 'auto': the files when `data_dir` holds them, else TFDS.

Boxes: VOC's xmin..xmax, ymin..ymax are 1-based inclusive pixel indices; here x1 = xmin - 1,
y1 = ymin - 1, x2 = xmax, y2 = ymax (the continuous convention of `detection.boxes`). Each
image is stretched to S x S (both axes scaled, the aspect ratio not kept: every box stays
whole), its boxes scaled by (S / W, S / H) and clipped to the image. Objects flagged
`difficult` are left out: VOC's evaluation ignores detections of them, here they are absent,
so a detection of one counts as a false positive (AP slightly pessimistic against the
devkit's). An image without any other object is kept: a scene may have no objects (its
proposals are all background in training). `item_ids` holds each object's VOC image number
(5 for 000005.jpg). Bad input (a missing or truncated file, a box outside its image or empty,
an unknown class) raises one UserError line naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import tarfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from absl import logging

from data import tfds_source
from detection import boxes as box_ops
from detection.scenes import Scenes
from errors import UserError

CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
SOURCES = ("auto", "files", "tfds")
SPLITS = ("train", "test")
ARCHIVES = {"train": "VOCtrainval_06-Nov-2007.tar", "test": "VOCtest_06-Nov-2007.tar"}
IMAGE_SETS = {"train": "trainval", "test": "test"}  # ImageSets/Main/<name>.txt
TFDS_NAME = "voc/2007"
TFDS_VERSION = "5.*.*"  # the builder version whose box convention `_from_tfds` undoes
TFDS_SPLITS = {"train": "train+validation", "test": "test"}
DEVKIT = "VOCdevkit/VOC2007"  # the folder every member of both archives lies in
_DOWNLOAD = "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/"

# One image as a reader gives it: (VOC image number, RGB uint8 [H, W, 3], boxes float32 [k, 4]
# in its own pixels, classes int32 [k]), difficult objects already left out
Image = tuple[int, np.ndarray, np.ndarray, np.ndarray]


def voc2007_scenes(
    split: str, n: int, *, source: str, data_dir: str, image_size: int = 96
) -> Scenes:
    """Returns the first `n` images of VOC 2007 `split` ('train': trainval, 'test') as Scenes
    of side `image_size`: images uint8 [n, S, S, 3], boxes [n, K, 4] with K the most objects
    of an image (at least 1), classes [n, K] (padding -1). `source`: 'auto' | 'files' | 'tfds'
    (see the module's docstring); `data_dir` as `config.dataset.data_dir`."""
    if split not in SPLITS:
        raise UserError(
            f"VOC 2007 has the scene splits {', '.join(SPLITS)} (train = VOC's trainval), not "
            f"{split!r}: set config.detection.validation_scenes=0"
        )
    if source not in SOURCES:
        raise UserError(
            f"config.dataset.source={source!r}: VOC 2007 is read from {', '.join(SOURCES)}"
        )
    if n < 1:
        raise UserError(f"VOC 2007 {split}: {n} images asked for; at least 1")
    data_dir = str(Path(data_dir).expanduser()) if data_dir else ""
    if source == "files" or (source == "auto" and _devkit_present(data_dir, split)):
        where, images = f"{data_dir} (files)", _from_files(split, n, data_dir)
    else:
        where, images = f"TFDS {data_dir or 'default folder'}", _from_tfds(split, n, data_dir)
    scenes = _to_scenes(images, image_size)
    logging.info(
        "VOC 2007 %s: %d images, %d objects (difficult ones left out) from %s",
        split,
        len(scenes),
        int((scenes.classes >= 0).sum()),
        where,
    )
    return scenes


def _to_scenes(images: Iterator[Image], size: int) -> Scenes:
    """Stretches each image to `size` x `size`, scales and clips its boxes, pads to Scenes."""
    pictures, boxes, classes, ids = [], [], [], []
    for number, image, image_boxes, image_classes in images:
        h, w = image.shape[:2]
        # INTER_AREA averages the pixels a shrunk output pixel covers (no aliasing); it is
        # meant for shrinking, so an axis that grows takes bilinear interpolation
        shrink = h >= size and w >= size
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        pictures.append(cv2.resize(image, (size, size), interpolation=interpolation))
        scale = np.array([size / w, size / h, size / w, size / h])
        boxes.append(box_ops.clip((image_boxes * scale).astype(np.float32), size, size))
        classes.append(image_classes)
        ids.append(number)
    k = max(max(map(len, classes), default=0), 1)
    out_boxes = np.zeros((len(pictures), k, 4), np.float32)
    out_classes = np.full((len(pictures), k), -1, np.int32)
    item_ids = np.full((len(pictures), k), -1, np.int64)
    for i, (b, c) in enumerate(zip(boxes, classes, strict=True)):
        out_boxes[i, : len(b)] = b
        out_classes[i, : len(c)] = c
        item_ids[i, : len(c)] = ids[i]
    return Scenes(np.stack(pictures), out_boxes, out_classes, CLASS_NAMES, item_ids)


def _check_count(n: int, available: int, what: str) -> None:
    if n > available:
        raise UserError(
            f"{what} holds {available} images, fewer than the {n} asked for: set "
            f"config.detection.train_scenes / test_scenes to at most {available}"
        )


def _image_number(name: str, where: str) -> int:
    stem = Path(name).stem
    if not stem.isdigit():
        raise UserError(f"{where}: {name!r} is not a VOC image name (digits, e.g. 000005.jpg)")
    return int(stem)


def _checked(boxes: np.ndarray, image: np.ndarray, where: str, fix: str) -> np.ndarray:
    """`boxes` [k, 4] in pixels after `detection.boxes.check_boxes` against `image`'s size;
    its one-line UserError gets `where` (the file) and `fix`."""
    try:
        return box_ops.check_boxes(
            boxes, height=image.shape[0], width=image.shape[1], what=f"{where}: object"
        )
    except UserError as e:
        raise UserError(f"{e} (x1 = xmin - 1, x2 = xmax of VOC's 1-based pixels): {fix}") from None


# --- the official files -------------------------------------------------------------------------


def _devkit_present(data_dir: str, split: str) -> bool:
    """Whether `data_dir` holds `split`'s archive or the VOCdevkit folder."""
    if not data_dir:
        return False
    folder = Path(data_dir)
    return (folder / ARCHIVES[split]).is_file() or (folder / DEVKIT).is_dir()


@contextlib.contextmanager
def _devkit(data_dir: str, split: str) -> Iterator[tuple[str, Callable[[str], bytes]]]:
    """Yields (where, read): `read(path)` returns the bytes of VOCdevkit/VOC2007/`path` from
    `split`'s tar in `data_dir`, else from the extracted folder; `where` names the source."""
    folder = Path(data_dir or ".")
    archive, extracted = folder / ARCHIVES[split], folder / DEVKIT
    again = f"take {ARCHIVES[split]} from {_DOWNLOAD} again"
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:") as tar:  # plain tar: members are read in place
                members = {member.name: member for member in tar.getmembers()}  # headers only

                def read(path: str) -> bytes:
                    try:
                        member = members[f"{DEVKIT}/{path}"]
                    except KeyError:
                        raise UserError(
                            f"{archive} has no {DEVKIT}/{path}: it is not the official VOC "
                            f"2007 archive, or it is truncated; {again}"
                        ) from None
                    return tar.extractfile(member).read()

                yield str(archive), read
        except (tarfile.TarError, OSError, EOFError) as e:
            cause = " ".join(str(e).split())  # one line
            raise UserError(
                f"{archive}: corrupt or truncated archive ({type(e).__name__}: {cause}); {again}"
            ) from e
    elif extracted.is_dir():

        def read(path: str) -> bytes:
            try:
                return (extracted / path).read_bytes()
            except OSError as e:
                raise UserError(
                    f"{extracted / path}: cannot read it ({e.strerror}); extract {ARCHIVES[split]}"
                    f" ({_DOWNLOAD}) into {folder} again"
                ) from None

        yield str(extracted), read
    else:
        raise UserError(
            f"VOC 2007 {split} from files: {folder} holds neither {ARCHIVES[split]} nor "
            f"{DEVKIT}. Download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from "
            f"{_DOWNLOAD} into one folder (no need to extract) and set config.dataset.data_dir "
            "to it; or use config.dataset.source='tfds'"
        )


def _from_files(split: str, n: int, data_dir: str) -> Iterator[Image]:
    """The first `n` images of `split` from the official files (see `_devkit`)."""
    with _devkit(data_dir, split) as (where, read):
        listing = f"ImageSets/Main/{IMAGE_SETS[split]}.txt"
        names = read(listing).decode("ascii", errors="replace").split()
        _check_count(n, len(names), f"{where}:{DEVKIT}/{listing}")
        for name in names[:n]:
            number = _image_number(name, f"{where}:{DEVKIT}/{listing}")
            jpeg, xml = f"JPEGImages/{name}.jpg", f"Annotations/{name}.xml"
            fix = f"the file is corrupt: take {ARCHIVES[split]} from {_DOWNLOAD} again"
            image = cv2.imdecode(
                np.frombuffer(read(jpeg), np.uint8),
                cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION,  # the stored pixels
            )
            if image is None:
                raise UserError(f"{where}:{DEVKIT}/{jpeg} is not a readable JPEG: {fix}")
            boxes, classes = _annotation(read(xml), image, f"{where}:{DEVKIT}/{xml}", fix)
            yield number, image, boxes, classes


def _annotation(
    blob: bytes, image: np.ndarray, where: str, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float32 [k, 4] in pixels, classes int32 [k]) of an annotation XML's objects that
    are not difficult; every object's box is checked against `image`."""
    try:
        objects = ElementTree.fromstring(blob).findall("object")
    except ElementTree.ParseError as e:
        raise UserError(f"{where}: not a readable XML annotation ({e}): {fix}") from None
    boxes, classes, keep = [], [], []
    for j, obj in enumerate(objects):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in CLASS_NAMES:
            raise UserError(f"{where}: object {j} has the class {name!r}, not a VOC one: {fix}")
        try:
            box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = int(obj.findtext("difficult") or 0) == 1  # absent: not difficult
        except (AttributeError, TypeError, ValueError):
            raise UserError(
                f"{where}: object {j} lacks a numeric bndbox xmin, ymin, xmax, ymax or "
                f"difficult: {fix}"
            ) from None
        boxes.append([box[0] - 1, box[1] - 1, box[2], box[3]])
        classes.append(CLASS_NAMES.index(name))
        keep.append(not difficult)
    checked = _checked(np.asarray(boxes, np.float32), image, where, fix)
    keep = np.asarray(keep, bool)
    return checked[keep], np.asarray(classes, np.int32).reshape(-1)[keep]


# --- TFDS ---------------------------------------------------------------------------------------


def _not_prepared(name: str, data_dir: str, cause: str) -> str:
    """What to do when `name` ('voc/2007:5.*.*') cannot be read (`data.tfds_source`)."""
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    return (
        f"TFDS dataset {name!r} is not prepared as {tfds_source.PREPARE_FORMAT} in "
        f"{data_dir or '~/tensorflow_datasets'} ({cause}). With internet access: `pip install "
        f"-e '.[tfds]'` (TensorFlow, needed only to prepare), then `tfds build {TFDS_NAME} "
        f"--file_format={tfds_source.PREPARE_FORMAT}{dir_flag}`. Without internet: put "
        f"{ARCHIVES['train']} and {ARCHIVES['test']} ({_DOWNLOAD}) in a folder, set "
        "config.dataset.data_dir to it and config.dataset.source='files'"
    )


def _from_tfds(split: str, n: int, data_dir: str) -> Iterator[Image]:
    """The first `n` images of `split` from TFDS 'voc/2007' (array_record, `data_dir`)."""
    source = tfds_source.data_source(
        f"{TFDS_NAME}:{TFDS_VERSION}", TFDS_SPLITS[split], data_dir, not_prepared=_not_prepared
    )
    what = f"TFDS {TFDS_NAME} {TFDS_SPLITS[split]}"
    _check_count(n, len(source), what)
    fix = (
        f"prepare {TFDS_NAME} again (`tfds build {TFDS_NAME} "
        f"--file_format={tfds_source.PREPARE_FORMAT} --overwrite`)"
    )
    for i in range(n):
        example = source[i]
        name = example["image/filename"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        where = f"{what} example {i} ({name})"
        image = np.asarray(example["image"], np.uint8)
        if image.ndim == 2 or image.shape[-1] == 1:  # a grey JPEG
            image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
        objects = example["objects"]
        # (ymin, xmin, ymax, xmax) / image size: one list (or array) per field, one entry per
        # object
        normalised = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
        labels = np.asarray(objects["label"], np.int64).reshape(-1)
        difficult = np.asarray(objects["is_difficult"], bool).reshape(-1)
        if not len(normalised) == len(labels) == len(difficult):
            raise UserError(
                f"{where}: {len(normalised)} boxes, {len(labels)} labels and {len(difficult)} "
                f"difficult flags; {fix}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise UserError(f"{where}: labels outside [0, {len(CLASS_NAMES)}); {fix}")
        h, w = image.shape[:2]
        pixels = np.rint(normalised[:, [1, 0, 3, 2]] * [w, h, w, h])  # VOC's whole pixels
        boxes = _checked(pixels - [1, 1, 0, 0], image, where, fix)
        number = _image_number(name, where)
        yield number, image, boxes[~difficult], labels[~difficult].astype(np.int32)
