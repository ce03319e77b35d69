"""detection.voc: VOC 2007 scenes from the official tar files and from TFDS, the same scenes.

The tar files are real, tiny ones in the official layout (JPEGs written by OpenCV, XML
annotations with known boxes); the TFDS examples are made of the same JPEGs and boxes by
TFDS's own feature codec (encode, serialise, then `deserialize_example_np`, what a prepared
array_record source returns), served by `tfds.testing.mock_data`.
"""

import io
import tarfile

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

import configs
from detection import evaluate as evaluate_lib
from detection import regions, voc
from errors import UserError

S = 64
COLOUR = (200, 30, 40)  # RGB
# (VOC id, (height, width), objects: (class, difficult, xmin, ymin, xmax, ymax), 1-based)
TRAINVAL = [
    ("000005", (100, 200), [("dog", 0, 11, 21, 60, 80), ("person", 1, 101, 1, 200, 100)]),
    (
        "000007",
        (128, 96),
        [("car", 0, 1, 1, 96, 128), ("chair", 0, 31, 41, 33, 44), ("cat", 0, 4, 5, 48, 60)],
    ),
    ("000009", (80, 90), [("person", 1, 10, 10, 40, 40)]),  # only a difficult object
]
TEST = [("000001", (48, 32), [("tvmonitor", 0, 9, 7, 32, 48)])]  # smaller than S: enlarged
# the boxes at S = 64, by hand: x1 = (xmin - 1) S / W, y1 = (ymin - 1) S / H, x2 = xmax S / W,
# y2 = ymax S / H; dog 11, car 6, chair 8, cat 7, tvmonitor 19
TRAIN_BOXES = [
    [[3.2, 12.8, 19.2, 51.2]],
    [[0, 0, 64, 64], [20, 20, 22, 22], [2, 2, 32, 30]],
    [],
]
TRAIN_CLASSES = [[11], [6, 8, 7], []]
TEST_BOXES, TEST_CLASSES = [[[16, 8, 64, 64]]], [[19]]


def _jpeg(height: int, width: int) -> bytes:
    image = np.empty((height, width, 3), np.uint8)
    image[...] = COLOUR
    return cv2.imencode(".jpg", image[..., ::-1])[1].tobytes()  # OpenCV writes BGR


def _xml(height: int, width: int, objects) -> bytes:
    parts = [
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, difficult, x1, y1, x2, y2 in objects
    ]
    return (
        f"<annotation><folder>VOC2007</folder><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{''.join(parts)}</annotation>"
    ).encode()


def _members(images, listing: str) -> dict[str, bytes]:
    members = {f"ImageSets/Main/{listing}.txt": "".join(f"{i}\n" for i, _, _ in images).encode()}
    for image_id, (h, w), objects in images:
        members[f"JPEGImages/{image_id}.jpg"] = _jpeg(h, w)
        members[f"Annotations/{image_id}.xml"] = _xml(h, w, objects)
    return members


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"VOCdevkit/VOC2007/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _voc_folder(folder, trainval=TRAINVAL, test=TEST):
    _write_tar(folder / voc.ARCHIVES["train"], _members(trainval, "trainval"))
    _write_tar(folder / voc.ARCHIVES["test"], _members(test, "test"))
    return folder


def _read(split, n, folder, source="files"):
    return voc.voc2007_scenes(split, n, source=source, data_dir=str(folder), image_size=S)


def _check_exact(scenes, boxes, classes, ids):
    assert scenes.class_names == voc.CLASS_NAMES and len(voc.CLASS_NAMES) == 20
    for i, (want_boxes, want_classes) in enumerate(zip(boxes, classes, strict=True)):
        got_boxes, got_classes = scenes.objects(i)
        np.testing.assert_allclose(got_boxes, np.reshape(want_boxes, (-1, 4)), atol=1e-5)
        np.testing.assert_array_equal(got_classes, want_classes)
        np.testing.assert_array_equal(scenes.item_ids[i][scenes.classes[i] >= 0], ids[i])


def test_tar_files_give_the_hand_computed_boxes(tmp_path):
    folder = _voc_folder(tmp_path)
    train = _read("train", 3, folder)
    assert train.images.shape == (3, S, S, 3) and train.images.dtype == np.uint8
    assert train.boxes.shape == (3, 3, 4) and train.classes.shape == (3, 3)  # K = most objects
    _check_exact(train, TRAIN_BOXES, TRAIN_CLASSES, [[5], [7] * 3, []])
    # the difficult person of 000005 is left out; 000009 (only a difficult one) has no object
    assert (train.classes[2] == -1).all() and not train.boxes[2].any()
    # RGB order, the colour kept through JPEG and the resize
    np.testing.assert_allclose(train.images.reshape(-1, 3).mean(0), COLOUR, atol=3)
    test = _read("test", 1, folder)
    assert test.images.shape == (1, S, S, 3) and test.boxes.shape == (1, 1, 4)
    _check_exact(test, TEST_BOXES, TEST_CLASSES, [[1]])
    # the first n images of the split, in the ImageSets order
    _check_exact(_read("train", 2, folder), TRAIN_BOXES[:2], TRAIN_CLASSES[:2], [[5], [7] * 3])


def test_auto_reads_the_tar_files_and_the_extracted_folder_alike(tmp_path):
    tars, extracted = tmp_path / "tars", tmp_path / "extracted"
    tars.mkdir()
    _voc_folder(tars)
    for archive in voc.ARCHIVES.values():
        with tarfile.open(tars / archive) as tar:
            tar.extractall(extracted, filter="data")
    from_tars = _read("train", 3, tars, source="auto")
    from_folder = _read("train", 3, extracted, source="auto")
    np.testing.assert_array_equal(from_tars.images, from_folder.images)
    np.testing.assert_array_equal(from_tars.boxes, from_folder.boxes)
    np.testing.assert_array_equal(from_tars.classes, from_folder.classes)


def _tfds_example(features, image_id, size, objects):
    """One example as a prepared TFDS voc/2007 returns it: built as TFDS's builder builds it
    (bbox = the XML's values / the image's size), then TFDS's own encoding and decoding."""
    h, w = size
    raw = {
        "image": io.BytesIO(_jpeg(h, w)),
        "image/filename": f"{image_id}.jpg",
        "objects": [
            {
                "label": name,
                "bbox": tfds.features.BBox(y1 / h, x1 / w, y2 / h, x2 / w),
                "pose": "unspecified",
                "is_truncated": False,
                "is_difficult": bool(difficult),
            }
            for name, difficult, x1, y1, x2, y2 in objects
        ],
        "labels": sorted({o[0] for o in objects}),
        "labels_no_difficult": sorted({o[0] for o in objects if not o[1]}),
    }
    return features.deserialize_example_np(features.serialize_example(features.encode_example(raw)))


def _as_data_source(builder, split, **kwargs):
    images = {"train+validation": TRAINVAL, "test": TEST}[split]
    return [_tfds_example(builder.info.features, *image) for image in images]


def test_tfds_gives_the_files_scenes(tmp_path):
    with tfds.testing.mock_data(as_data_source_fn=_as_data_source):
        train = _read("train", 3, tmp_path / "tfds", source="tfds")
        test = _read("test", 1, "", source="auto")  # no folder: TFDS
    _check_exact(train, TRAIN_BOXES, TRAIN_CLASSES, [[5], [7] * 3, []])
    _check_exact(test, TEST_BOXES, TEST_CLASSES, [[1]])
    # the boxes are TFDS's normalised ones times S, less VOC's 1-based offset (1 pixel)
    for scenes, images in ((train, TRAINVAL), (test, TEST)):
        for i, (_, (h, w), objects) in enumerate(images):
            kept = np.array([o[2:] for o in objects if not o[1]], np.float64).reshape(-1, 4)
            normalised = kept / [w, h, w, h]
            want = normalised * S - [S / w, S / h, 0, 0]
            np.testing.assert_allclose(scenes.objects(i)[0], want, atol=1e-4)
    files = _read("train", 3, _voc_folder(tmp_path))
    np.testing.assert_array_equal(train.images, files.images)  # the same JPEG decoder
    np.testing.assert_allclose(train.boxes, files.boxes, atol=1e-5)
    np.testing.assert_array_equal(train.classes, files.classes)
    np.testing.assert_array_equal(train.item_ids, files.item_ids)


def test_tfds_random_mock_examples_are_refused_in_one_line():
    # TFDS's random mock draws every field of the objects on its own (lengths disagree,
    # ymin > ymax): input that a prepared dataset never holds, refused rather than read
    with tfds.testing.mock_data(num_examples=2), pytest.raises(UserError, match="voc/2007") as e:
        _read("train", 2, "", source="tfds")
    assert "\n" not in str(e.value)


def test_tfds_not_prepared_says_how_to_prepare_or_use_the_files(tmp_path):
    with pytest.raises(UserError) as e:
        _read("test", 1, tmp_path, source="tfds")
    message = str(e.value)
    assert f"tfds build voc/2007 --file_format=array_record --data_dir={tmp_path}" in message
    assert voc.ARCHIVES["train"] in message and "source='files'" in message


def _one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_files_and_members_are_one_line_errors(tmp_path):
    with pytest.raises(UserError) as e:
        _read("train", 1, tmp_path)
    message = _one_line(e)
    assert voc.ARCHIVES["train"] in message and voc.ARCHIVES["test"] in message
    assert "config.dataset.data_dir" in message
    # a tar without the listing, a listing naming an image the tar lacks
    _write_tar(tmp_path / voc.ARCHIVES["train"], {"JPEGImages/000005.jpg": _jpeg(10, 10)})
    with pytest.raises(UserError, match="has no VOCdevkit/VOC2007/ImageSets/Main/trainval.txt"):
        _read("train", 1, tmp_path)
    members = _members(TRAINVAL, "trainval")
    del members["JPEGImages/000007.jpg"]
    _write_tar(tmp_path / voc.ARCHIVES["train"], members)
    with pytest.raises(UserError, match="has no VOCdevkit/VOC2007/JPEGImages/000007.jpg") as e:
        _read("train", 3, tmp_path)
    assert voc.ARCHIVES["train"] in _one_line(e)
    with pytest.raises(UserError, match="holds 3 images, fewer than the 4 asked for"):
        _read("train", 4, _voc_folder(tmp_path))
    archive = tmp_path / voc.ARCHIVES["train"]
    archive.write_bytes(archive.read_bytes()[:3000])  # truncated in the first JPEG
    with pytest.raises(UserError, match="truncated") as e:
        _read("train", 3, tmp_path)
    assert str(archive) in _one_line(e)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (("dog", 0, 60, 21, 11, 80), "is empty"),  # xmax < xmin
        (("dog", 1, 11, 21, 201, 80), "lies outside the 200x100 image"),  # even if difficult
        (("dragon", 0, 11, 21, 60, 80), "class 'dragon'"),
    ],
)
def test_corrupt_annotation_is_one_line_naming_the_file(tmp_path, obj, match):
    trainval = [("000005", (100, 200), [("cat", 0, 1, 1, 10, 10), obj])]
    _voc_folder(tmp_path, trainval=trainval)
    with pytest.raises(UserError, match=match) as e:
        _read("train", 1, tmp_path)
    message = _one_line(e)
    assert f"{voc.ARCHIVES['train']}:VOCdevkit/VOC2007/Annotations/000005.xml" in message
    assert "again" in message  # the fix


def _voc_config(folder, *rest):
    config = configs.load(",".join(["configs/detection.py:pooled_max,voc2007", *rest]))
    configs.override(
        config,
        {
            "dataset.source": "files",
            "dataset.data_dir": str(folder),
            "detection.train_scenes": 3,
            "detection.test_scenes": 1,
            "detection.image_size": S,
        },
    )
    return config


def test_load_scenes_and_the_detector_from_the_voc2007_config(tmp_path):
    from detection import train as det_train

    folder = _voc_folder(tmp_path)
    config = _voc_config(folder)
    assert (config.detection.train_scenes, config.detection.test_scenes) == (3, 1)
    assert configs.load("configs/detection.py:pooled_max,voc2007").detection.train_scenes == 5011
    data = regions.load_scenes(config)
    assert set(data) == {"train", "test"}
    assert data["train"].images.shape == (3, S, S, 3) and data["test"].images.shape == (1, S, S, 3)
    _check_exact(data["test"], TEST_BOXES, TEST_CLASSES, [[1]])
    # the detector: 3 input channels, 20 classes + background
    specs = {s.name: s for s in det_train.validate(config)}
    assert specs["cls"].out_shape == (21,) and specs["bbox"].out_shape == (80,)
    assert det_train.warp_shape(_voc_config(folder, "rcnn")) == (32, 32, 3)  # CIFAR-10's
    rcnn_specs = det_train.validate(_voc_config(folder, "rcnn"))
    assert rcnn_specs[0].in_shape == (32, 32, 3) and rcnn_specs[-1].out_shape == (80,)
    assert any(s.out_shape == (21,) for s in rcnn_specs)
    config.detection.validation_scenes = 2
    with pytest.raises(UserError, match="validation_scenes"):
        det_train.validate(config)
    config.detection.validation_scenes, config.dataset.source = 0, "builtin"
    with pytest.raises(UserError, match="dataset.source='builtin'"):
        det_train.validate(config)


def test_a_scene_without_objects_trains_as_background_and_is_evaluated(tmp_path):
    data = _read("train", 3, _voc_folder(tmp_path))
    proposals = [np.array([[0, 0, 32, 32], [2, 12, 20, 50], [0, 0, 64, 64]], np.float32)] * 3
    pool = regions.label_pool(data, proposals, fg_iou=0.5, target_std=(0.1, 0.1, 0.2, 0.2))
    assert (pool.labels[2] == 0).all() and not pool.targets[2].any()
    batch = regions.sample_batch(
        pool,
        data,
        0,
        batch_size=3,
        rois_per_image=4,
        fg_fraction=0.25,
        fg_iou=0.5,
        bg_iou_low=0.1,
        flip=False,
        seed=0,
    )
    assert batch["rois"].shape == (12, 4) and batch["labels"].max() > 0
    order = regions.step_images(0, batch_size=3, num_images=3, seed=0)
    empty = int(np.flatnonzero(order == 2)[0])  # the batch slot of the scene without objects
    assert (batch["labels"][batch["roi_image"] == empty] == 0).all()
    truth = [data.objects(i) for i in range(3)]
    detections = [(b, np.full(len(b), 0.5), c) for b, c in truth]  # every object found
    # ... and a car on the scene without objects, scored above them: a false positive
    detections[2] = (np.array([[1, 1, 30, 30]]), np.array([0.9]), np.array([6]))
    voc_ap = evaluate_lib.voc_ap(
        truth, detections, data.class_names, image_size=data.images.shape[1:3]
    )
    assert voc_ap["per_class"]["dog"] == 1.0
    assert voc_ap["per_class"]["car"] == pytest.approx(0.5)
    coco = evaluate_lib.coco_ap(truth, detections, data.class_names, image_size=(S, S))
    assert coco["images"] == 3 and coco["objects"] == 4


def test_a_scene_without_objects_or_proposals_trains_on_the_whole_image_as_background(tmp_path):
    data = _read("train", 3, _voc_folder(tmp_path))
    proposals = [np.array([[0, 0, 32, 32]], np.float32)] * 2 + [np.zeros((0, 4), np.float32)]
    pool = regions.label_pool(data, proposals, fg_iou=0.5, target_std=(0.1, 0.1, 0.2, 0.2))
    assert pool.rois[2].tolist() == [[0, 0, S, S]] and pool.labels[2].tolist() == [0]
    batch = regions.sample_batch(
        pool, data, 0, batch_size=3, rois_per_image=4, fg_fraction=0.25, fg_iou=0.5,
        bg_iou_low=0.1, flip=False, seed=0,
    )  # fmt: skip
    assert batch["rois"].shape == (12, 4)
    order = regions.step_images(0, batch_size=3, num_images=3, seed=0)
    empty = int(np.flatnonzero(order == 2)[0])
    assert (batch["rois"][batch["roi_image"] == empty] == [0, 0, S, S]).all()
