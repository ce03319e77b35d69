"""R-CNN and Fast R-CNN training and evaluation on the training library (`detection.mode`:
rcnn | fast_rcnn).

    results = train_and_evaluate(config, workdir)   # resumes from the workdir's checkpoint
    result = evaluate(run, state, "test")           # AP, AP50, AP75, VOC07 mAP, images/s

`setup` builds a `Run` with the training library's set-up pieces (training.setup:
`with_workdir`, `open_checkpoints`, `initial_state`; config checked first by `validate`),
and `training.loop` trains it as it trains a classifier: logs, evaluations, Orbax
checkpoints (the latest K and the best), SIGTERM/Ctrl-C, exact resume. What is specific to
detection is here: the data (scenes, proposals, RoIs sampled on the host from (seed,
step)), the networks' steps (the multi-task loss), the evaluation (detections, per-class NMS,
AP) and the results. The best checkpoint is the best evaluation by AP50. The two modes differ only
in their network (`fast_rcnn.FastRCNN`, `rcnn.RCNN`: the same inputs and outputs) and in how
a step's 128 RoIs are drawn (`regions.sample_batch`: from 2 images; `regions.sample_regions`:
over every training image, each with its own scene).

State and batches are replicated over the mesh (one device computes; the step is not data
parallel).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
from configs import schema
from detection import boxes as box_ops
from detection import evaluate as evaluate_lib
from detection import fast_rcnn, rcnn, regions, scenes, voc
from detection import proposals as proposals_lib
from detection import svm as svm_lib
from errors import UserError
from models import layers, roi
from models import summary as model_summary
from training import checkpoint as ckpt_lib
from training import loop as loop_lib
from training import optim, runtime
from training import setup as setup_lib
from training import state as state_lib
from training import steps as steps_lib
from training import workdir as workdir_lib
from training.state import abstract_like

EVAL_SPLITS = ("validation", "test")
MODES = ("fast_rcnn", "rcnn")
NETWORKS = {"fast_rcnn": fast_rcnn.FastRCNN, "rcnn": rcnn.RCNN}


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise UserError(f"config.detection.{field}: {message}")


def validate(config: ml_collections.ConfigDict) -> list:
    """Checks `config` (configs/detection.py): the sections shared with classification by
    `configs.schema.validate`, the detection section here. Returns the detector's LayerSpecs;
    raises UserError naming the first bad field."""
    if "detection" not in config:
        raise UserError("config has no 'detection' section: use configs/detection.py")
    _require(
        config.dataset.name in regions.SCENES,
        "scenes",
        f"dataset.name={config.dataset.name!r}: scenes exist for {', '.join(regions.SCENES)}",
    )
    d = config.detection
    if config.dataset.name == "voc2007":
        if config.dataset.source not in voc.SOURCES:
            raise UserError(
                f"config.dataset.source={config.dataset.source!r}: VOC 2007 is read from "
                f"{', '.join(voc.SOURCES)}"
            )
        _require(
            d.validation_scenes == 0,
            "validation_scenes",
            "VOC 2007 scenes are VOC's trainval (train) and test: set it to 0",
        )
    schema.validate(classifier_config(config))
    _require(d.mode in MODES, "mode", f"{d.mode!r} is not one of {', '.join(MODES)}")
    _require(
        isinstance(d.warp_size, int) and d.warp_size >= 0,
        "warp_size",
        "must be an integer >= 0 (0: the classification dataset's image size)",
    )
    _require(d.image_size >= 32, "image_size", "must be >= 32")
    for field in ("train_scenes", "test_scenes", "max_proposals", "test_proposals"):
        _require(d[field] >= 1, field, "must be >= 1")
    for field in ("rois_per_image", "roi_size", "max_detections"):
        _require(d[field] >= 1, field, "must be >= 1")
    _require(d.validation_scenes >= 0, "validation_scenes", "must be >= 0")
    _require(
        config.dataset.eval_split == "test" or d.validation_scenes > 0,
        "validation_scenes",
        "dataset.eval_split='validation' needs detection.validation_scenes > 0",
    )
    _require(
        d.proposal_mode in proposals_lib.MODES,
        "proposal_mode",
        f"{d.proposal_mode!r} is not one of {', '.join(proposals_lib.MODES)}",
    )
    _require(d.proposal_upscale > 0, "proposal_upscale", "must be > 0")
    _require(0 <= d.foreground_fraction <= 1, "foreground_fraction", "must be in [0, 1]")
    _require(0 < d.foreground_iou <= 1, "foreground_iou", "must be in (0, 1]")
    _require(
        0 <= d.background_iou_low < d.foreground_iou,
        "background_iou_low",
        "must be in [0, detection.foreground_iou)",
    )
    widths = tuple(d.hidden_widths)
    _require(
        all(isinstance(w, int) and w >= 1 for w in widths),
        "hidden_widths",
        f"{widths} must be integers >= 1",
    )
    _require(0 <= d.hidden_dropout < 1, "hidden_dropout", "must be in [0, 1)")
    _require(d.bbox_loss_weight >= 0, "bbox_loss_weight", "must be >= 0")
    std = tuple(d.bbox_target_std)
    _require(
        len(std) == 4 and all(s > 0 for s in std),
        "bbox_target_std",
        f"{std} must be 4 numbers > 0 (tx, ty, tw, th)",
    )
    _require(0 < d.nms_iou <= 1, "nms_iou", "must be in (0, 1]")
    _require(0 <= d.score_threshold < 1, "score_threshold", "must be in [0, 1)")
    _require(
        d.rcnn_scores in ("softmax", "svm"), "rcnn_scores", f"{d.rcnn_scores!r}: softmax or svm"
    )
    _require(
        d.rcnn_scores == "softmax" or d.mode == "rcnn",
        "rcnn_scores",
        "'svm' is R-CNN's (detection.mode='rcnn'); Fast R-CNN scores with its softmax",
    )
    for field in ("svm_train_scenes", "svm_cache_size", "svm_mining_rounds"):
        _require(d[field] >= 1, field, "must be >= 1")
    _require(0 < d.svm_negative_iou <= 1, "svm_negative_iou", "must be in (0, 1]")
    _require(d.svm_positive_weight > 0, "svm_positive_weight", "must be > 0")
    _require(d.svm_weight_decay > 0, "svm_weight_decay", "must be > 0")
    _require(
        d.input_stats in ("scenes", "backbone"),
        "input_stats",
        f"{d.input_stats!r}: scenes or backbone",
    )
    _require(d.batchnorm in ("train", "frozen"), "batchnorm", f"{d.batchnorm!r}: train or frozen")
    _require(
        d.roi_pool in roi.ROI_FUNCTIONS,
        "roi_pool",
        f"{d.roi_pool!r}: {' or '.join(roi.ROI_FUNCTIONS)}",
    )
    scales = tuple(d.pyramid_scales)
    _require(
        len(scales) >= 1 and all(s > 0 for s in scales) and len(set(scales)) == len(scales),
        "pyramid_scales",
        f"{scales} must be one or more different scale factors > 0 ((1.0,): one scale)",
    )
    _require(
        len(scales) == 1 or d.mode == "fast_rcnn",
        "pyramid_scales",
        "an image pyramid is Fast R-CNN's (R-CNN warps every region to one size): set (1.0,)",
    )
    _require(d.pyramid_target >= 0, "pyramid_target", "must be >= 0 (0: R-CNN's warp)")
    _require(
        not d.roi_context or d.mode == "fast_rcnn",
        "roi_context",
        "is Fast R-CNN's (R-CNN's warp has its own context padding): set False",
    )
    _require(
        d.input_stats == "scenes" or bool(d.backbone_workdir),
        "input_stats",
        "'backbone' needs detection.backbone_workdir (the classifier whose statistics to use)",
    )
    num_classes = len(regions.SCENES[config.dataset.name].class_names)
    if d.mode == "rcnn":
        return rcnn.detector_specs(config.model, warp_shape(config), num_classes)
    channels = data.dataset_info(classifier_config(config).dataset).image_shape[2]  # scenes'
    return fast_rcnn.detector_specs(
        config.model, (d.image_size, d.image_size, channels), num_classes, d
    )


def classifier_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose dataset.name is the classification dataset of its scenes
    (`regions.SCENES`: itself for builtin and fashion_mnist, cifar10 for voc2007): what
    `configs.schema` checks the shared sections against, and the images a backbone's
    classifier was trained on."""
    copy = config.copy_and_resolve_references()
    copy.dataset.name = regions.SCENES[config.dataset.name].classifier
    return copy


def warp_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """R-CNN's warped regions (H, W, C): detection.warp_size, or the image shape of the
    classification dataset of the scenes (`classifier_config`: a classifier trained on it
    fits); C is that dataset's channels (the scenes')."""
    shape = data.dataset_info(classifier_config(config).dataset).image_shape
    size = config.detection.warp_size or shape[0]
    return (size, size, shape[2])


@dataclasses.dataclass
class Run:
    """A detection run, ready: config, specs, scenes and their proposals, the labelled
    training RoIs, the state and the compiled steps (`step`/`meta`: the restored checkpoint's,
    0 and {} for a fresh state); with the members `training.loop` trains (its docstring)."""

    config: ml_collections.ConfigDict
    specs: list
    scenes: dict[str, scenes.Scenes]
    proposals: dict[str, list[np.ndarray]]
    pool: regions.Pool | None
    flat_pool: regions.FlatPool | None
    mean: np.ndarray
    std: np.ndarray
    mesh: Any
    graphdef: Any
    state: Any
    step: int
    meta: dict
    train_step: Any
    predict_step: Any
    compile_seconds: float
    proposal_seconds: float
    workdir: Path | None = None
    checkpoints: ckpt_lib.Checkpoints | None = None
    lock: Any = None
    best_measures: ClassVar[tuple[str, ...]] = ("ap50",)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.scenes["test"].class_names

    @property
    def throughput(self) -> tuple[str, int]:
        """The training rate the loop logs: RoIs per second (128 per step in both modes)."""
        return "rois_per_s", rois_per_step(self.config)

    def train_batches(self) -> Iterator[dict]:
        return (self.batch(step) for step in itertools.count(self.step))

    def eval_split(self) -> str:
        return self.config.dataset.eval_split

    def test_split(self) -> str:
        return "test"

    def evaluate(self, state, split: str) -> dict:
        return evaluate(self, state, split)

    def train_fields(self, values: list[dict], step: int) -> dict:
        """The train record's losses and RoI accuracy from the train steps' metrics."""
        return {
            "loss": float(np.mean([v["loss"] for v in values])),
            "cls_loss": float(np.mean([v["cls"] for v in values])),
            "bbox_loss": float(np.mean([v["bbox"] for v in values])),
            "roi_accuracy": float(
                sum(v["correct"] for v in values) / sum(v["count"] for v in values)
            ),
        }

    def results(self, step: int, record, final_eval: dict, final_test: dict, best_test: dict):
        """results.json: AP of the final and best states on the test scenes, test images/s,
        training RoIs/s and images/s (scenes for Fast R-CNN, warped regions for R-CNN)."""
        config, split = self.config, self.config.dataset.eval_split
        rate = statistics.median(record.rates) if record.rates else None
        return {
            "method": config.detection.mode,
            "model": config.model.name,
            "scenes": config.dataset.name,
            "seed": config.seed,
            "steps": step,
            "final": {"test": final_test},
            "best": {
                "step": record.best["step"],
                split: {"ap50": record.best["ap50"]},
                "test": best_test,
            },
            **{k: final_test[k] for k in ("ap", "ap50", "ap75", "voc07_map")},
            "test_images_per_s": final_test["images_per_s"],
            "test_proposals_per_image": final_test["proposals_per_image"],
            "test_flops_per_image": final_test["flops_per_image"],
            "train_rois_per_s": rate,
            "train_images_per_s": (
                rate * images_per_step(config) / rois_per_step(config) if rate else None
            ),
            "params": model_summary.to_json(self.specs)["total_params"],
            "train_seconds": record.train_seconds,
            "compile_seconds": self.compile_seconds,
            "proposal_seconds": self.proposal_seconds,
            "skipped_updates": record.skipped_updates,
        }

    def batch(self, step: int) -> dict:
        """The training batch of step `step` (0-based), on the devices."""
        c, d = self.config, self.config.detection
        if d.mode == "rcnn":
            batch = regions.sample_regions(
                self.flat_pool,
                self.scenes["train"],
                step,
                batch_size=rois_per_step(c),
                fg_fraction=d.foreground_fraction,
                flip=d.flip,
                seed=c.seed,
            )
            return jax.device_put(batch, NamedSharding(self.mesh, P()))
        batch = regions.sample_batch(
            self.pool,
            self.scenes["train"],
            step,
            batch_size=c.training.batch_size,
            rois_per_image=d.rois_per_image,
            fg_fraction=d.foreground_fraction,
            fg_iou=d.foreground_iou,
            bg_iou_low=d.background_iou_low,
            flip=d.flip,
            seed=c.seed,
        )
        return jax.device_put(batch, NamedSharding(self.mesh, P()))


def rois_per_step(config: ml_collections.ConfigDict) -> int:
    """The RoIs of one training step (both modes): training.batch_size x rois_per_image."""
    return config.training.batch_size * config.detection.rois_per_image


def test_flops_per_image(
    specs: list, config: ml_collections.ConfigDict, proposals: float | None = None
) -> float:
    """The network's FLOPs per test image (from the specs) for `proposals` scored per image
    (default detection.test_proposals): R-CNN runs every layer once per proposal; Fast R-CNN
    its backbone once per image and the layers from the RoI pooling on once per proposal."""
    if proposals is None:
        proposals = config.detection.test_proposals
    d = config.detection
    if d.mode == "rcnn":
        return proposals * sum(s.flops for s in specs)
    # the backbone once per pyramid level (at the level's image size), the RoI pooling once
    # per level and proposal (every level pools every RoI; one is kept), the rest once per
    # proposal
    at = [s.name for s in specs].index(fast_rcnn.ROI_POOL)
    channels = specs[0].in_shape[2]  # the scenes'
    levels = fast_rcnn.pyramid_sizes((d.image_size, d.image_size), d.pyramid_scales)
    backbone = sum(
        sum(s.flops for s in fast_rcnn.backbone_specs(config.model, (*size, channels)))
        for size, _ in levels
    )
    pooling = len(levels) * specs[at].flops
    return backbone + proposals * (pooling + sum(s.flops for s in specs[at + 1 :]))


def images_per_step(config: ml_collections.ConfigDict) -> int:
    """The images one training step puts through the network: the scenes (Fast R-CNN) or the
    warped regions (R-CNN)."""
    return rois_per_step(config) if config.detection.mode == "rcnn" else config.training.batch_size


def pyramid_target(config: ml_collections.ConfigDict) -> float:
    """Fast R-CNN's pyramid target size in pixels: detection.pyramid_target, or (0) the side
    at which R-CNN's warp shows a region to the classifier: the warp size less twice its
    context padding."""
    if config.detection.pyramid_target:
        return float(config.detection.pyramid_target)
    size = warp_shape(config)[0]
    return size - 2 * rcnn.context_pixels(size)


def roi_context(config: ml_collections.ConfigDict) -> float:
    """The factor Fast R-CNN scales each RoI by before pooling it: with detection.roi_context,
    the region R-CNN's warp shows the classifier over its box (the warp size over the warp
    size less twice its context padding), else 1."""
    if not config.detection.roi_context:
        return 1.0
    size = warp_shape(config)[0]
    return size / (size - 2 * rcnn.context_pixels(size))


def _init_program(config, specs, mesh):
    """The train state's init program (training.state.init_program) of the detection network
    of `config.detection.mode` built from `specs`."""
    d = config.detection
    network = NETWORKS[d.mode]
    extra = {}
    if d.mode == "fast_rcnn":
        extra = {
            "scales": tuple(d.pyramid_scales),
            "target": pyramid_target(config),
            "context": roi_context(config),
        }

    def create(rngs):
        model = network(specs, dtype=config.model.dtype, rngs=rngs, **extra)
        if config.detection.batchnorm == "frozen":
            for _, module in nnx.iter_graph(model):
                if isinstance(module, layers.BatchNorm):
                    module.frozen = True
        return model

    return state_lib.init_program(config, mesh, create)


def train_step(state, batch, *, graphdef, tx, config, mean, std):
    """One step of the multi-task loss on a batch of images and their RoIs; returns
    (new_state, metrics: loss, cls, bbox, correct, count, nonfinite)."""
    d, t = config.detection, config.training
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    x = data.normalize(batch["image"], mean, std, jnp.dtype(config.model.dtype))

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state["batch_stats"], state["other"], copy=True)
        scores, deltas = model(
            x, batch["rois"], batch["roi_image"], train=True, rngs=nnx.Rngs(dropout=key)
        )
        total, parts = fast_rcnn.loss(
            scores,
            deltas,
            batch["labels"],
            batch["targets"],
            batch["weight"],
            bbox_loss_weight=d.bbox_loss_weight,
        )
        return total, (parts, nnx.state(model, nnx.BatchStat))

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new, finite = steps_lib.apply_gradients(state, loss, grads, batch_stats, tx, t)
    return new, {"loss": loss, **parts, "nonfinite": ~finite}


def predict_step(state, images, rois, valid, *, graphdef, config, mean, std):
    """Returns (class probabilities [B, P, K + 1], boxes [B, P, K, 4]: each RoI regressed
    for each class, clipped to the image) for uint8 images [B, S, S, C] and their RoIs
    [B, P, 4], of which those with `valid` [B, P] are proposals and the rest padding, in eval
    mode; R-CNN with `detection.rcnn_scores = 'svm'` returns the RoIs' features [B, P, D] in
    place of the probabilities (`detection.svm` scores them). Fast R-CNN computes the feature
    map once per image; R-CNN warps and classifies P regions at a time (its B x P warped
    regions at once would not fit). Both run the network on the proposals only
    (`regions.over_kept_rois`): a padding slot costs neither method anything, so the test speeds
    compare the work each method needs."""
    d = config.detection
    b, p = rois.shape[:2]
    x = data.normalize(images, mean, std, jnp.dtype(config.model.dtype))
    model = state_lib.merge_model(graphdef, state)
    flat, roi_image, keep = rois.reshape(-1, 4), jnp.repeat(jnp.arange(b), p), valid.reshape(-1)
    if d.mode == "rcnn":

        def network(r, i):
            scores, deltas, features = model.forward(x, r, i)
            return (features if d.rcnn_scores == "svm" else scores), deltas

    else:
        features = model.features(x)

        def network(r, i):
            return model.head(features, r, i)

    scores, deltas = regions.over_kept_rois(network, flat, roi_image, keep, p)
    deltas = deltas * jnp.asarray(d.bbox_target_std, jnp.float32)
    boxes = box_ops.decode(flat[:, None, :], deltas)
    boxes = box_ops.clip(boxes, d.image_size, d.image_size)
    k = deltas.shape[1]
    if d.mode == "rcnn" and d.rcnn_scores == "svm":  # the SVMs score them on the host
        return scores.reshape(b, p, -1), boxes.reshape(b, p, k, 4)
    return jax.nn.softmax(scores).reshape(b, p, k + 1), boxes.reshape(b, p, k, 4)


def input_stats(config: ml_collections.ConfigDict, train_images: np.ndarray) -> tuple:
    """The per-channel (mean, std) in [0, 1] the detector's inputs are normalised by:
    `detection.input_stats` 'scenes': the training scenes'; 'backbone': those of the images
    the backbone classifier was trained on, so its layers see inputs scaled as they learned
    them (the papers subtract the ImageNet mean of their pretrained networks)."""
    if config.detection.input_stats == "backbone":
        from evaluation import run as run_lib

        classifier = run_lib.read_config(Path(backbone_workdir(config)).expanduser())
        splits = data.load(classifier.dataset, seed=classifier.seed)
        if len(splits.mean) != train_images.shape[-1]:
            raise UserError(
                f"detection.input_stats='backbone': the classifier's images have "
                f"{len(splits.mean)} channels, the scenes {train_images.shape[-1]}"
            )
        return np.asarray(splits.mean, np.float32), np.asarray(splits.std, np.float32)
    pixels = train_images.reshape(-1, train_images.shape[-1])
    mean = (pixels.mean(axis=0) / 255.0).astype(np.float32)
    std = (pixels.std(axis=0) / 255.0 + 1e-3).astype(np.float32)
    return mean, std


def backbone_workdir(config: ml_collections.ConfigDict) -> str:
    """`detection.backbone_workdir` with '{seed}' replaced by the run's seed (one experiment
    row then starts each seed's detector from the classifier of that seed)."""
    return config.detection.backbone_workdir.replace("{seed}", str(config.seed))


def with_pretrained_backbone(state, workdir: str, config, specs, mesh):
    """Returns `state` with the backbone's parameters (and BatchNorm statistics) taken from
    the best checkpoint of the classification run in `workdir` (train.py's), whose model
    section must be this config's: Fast R-CNN's conv layers, R-CNN's layers before its class
    scores. The class and box layers keep their initialisation (R-CNN section 2.3: the
    classification layer replaced by a new (N + 1)-way one). UserError when a layer's
    parameters differ in shape (a classifier of other images)."""
    from evaluation import run as run_lib

    path = Path(workdir).expanduser()
    classifier = run_lib.read_config(path)
    if classifier.model.to_dict() != config.model.to_dict():
        differences = workdir_lib.config_differences(
            classifier.model.to_dict(), config.model.to_dict(), "model."
        )
        raise UserError(
            f"config.detection.backbone_workdir={workdir}: its classifier is another model "
            f"({'; '.join(differences)})"
        )
    info = data.dataset_info(classifier.dataset)
    _, abstract = state_lib.abstract_train_state(classifier, info, mesh)
    keep = classifier.training.keep_checkpoints
    saved = ckpt_lib.Checkpoints(path, keep=keep, read_only=True).restore(abstract, "best")[1]
    out, names = dict(state), set()
    for part in ("params", "batch_stats"):
        mine, theirs = nnx.to_pure_dict(state[part]), nnx.to_pure_dict(saved[part])
        for name, layer in mine.get("backbone", {}).get("layers", {}).items():
            source = theirs.get("layers", {}).get(name)
            if source is None:
                continue
            want = jax.tree.map(np.shape, layer)
            if jax.tree.map(np.shape, source) != want:
                raise UserError(
                    f"config.detection.backbone_workdir={workdir}: layer {name!r} has "
                    f"{jax.tree.map(np.shape, source)} there, {want} here (a classifier of "
                    "other images: set dataset and detection.warp_size as it was trained)"
                )
            mine["backbone"]["layers"][name] = source
            names.add(name)
        copied = jax.tree.map(lambda x: x, state[part])
        nnx.replace_by_pure_dict(copied, mine)
        out[part] = jax.device_put(copied, NamedSharding(mesh, P()))
    logging.info("backbone layers %s from the classifier in %s", ", ".join(sorted(names)), path)
    return out


def _compile(config, specs, graphdef, state, mesh, mean, std, which):
    replicated = NamedSharding(mesh, P())
    d, t = config.detection, config.training
    channels = specs[0].in_shape[2]
    image = (d.image_size, d.image_size, channels)
    n, r = images_per_step(config), rois_per_step(config)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    args = dict(graphdef=graphdef, config=config, mean=mean, std=std)
    programs = {}
    if "train" in which:
        step = functools.partial(train_step, tx=optim.make_optimizer(config), **args)
        batch = {
            "image": spec((n, *image), jnp.uint8),
            "rois": spec((r, 4), jnp.float32),
            "roi_image": spec((r,), jnp.int32),
            "labels": spec((r,), jnp.int32),
            "targets": spec((r, 4), jnp.float32),
            "weight": spec((r,), jnp.float32),
        }
        programs["train"] = jax.jit(step, donate_argnums=0).lower(abstract_like(state), batch)
    if "predict" in which:
        e = t.eval_batch_size
        programs["predict"] = jax.jit(functools.partial(predict_step, **args)).lower(
            abstract_like(state),
            spec((e, *image), jnp.uint8),
            spec((e, d.test_proposals, 4), jnp.float32),
            spec((e, d.test_proposals), jnp.bool_),
        )
    start = time.perf_counter()
    compiled = {name: lowered.compile() for name, lowered in programs.items()}
    return compiled.get("train"), compiled.get("predict"), time.perf_counter() - start


def setup(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | Path | None = None,
    restore=None,
    train: bool = True,
) -> Run:
    """Checks `config`, then prepares the workdir (when given: created or checked against its
    config.json, locked, its run files written), the scenes and their proposals (computed
    once, cached), the labelled training RoIs, the state (restored from the workdir's latest
    checkpoint, or by `restore(abstract_state) -> (step, state, meta)`, or fresh) and the
    compiled steps (the train step only with `train`)."""
    specs = validate(config)
    runtime.warn_about_hardware(config.model.dtype)
    return setup_lib.with_workdir(
        config, workdir, lambda path: _build(config, specs, path, restore, train)
    )


def _build(config, specs, workdir, restore, train) -> Run:
    d = config.detection
    mesh = runtime.make_mesh()
    data_splits = regions.load_scenes(config)
    cache = regions.proposal_cache(d)
    start = time.perf_counter()
    needed = [s for s in data_splits if train or s != "train"]
    found = {s: cache.get_all(data_splits[s].images) for s in needed}
    proposal_seconds = time.perf_counter() - start
    logging.info(
        "proposals of %d images in %.1f s (%s)",
        sum(map(len, found.values())),
        proposal_seconds,
        cache.stats,
    )
    pool = None
    if train:
        pool = regions.label_pool(
            data_splits["train"],
            found["train"],
            fg_iou=d.foreground_iou,
            target_std=tuple(d.bbox_target_std),
        )
    flat_pool = regions.FlatPool.of(pool) if pool is not None and d.mode == "rcnn" else None
    mean, std = input_stats(config, data_splits["train"].images)
    checkpoints, restore = setup_lib.open_checkpoints(config, workdir, specs, restore)
    init, structure = _init_program(config, specs, mesh)

    def create():
        state = init()
        if d.backbone_workdir:
            backbone = backbone_workdir(config)
            state = with_pretrained_backbone(state, backbone, config, specs, mesh)
        return state

    step, state, meta = setup_lib.initial_state(restore, lambda: jax.eval_shape(init), create)
    graphdef = structure["graphdef"]
    which = ("train", "predict") if train else ("predict",)
    train_fn, predict_fn, seconds = _compile(config, specs, graphdef, state, mesh, mean, std, which)
    return Run(
        config,
        specs,
        data_splits,
        found,
        pool,
        flat_pool,
        mean,
        std,
        mesh,
        graphdef,
        state,
        step,
        meta,
        train_fn,
        predict_fn,
        seconds,
        proposal_seconds,
        workdir,
        checkpoints,
    )


# --- evaluation -------------------------------------------------------------------------------


def detections_of(probs: np.ndarray, boxes: np.ndarray, valid: np.ndarray, d) -> tuple:
    """One image's detections (boxes [n, 4], scores [n], classes [n]) from its RoIs' class
    probabilities [P, K + 1] and boxes [P, K, 4]: the (RoI, class) pairs scoring at least
    `d.score_threshold`, greedy NMS per class at `d.nms_iou`, the best `d.max_detections`.
    UserError when a proposal's scores or boxes are not finite (they would drop out of the
    thresholds unseen and leave a wrong AP)."""
    if not (np.isfinite(probs[valid]).all() and np.isfinite(boxes[valid]).all()):
        raise UserError(
            "the detector's class scores or boxes are not finite (its weights have diverged); "
            "evaluate an earlier checkpoint or train again with a lower learning rate"
        )
    scores = probs[:, 1:] * valid[:, None]
    roi_index, classes = np.nonzero(scores >= max(d.score_threshold, 1e-12))
    found = scores[roi_index, classes]
    top = np.argsort(-found, kind="stable")[: 20 * d.max_detections]
    roi_index, classes, found = roi_index[top], classes[top], found[top]
    candidates = boxes[roi_index, classes]
    kept = box_ops.nms(candidates, found, classes, threshold=d.nms_iou)[: d.max_detections]
    return candidates[kept], found[kept], classes[kept]


EXAMPLES = 6  # test images whose detections evaluate() keeps for the figures


def evaluate(run: Run, state, split: str) -> dict:
    """Returns the detection measures of `state` on the scenes of `split`: COCO AP@[.5:.95],
    AP50, AP75, per-class AP (pycocotools), the VOC 2007 11-point mAP at IoU 0.5, and the test
    images/s (network and NMS; the proposals are computed beforehand, as the paper's timing).
    """
    d, e = run.config.detection, run.config.training.eval_batch_size
    data_split = run.scenes[split]
    rois, valid = regions.test_rois(run.proposals[split], d.test_proposals)
    svms = svm_lib.fit_for(run, state) if d.mode == "rcnn" and d.rcnn_scores == "svm" else None
    detections = []
    start = time.perf_counter()
    for first in range(0, len(data_split), e):
        images = data_split.images[first : first + e]
        real = len(images)
        pad = e - real
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        batch_rois = np.concatenate([rois[first : first + e], np.zeros((pad, *rois.shape[1:]))])
        batch_valid = np.concatenate(
            [valid[first : first + e], np.zeros((pad, valid.shape[1]), bool)]
        )
        probs, boxes = jax.device_get(
            run.predict_step(state, images, batch_rois.astype(np.float32), batch_valid)
        )
        if svms is not None:
            probs = svm_lib.class_probabilities(probs, svms)
        for i in range(real):
            try:
                detections.append(detections_of(probs[i], boxes[i], valid[first + i], d))
            except UserError as err:
                raise UserError(f"{split} image {first + i}: {err}") from None
    seconds = time.perf_counter() - start
    truth = [data_split.objects(i) for i in range(len(data_split))]
    size = data_split.images.shape[1:3]
    coco = evaluate_lib.coco_ap(
        truth, detections, run.class_names, image_size=size, max_detections=d.max_detections
    )
    voc = evaluate_lib.voc_ap(truth, detections, run.class_names, image_size=size)
    scored = float(valid.sum(1).mean())
    return {
        "ap": coco["ap"],
        "ap50": coco["ap50"],
        "ap75": coco["ap75"],
        "voc07_map": voc["map"],
        "per_class_ap": coco["per_class"],
        "per_class_voc07_ap": voc["per_class"],
        "images": len(data_split),
        "detections": coco["detections"],
        "images_per_s": len(data_split) / max(seconds, 1e-9),
        # the proposals scored per image (its first d.test_proposals; predict_step skips the
        # padding of images with fewer) and the network's FLOPs for them
        "proposals_per_image": scored,
        "flops_per_image": test_flops_per_image(run.specs, run.config, scored),
        "pr50": coco["pr50"],
        # the detections of the first test images, for the figures (detection.figures)
        "examples": [
            {"boxes": b.round(2).tolist(), "scores": s.round(4).tolist(), "classes": c.tolist()}
            for b, s, c in detections[:EXAMPLES]
        ],
    }


# --- training: the training library's loop ---------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains and evaluates the configured detector with `training.loop`; returns the
    results also written to results.json. Resumes from the latest checkpoint in `workdir`;
    the workdir is locked."""
    return loop_lib.train_and_evaluate(config, workdir, prepare=setup)
