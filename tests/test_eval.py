"""eval.py and evaluation/: metrics against NumPy, shift invariance of models built to have it
(or not), activation maps against the summary, the output files, clear errors, and the measure
list driving eval.json, the report and TensorBoard (a subset, a measure added by a test)."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import data
import evaluation
import models
from data import builtin
from errors import UserError
from evaluation import base, internals, measures, shift
from training import runtime

ROOT = Path(__file__).resolve().parent.parent
MAX_SHIFT = 2

# A failed checkpoint read (the corrupt and mismatched checkpoints below) leaves Orbax coroutines
# that are never awaited; they are finalised during whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _rngs(seed: int = 0) -> nnx.Rngs:
    # The 'rbg' generator initialises several times faster on CPU than the default threefry.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def evaluated(workdir) -> dict:
    return evaluation.evaluate_workdir(workdir, max_shift=MAX_SHIFT)


def _copy(workdir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(workdir, target)
    return target


# --- metrics against a NumPy recomputation --------------------------------------------------


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_metrics_equal_numpy_recomputation_from_logits(workdir, evaluated):
    run = evaluation.load_run(workdir, "latest")
    split = run.splits.test
    logits = np.asarray(jax.jit(run.apply_fn())(run.state, split.images), np.float64)
    labels = split.labels
    predicted = logits.argmax(axis=1)
    assert evaluated["count"] == len(labels) == 128
    assert evaluated["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-9)
    assert evaluated["shift"]["circular"]["accuracy"][0] == pytest.approx(evaluated["accuracy"])
    nll = -_log_softmax(logits)[np.arange(len(labels)), labels]
    assert evaluated["loss"] == pytest.approx(nll.mean(), rel=1e-4)
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predicted), 1)
    assert evaluated["confusion_matrix"] == confusion.tolist()
    for c, accuracy in enumerate(evaluated["per_class_accuracy"]):
        assert accuracy == pytest.approx(np.mean(predicted[labels == c] == c))
    probabilities = np.exp(_log_softmax(logits))
    confidence = probabilities.max(axis=1)
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum(
        abs(np.sum(predicted[bins == b] == labels[bins == b]) - confidence[bins == b].sum())
        for b in range(15)
    ) / len(labels)
    assert evaluated["ece"] == pytest.approx(ece, abs=1e-5)
    assert evaluated["calibration"]["count"] == np.bincount(bins, minlength=15).tolist()
    mirrored = np.asarray(jax.jit(run.apply_fn())(run.state, split.images[:, :, ::-1]))
    tta = (probabilities + np.exp(_log_softmax(mirrored.astype(np.float64)))).argmax(axis=1)
    assert evaluated["tta"] is True  # the tiny config trains with flips
    assert evaluated["tta_flip_accuracy"] == pytest.approx(np.mean(tta == labels))
    assert evaluated["images_per_s"] > 0


# --- translation ------------------------------------------------------------------------------


def test_translate_matches_numpy():
    images = np.random.default_rng(0).integers(1, 256, (4, 6, 5, 2), dtype=np.uint8)
    offsets = np.array([[0, 0], [1, -2], [-3, 4], [6, 5]], np.int32)
    circular = np.asarray(shift.translate(jnp.asarray(images), offsets, circular=True))
    zero_fill = np.asarray(shift.translate(jnp.asarray(images), offsets, circular=False))
    for image, (dy, dx), wrapped, filled in zip(images, offsets, circular, zero_fill, strict=True):
        np.testing.assert_array_equal(wrapped, np.roll(image, (dy, dx), axis=(0, 1)))
        expected = np.zeros_like(image)
        h, w = image.shape[:2]
        expected[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
            max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
        ]
        np.testing.assert_array_equal(filled, expected)
    assert shift.curve_offsets(5, 3).tolist() == [[0, 3], [0, -3], [3, 0], [-3, 0], [0, 3]]


def test_zero_shift_gives_consistency_one(evaluated):
    s = evaluated["shift"]
    assert s["max_shift"] == MAX_SHIFT and s["shifts"] == list(range(MAX_SHIFT + 1))
    for mode in ("circular", "zero_fill"):
        assert len(s[mode]["accuracy"]) == len(s[mode]["consistency"]) == MAX_SHIFT + 1
        assert s[mode]["consistency"][0] == 1.0
        assert s[mode]["accuracy"][0] == evaluated["accuracy"]
    assert 0.0 <= s["random_pair_consistency"] <= 1.0


class CircularNet(nnx.Module):
    """Circular 3x3 convolutions (wrap padding, then VALID), ReLU, global average pooling, a
    dense layer: with stride 1 every layer commutes with circular shifts, so the logits are
    invariant to them; with stride S only shifts by multiples of S are."""

    def __init__(self, stride: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), strides=stride, padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        for conv in (self.conv1, self.conv2):
            x = nnx.relu(conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")))
        return self.fc(x.mean(axis=(1, 2)))


def _shift_results(model: nnx.Module, split: data.Split, max_shift: int) -> dict:
    graphdef, variables = nnx.split(model)

    def apply(variables, images):
        return nnx.merge(graphdef, variables)(data.normalize(images, 0.5, 0.25))

    fields, _ = base.measure_split(
        [measures.Shift()],
        apply,
        variables,
        split,
        batch_size=64,
        mesh=runtime.make_mesh(),
        options=base.Options(num_classes=10, max_shift=max_shift),
    )
    return fields["shift"]


def test_circular_stride_one_model_is_exactly_invariant_and_strided_one_is_not():
    split = data.Split(*builtin.generate(128, seed=3))
    invariant = _shift_results(CircularNet(1, _rngs()), split, max_shift=4)
    assert invariant["circular"]["consistency"] == [1.0] * 5
    assert invariant["random_pair_consistency"] == 1.0
    assert min(invariant["zero_fill"]["consistency"]) < 1.0  # zero fill loses pixels
    strided = _shift_results(CircularNet(4, _rngs()), split, max_shift=4)
    consistency = strided["circular"]["consistency"]
    assert max(consistency[1:4]) < 1.0 and strided["random_pair_consistency"] < 1.0
    assert consistency[4] == 1.0  # a shift by the stride moves the sampling grid by one


def test_pooled_model_is_not_shift_invariant(evaluated):
    # Stride-2 max pooling, zero padding and a dense head on the flattened map.
    assert min(evaluated["shift"]["circular"]["consistency"][1:]) < 1.0


# --- what the layers do -----------------------------------------------------------------------


def test_activation_maps_have_the_summarys_shapes(workdir, evaluated):
    layers = {
        layer["name"]: layer
        for layer in json.loads((workdir / "summary.json").read_text())["layers"]
    }
    maps = evaluated["activation_maps"]
    names = [m["layer"] for m in maps if m["image"] == 0]
    assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3"]
    assert {m["image"] for m in maps} == set(range(measures.ACTIVATION_IMAGES))
    for m in maps:
        assert m["shape"] == layers[m["layer"]]["out_shape"], m


def test_pooling_example_is_the_models_pooling(evaluated):
    example = evaluated["pooling_example"]
    values = np.asarray(example["values"])
    assert values.shape == (2, 2) and example["layer"] == "relu1"
    assert example["pool_layer"] == "pool1" and example["function"] == "max"
    assert example["max"] == pytest.approx(values.max())
    assert example["avg"] == pytest.approx(values.mean())
    assert example["l2"] == pytest.approx(np.sqrt(np.mean(values**2)))
    assert example["model_output"] == pytest.approx(example["max"])


@pytest.mark.parametrize("preset", ["plain_local", "mlp"])
def test_first_layer_filters_without_weight_sharing(preset):
    cfg = models.preset(preset)
    specs = models.architecture(cfg, (8, 8, 3), 10)
    model = models.create_model(cfg, (8, 8, 3), 10, rngs=_rngs())
    filters, description = internals.first_layer_filters(model, specs)
    expected = (16, 3, 3, 3) if preset == "plain_local" else (108, 8, 8, 3)
    assert filters.shape == expected and description


def test_activation_stages_of_a_deep_resnet_are_one_per_shape():
    specs = models.architecture(models.preset("resnet20"), (32, 32, 3), 10)
    stages = internals.activation_stages(specs)
    assert [s.out_shape for s in stages] == [(32, 32, 16), (16, 16, 32), (8, 8, 64)]


# --- outputs and errors -----------------------------------------------------------------------


def test_every_output_file_is_written_and_readable(workdir, evaluated):
    out = workdir / "eval" / "latest"
    assert json.loads((out / "eval.json").read_text()) == evaluated
    names = set(evaluated["figures"])
    assert {
        "confusion_matrix.png",
        "shift_curves.png",
        "reliability.png",
        "filters.png",
        "pooling_window.png",
    } <= names
    assert {m["file"] for m in evaluated["activation_maps"]} <= names
    assert names == {p.name for p in out.glob("*.png")}
    for name in names:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    assert any((workdir / "tensorboard" / "eval_latest").iterdir())
    for key in ("checkpoint", "step", "split", "per_class_accuracy", "images_per_s", "ece"):
        assert key in evaluated
    assert evaluated["step"] == 12 and evaluated["split"] == "test"


def test_reads_a_run_that_is_still_training(workdir, tmp_path):
    run_dir = _copy(workdir, tmp_path)
    # A save in progress: Orbax writes into a temporary folder and renames it when complete.
    saving = run_dir / "checkpoints" / "18.orbax-checkpoint-tmp-1795600000"
    saving.mkdir()
    (saving / "partial").write_text("")
    run = evaluation.load_run(run_dir, "latest")
    assert run.step == 12
    assert (saving / "partial").exists()  # read-only: nothing cleaned up
    assert evaluation.load_run(run_dir, "6").step == 6


def test_corrupt_checkpoint_gives_one_clear_line(workdir, tmp_path):
    run_dir = _copy(workdir, tmp_path)
    for chunk in run_dir.glob("checkpoints/*/state/ocdbt.process_0/d/*"):
        chunk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read the checkpoint"):
        evaluation.load_run(run_dir, "latest")
    done = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={run_dir}", "--nofigures"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot read the checkpoint")
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_config_that_does_not_match_the_checkpoint(workdir, tmp_path):
    run_dir = _copy(workdir, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["widths"] = [16, 64, 128]
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"does not match the checkpoint.*conv1/bias.*\(32,\)"):
        evaluation.load_run(run_dir, "latest")


def test_run_saved_before_a_config_field_existed_is_evaluated(workdir, tmp_path):
    # config.json of an earlier version of the project lacks the fields added since
    run_dir = _copy(workdir, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    added = config["distributed"].pop("initialization_timeout")
    (run_dir / "config.json").write_text(json.dumps(config))
    run = evaluation.load_run(run_dir, "latest")
    assert run.config.distributed.initialization_timeout == added  # the default
    assert run.step == 12


def test_missing_workdir_checkpoint_or_split(workdir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluation.evaluate_workdir(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no config.json"):
        evaluation.evaluate_workdir(tmp_path)
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        evaluation.load_run(workdir, "7")
    with pytest.raises(UserError, match="latest, best or a step"):
        evaluation.load_run(workdir, "newest")
    run = evaluation.load_run(workdir, "best")
    assert run.step == json.loads((workdir / "results.json").read_text())["best"]["step"]
    with pytest.raises(UserError, match="unknown split"):
        run.split("holdout")


# --- the measure list -------------------------------------------------------------------------


def _tensorboard_tags(directory: Path) -> list[str]:
    """The scalar tags written to the TensorBoard event files in `directory`."""
    from tensorboardX.proto import event_pb2

    tags = []
    for path in sorted(directory.iterdir()):
        raw, i = path.read_bytes(), 0
        while i < len(raw):  # records: length (8 bytes), its CRC (4), event, its CRC (4)
            (length,) = struct.unpack("<Q", raw[i : i + 8])
            event = event_pb2.Event.FromString(raw[i + 12 : i + 12 + length])
            tags += [value.tag for value in event.summary.value]
            i += 12 + length + 4
    return tags


HEADER = {"workdir", "checkpoint", "step", "split", "model", "dataset", "class_names", "count"}


def test_measures_flag_chooses_the_fields_report_lines_and_scalars(workdir, evaluated):
    assert evaluated["measures"] == list(measures.DEFAULT)
    result = evaluation.evaluate_workdir(
        workdir, "6", max_shift=1, figures=False, measures="calibration,shift"
    )
    assert set(result) == HEADER | {"measures", "ece", "calibration", "shift"}
    assert result["measures"] == ["calibration", "shift"]
    assert json.loads((workdir / "eval" / "6" / "eval.json").read_text()) == result
    lines = evaluation.format_report(result).splitlines()
    assert lines[1] == f"ECE {measures.percent(result['ece'])}"
    assert lines[2].startswith("shift (pixels)") and lines[-1].startswith("random-pair")
    assert not any("accuracy:" in line or "images/s" in line for line in lines)
    assert _tensorboard_tags(workdir / "tensorboard" / "eval_6") == [
        "test/ece",
        "test/random_pair_consistency",
        "test/circular_consistency_at_max_shift",
        "test/zero_fill_consistency_at_max_shift",
    ]


def test_tta_flag_adds_or_silences_flip_tta():
    assert evaluation.measure_names("accuracy", tta=True) == ["accuracy", "tta"]
    assert evaluation.measure_names(["shift", "tta", "shift"], tta=None) == ["shift", "tta"]
    assert evaluation.measure_names(None, tta=False) == list(measures.DEFAULT)


def test_unknown_measure_is_one_clear_line(workdir):
    valid = ", ".join(base.REGISTRY)
    with pytest.raises(UserError, match=f"unknown measure 'nonsense'.*choose from {valid}"):
        evaluation.evaluate_workdir(workdir, measures=["accuracy", "nonsense"])
    done = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={workdir}", "--measures=shift,nonsense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: unknown measure 'nonsense' in --measures; choose from {valid}."
    )


class MeanTopLogit(base.Measure):
    """A measure of the kind a user adds: batch sums, a field, a scalar, report lines, a figure,
    and a look at the restored run through the context."""

    name = "mean_top_logit"

    def sums(self, batch):
        return {"top_logit": jnp.sum(jnp.max(batch.logits, axis=-1) * batch.mask)}

    def run(self, context, sums):
        value = float(sums["top_logit"]) / context.count
        return {"mean_top_logit": value, "top_logit_step": context.run.step}

    def scalars(self, result):
        return {"mean_top_logit": result["mean_top_logit"]}

    def headline(self, result):
        return [f"top logit {result['mean_top_logit']:.3f}"]

    def report(self, result):
        return [f"mean top logit at step {result['top_logit_step']}"]

    def figures(self, result, context):
        Image.new("L", (120, 120)).save(context.out_dir / "top_logit.png")
        return {"top_logit_figure": "top_logit.png"}


@pytest.fixture
def registered():
    base.register(MeanTopLogit)
    yield MeanTopLogit
    del base.REGISTRY[MeanTopLogit.name]


def test_a_registered_measure_shows_up_everywhere(workdir, registered):
    result = evaluation.evaluate_workdir(
        workdir, "12", max_shift=0, measures=["accuracy", registered.name]
    )
    run = evaluation.load_run(workdir, "12")
    logits = np.asarray(jax.jit(run.apply_fn())(run.state, run.splits.test.images))
    assert result["mean_top_logit"] == pytest.approx(logits.max(axis=1).mean(), rel=1e-5)
    assert result["top_logit_step"] == 12 and result["top_logit_figure"] == "top_logit.png"
    assert result["figures"] == ["confusion_matrix.png", "top_logit.png"]
    assert json.loads((workdir / "eval" / "12" / "eval.json").read_text()) == result
    report = evaluation.format_report(result).splitlines()
    assert report[1].endswith(f"top logit {result['mean_top_logit']:.3f}")
    assert report[-1] == "mean top logit at step 12"
    tags = _tensorboard_tags(workdir / "tensorboard" / "eval_12")
    assert tags == ["test/accuracy", "test/loss", "test/mean_top_logit"]
