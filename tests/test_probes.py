"""The per-layer measures: probe points and receptive-field windows against the arithmetic and
against gradients, linear probes on features whose content is known, invariance through the
layers of models built to be shift invariant (or not), the top patches' crops, pooling worked
through for every kind, and the measures on a trained run (eval.json, report, figures)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_eval import (
    CircularNet,
    _rngs,
)

import data
import evaluation
import models
from data import builtin
from evaluation import base, figures, internals, invariance, measures, patches, probes, taps
from models.shapes import INPUT
from training import runtime

MAX_SHIFT = 2


@pytest.fixture(scope="module")
def evaluated(workdir) -> dict:
    return evaluation.evaluate_workdir(
        workdir, max_shift=MAX_SHIFT, measures="shift,layer_invariance,probes,top_patches"
    )


# --- probe points and receptive-field windows ------------------------------------------------


def test_probe_points_close_convs_pools_and_blocks():
    specs = models.architecture(models.preset("pooled_max"), (32, 32, 3), 10)
    points = taps.probe_points(specs)
    assert [(p.name, p.kind) for p in points] == [
        (INPUT, "input"),
        ("relu1", "conv"),
        ("pool1", "pool"),
        ("relu2", "conv"),
        ("pool2", "pool"),
        ("relu3", "conv"),
        ("pool3", "pool"),
        ("fc", "output"),
    ]
    assert [p.depth for p in points] == list(range(8))
    assert [p.receptive_field for p in points] == [1, 3, 4, 8, 10, 18, 22, 46]
    resnet = taps.probe_points(models.architecture(models.preset("resnet20"), (32, 32, 3), 10))
    kinds = [p.kind for p in resnet]
    assert kinds.count("block") == 9 and kinds.count("conv") == 10  # stem + 9 inner
    assert kinds[-2:] == ["global_pool", "output"]
    assert resnet[3].name == "stage1_block1_relu2" and resnet[3].weight_layers == 3


@pytest.mark.parametrize("preset", models.PRESETS)
def test_geometry_reproduces_the_specs_receptive_fields(preset):
    specs = models.architecture(models.preset(preset), (32, 32, 3), 10)
    geometry = taps.geometries(specs)
    for spec in specs:
        assert geometry[spec.name].size == spec.receptive_field, spec.name
        assert geometry[spec.name].jump == spec.jump, spec.name


def _influence(model, name: str, images: np.ndarray):
    """Returns influence(position): the input pixels [H, W] whose change changes layer
    `name`'s output at `position` (summed over channels) for some of `images`, i.e. where the
    gradient is not zero. One compiled gradient serves every position."""

    graphdef, state = nnx.split(model)

    @jax.jit
    def gradient(state, row, col):
        def unit(x):
            _, outputs = models.capture_activations(nnx.merge(graphdef, state), x)
            return jnp.sum(outputs[name][:, row, col, :])

        return jax.grad(unit)(jnp.asarray(images, jnp.float32))

    return lambda position: np.any(np.asarray(gradient(state, *position)) != 0, axis=(0, 3))


@pytest.mark.parametrize(
    ("preset", "overrides", "every"),
    [
        ("pooled_avg", {"activation": "tanh"}, 1),  # tanh and averages: no gradient is zero
        ("allcnn_c", {"activation": "tanh", "widths": (8, 8)}, 2),  # strided convs
        ("resnet20", {}, 5),  # shortcuts; ReLU: the union over a few images
    ],
)
def test_window_is_the_set_of_pixels_that_change_the_output(preset, overrides, every):
    cfg = models.preset(preset)
    cfg.update(overrides)
    shape = (20, 20, 3)
    specs = models.architecture(cfg, shape, 10)
    model = models.create_model(cfg, shape, 10, rngs=_rngs())
    geometry = taps.geometries(specs)
    images = np.random.default_rng(0).normal(size=(4, *shape))
    points = [p for p in taps.probe_points(specs) if len(p.shape) == 3 and p.kind != "input"]
    for point in points[::every]:
        influence = _influence(model, point.name, images)
        height = point.shape[0]
        for position in [(0, 0), (height // 2, height // 3), (height - 1, height - 1)]:
            top, left, bottom, right = taps.input_window(geometry[point.name], position, shape)
            expected = np.zeros(shape[:2], bool)
            expected[top:bottom, left:right] = True
            found = influence(position)
            np.testing.assert_array_equal(found, expected, err_msg=f"{point.name} {position}")


# --- linear probes --------------------------------------------------------------------------


class KnownFeatures(nnx.Module):
    """A module whose layers are known: 'label' passes the label through (one-hot, read from
    pixel (0, 0, 0), where the data hides it), 'noise' is the rest of the image (random pixels,
    independent of the label)."""

    def __call__(self, x):
        label = jnp.round(x[:, 0, 0, 0] / 25).astype(jnp.int32)
        one_hot = jax.nn.one_hot(label, 10)[:, None, None, :] * jnp.ones((1, 4, 4, 1))
        noise = x[:, 1:, 1:, :] / 255.0
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, "label", one_hot)
            self.sow(nnx.Intermediate, "noise", noise)
        return one_hot[:, 0, 0, :]


def _labelled_noise(count: int, seed: int) -> data.Split:
    """Random 8x8x3 images with random labels, the label written into pixel (0, 0, 0)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int32)
    images[:, 0, 0, 0] = labels * 25
    return data.Split(images, labels)


def test_probes_read_a_passed_through_label_and_not_noise():
    module = KnownFeatures()
    graphdef, variables = nnx.split(module)
    points = [
        taps.Point(INPUT, "input", 0, 0, 1, 1, (8, 8, 3)),
        taps.Point("label", "conv", 1, 1, 1, 1, (4, 4, 10)),
        taps.Point("noise", "conv", 2, 1, 1, 1, (7, 7, 3)),
    ]
    tap = taps.Tap.of_module(graphdef, points, lambda images: images.astype(jnp.float32))
    test = _labelled_noise(1000, seed=1)
    fields, _ = base.measure_split(
        [probes.Probes()],
        lambda v, images: nnx.merge(graphdef, v)(images.astype(jnp.float32)),
        variables,
        test,
        batch_size=100,
        mesh=runtime.make_mesh(),
        options=base.Options(num_classes=10),
        tap=tap,
        train_examples=_labelled_noise(2000, seed=0),
    )
    layers = {layer["layer"]: layer for layer in fields["probes"]["layers"]}
    assert fields["probes"]["train_examples"] == 2000 and fields["probes"]["test_examples"] == 1000
    assert layers["label"]["test_accuracy"] >= 0.99 and layers["label"]["train_accuracy"] >= 0.99
    assert layers["label"]["grid2"]["test_accuracy"] >= 0.99
    # 1000 test images: chance is 10% with a standard error of about 1%.
    for name in ("noise", INPUT):
        assert layers[name]["test_accuracy"] < 0.15, name
        assert layers[name]["grid2"]["test_accuracy"] < 0.15, name
    assert layers["noise"]["features"] == 3 and layers["noise"]["grid2"]["features"] == 12
    falls = fields["probes"]["trend"]["falls"]
    assert [(f["from"], f["to"]) for f in falls] == [("label", "noise")]
    assert "it falls at: label -> noise" in probes.trend_sentence(fields["probes"])


def test_probe_padding_columns_change_nothing():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 5)).astype(np.float32)
    labels = (features[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(np.int32)
    tests = {"test": (features, labels)}
    plain = probes.fit_probe(features, labels, tests, 2)
    padded = probes.fit_probe(features, labels, tests, 2, width=17)
    assert plain["features"] == padded["features"] == 5
    assert plain["test_accuracy"] == padded["test_accuracy"] > 0.7
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-4)


# --- invariance through the layers ----------------------------------------------------------


class SowingCircularNet(CircularNet):
    """tests/test_eval.py's CircularNet, sowing each layer's output."""

    def __call__(self, x):
        for name, conv in (("relu1", self.conv1), ("relu2", self.conv2)):
            x = nnx.relu(conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")))
            if hasattr(self, "__captures__"):
                self.sow(nnx.Intermediate, name, x)
        return self.fc(x.mean(axis=(1, 2)))


def _circular_measures(stride: int, chosen, max_shift: int = 4) -> dict:
    model = SowingCircularNet(stride, _rngs())
    graphdef, variables = nnx.split(model)

    def normalize(images):
        return data.normalize(images, 0.5, 0.25)

    side = 32 // stride
    points = [
        taps.Point(INPUT, "input", 0, 0, 1, 1, (32, 32, 3)),
        taps.Point("relu1", "conv", 1, 1, 3, stride, (side, side, 8)),
        taps.Point("relu2", "conv", 2, 2, 5, stride, (side, side, 16)),
    ]
    fields, _ = base.measure_split(
        chosen,
        lambda v, images: nnx.merge(graphdef, v)(normalize(images)),
        variables,
        data.Split(*builtin.generate(128, seed=3)),
        batch_size=64,
        mesh=runtime.make_mesh(),
        options=base.Options(num_classes=10, max_shift=max_shift),
        tap=taps.Tap.of_module(graphdef, points, normalize),
    )
    return fields


def test_invariance_is_one_for_an_exactly_invariant_model_and_lower_otherwise():
    exact = _circular_measures(1, [invariance.LayerInvariance()])["layer_invariance"]
    # pairs: (x, the next x of its batch), wrapping around: one per image
    assert exact["shifts"] == [0, 1, 2, 3, 4] and exact["pairs"] == 128
    for layer in exact["layers"]:
        np.testing.assert_allclose(layer["pooled"]["invariance"], 1.0, atol=1e-5)
        assert layer["pooled"]["pair_cosine"] < 0.99  # two images are not alike
        # The whole map moves with the input: not invariant, but more alike than two images.
        assert all(0 < v < 0.99 for v in layer["map"]["invariance"][1:]), layer["layer"]
    strided = _circular_measures(4, [invariance.LayerInvariance()])["layer_invariance"]
    for layer in strided["layers"][1:]:
        values = layer["pooled"]["invariance"]
        assert max(values[1:4]) < 0.999, layer["layer"]
        assert values[4] == pytest.approx(1.0, abs=1e-5)  # a shift by the stride
    lines = invariance.invariance_lines(strided)
    assert lines[1].split()[:3] == ["layer", "RF", "jump"] and len(lines) == 2 + 3 + 1


def test_the_shared_pass_leaves_the_shift_curves_unchanged():
    alone = _circular_measures(4, [measures.Shift()], max_shift=3)["shift"]
    shared = _circular_measures(4, [measures.Shift(), invariance.LayerInvariance()], max_shift=3)
    assert shared["shift"] == alone
    none = _circular_measures(4, [invariance.LayerInvariance()], max_shift=0)
    assert [layer["pooled"]["invariance"] for layer in none["layer_invariance"]["layers"]] == [
        [1.0]
    ] * 3


# --- pooling worked through -----------------------------------------------------------------


@pytest.mark.parametrize("preset", ["pooled_depth", "pooled_l2", "plain"])
def test_pooling_example_shows_every_kind_with_the_models_outputs(preset, tmp_path):
    cfg = models.preset(preset)
    specs = models.architecture(cfg, (8, 8, 3), 10)
    model = models.create_model(cfg, (8, 8, 3), 10, rngs=_rngs())
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    _, activations = jax.device_get(models.capture_activations(model, images))
    example = internals.pooling_example(activations, specs)
    values = np.asarray(example["values"])
    assert example["max"] == pytest.approx(values.max())
    assert example["l2"] == pytest.approx(np.sqrt(np.mean(values**2)), rel=1e-5)
    depth = example["depth"]
    first, last = depth["channels"]
    assert last - first + 1 == depth["window"] == len(depth["values"])
    row, col = depth["position"]
    channels = activations[depth["layer"]][0, row, col, first : last + 1]
    np.testing.assert_allclose(depth["values"], channels)
    assert depth["depth"] == pytest.approx(max(depth["values"]))
    if preset == "pooled_depth":
        assert example["pool_layer"] is None and example["model_pooling"] == ["depth"]
        assert depth["pool_layer"] == "pool1" and depth["model_output"] == depth["depth"]
    else:
        assert depth["pool_layer"] is None and depth["model_output"] is None
        assert example["model_pooling"] == ([] if preset == "plain" else ["l2"])
    if preset == "pooled_l2":
        assert example["model_output"] == pytest.approx(example["l2"], rel=1e-5)
    figures.pooling_window(tmp_path / "pooling.png", example)
    assert (tmp_path / "pooling.png").stat().st_size > 1000


# --- the measures on a trained run ----------------------------------------------------------


def test_top_patches_are_the_units_peaks_cropped_to_their_windows(workdir, evaluated):
    run = evaluation.load_run(workdir, "latest")
    result = evaluated["top_patches"]
    assert result["images"] == len(run.splits.test) == 128
    geometry = taps.geometries(run.specs)
    tap = taps.Tap.of_run(run)
    _, outputs = jax.device_get(jax.jit(tap.capture)(run.state, run.splits.test.images))
    assert [layer["layer"] for layer in result["layers"]] == [
        "relu1",
        "pool1",
        "relu2",
        "pool2",
        "relu3",
        "pool3",
    ]
    for layer in result["layers"]:
        spec = next(s for s in run.specs if s.name == layer["layer"])
        output = np.asarray(outputs[layer["layer"]], np.float32)
        assert len(layer["units"]) == patches.UNITS_PER_LAYER
        for unit in layer["units"]:
            c = unit["channel"]
            peaks = output[..., c].reshape(len(output), -1).max(axis=1)
            images = [p["image"] for p in unit["patches"]]
            assert images == list(np.argsort(-peaks, kind="stable")[: patches.PATCHES_PER_UNIT])
            for p in unit["patches"]:
                row, col = p["position"]
                assert p["activation"] == pytest.approx(output[p["image"], row, col, c])
                assert p["activation"] == pytest.approx(peaks[p["image"]])
                # The receptive-field arithmetic, written out: rows row*jump - offset ...
                g = geometry[layer["layer"]]
                assert g.size == spec.receptive_field and g.jump == spec.jump
                top, left = row * g.jump - g.offset, col * g.jump - g.offset
                assert p["window"] == [
                    max(top, 0),
                    max(left, 0),
                    min(top + spec.receptive_field, 32),
                    min(left + spec.receptive_field, 32),
                ]
                image = run.splits.test.images[p["image"]]
                canvas = patches.crop(image, p["window"], g, p["position"])
                top, left, bottom, right = p["window"]
                inside = np.sort(canvas[~np.isnan(canvas[..., 0])].ravel())
                window = image[top:bottom, left:right] / 255.0
                np.testing.assert_allclose(inside, np.sort(window.ravel()))


def test_crop_places_a_clipped_window_where_it_lies():
    image = np.arange(10 * 10, dtype=np.uint8).reshape(10, 10, 1)
    g = taps.Geometry(offset=2, jump=2, size=6)  # output i sees 2i - 2 ... 2i + 3
    window = taps.input_window(g, (0, 4), image.shape)
    assert window == (0, 6, 4, 10)
    canvas = patches.crop(image, window, g, (0, 4))
    assert canvas.shape == (6, 6, 1)
    assert np.isnan(canvas[:2]).all() and np.isnan(canvas[:, 4:]).all()  # above, right of it
    np.testing.assert_array_equal(canvas[2:, :4, 0], image[0:4, 6:10, 0] / 255.0)


def test_layer_measures_on_a_trained_run(workdir, evaluated):
    assert evaluated["measures"] == ["shift", "layer_invariance", "probes", "top_patches"]
    layers = evaluated["probes"]["layers"]
    assert [layer["layer"] for layer in layers] == [
        INPUT,
        "relu1",
        "pool1",
        "relu2",
        "pool2",
        "relu3",
        "pool3",
        "fc",
    ]
    assert [layer["features"] for layer in layers] == [3, 32, 32, 64, 64, 128, 128, 10]
    assert layers[-1]["grid2"] is None and layers[1]["grid2"]["features"] == 128
    for layer in layers:
        assert 0 <= layer["test_accuracy"] <= 1 and 0 <= layer["train_accuracy"] <= 1
    assert evaluated["probes"]["train_examples"] == 512 - 128  # all of the tiny split
    assert evaluated["probes"]["test_examples"] == 128
    invariant = evaluated["layer_invariance"]
    assert [layer["layer"] for layer in invariant["layers"]] == [layer["layer"] for layer in layers]
    for layer in invariant["layers"]:
        assert layer["pooled"]["invariance"][0] == layer["map"]["invariance"][0] == 1.0
    # The class scores are a vector: the whole 'map' is the pooled output.
    assert invariant["layers"][-1]["map"] == invariant["layers"][-1]["pooled"]
    assert {"layer_invariance.png", "probes.png", "top_patches.png"} <= set(evaluated["figures"])
    report = evaluation.format_report(evaluated)
    assert "linear probes (384 training images" in report and "Spearman rho" in report
    assert "invariance to circular shifts by layer" in report
    saved = json.loads((workdir / "eval" / "latest" / "eval.json").read_text())
    assert saved == evaluated
    scalars = probes.Probes().scalars(evaluated)
    assert set(scalars) >= {"probe_input_accuracy", "probe_best_accuracy"}
    assert all(math.isfinite(v) for v in scalars.values())


def test_default_measures_include_layer_invariance_not_the_costly_ones():
    assert "layer_invariance" in measures.DEFAULT
    assert "probes" not in measures.DEFAULT and "top_patches" not in measures.DEFAULT
    assert {"probes", "top_patches", "layer_invariance"} <= set(base.REGISTRY)


def test_update_adds_measures_to_the_evaluation_of_the_same_step(workdir):
    first = evaluation.evaluate_workdir(workdir, "6", max_shift=1, measures="calibration")
    assert first["measures"] == ["calibration"]
    added = evaluation.evaluate_workdir(
        workdir, "6", max_shift=1, measures="layer_invariance", update=True
    )
    assert added["measures"] == ["calibration", "layer_invariance"]
    assert added["ece"] == first["ece"] and "layer_invariance" in added
    assert {"reliability.png", "layer_invariance.png"} <= set(added["figures"])
    assert json.loads((workdir / "eval" / "6" / "eval.json").read_text()) == added
    lines = evaluation.format_report(added).splitlines()
    assert lines[1].startswith("ECE") and any("by layer" in line for line in lines)
    replaced = evaluation.evaluate_workdir(workdir, "6", max_shift=1, measures="calibration")
    assert replaced["measures"] == ["calibration"] and "layer_invariance" not in replaced
    assert replaced["figures"] == ["reliability.png"]


def test_deep_networks_compare_at_most_shift_points_under_shifts():
    specs = models.architecture(models.preset("resnet110"), (32, 32, 3), 10)
    points = taps.probe_points(specs)
    kept = taps.thin(points, base.SHIFT_POINTS)
    assert len(points) == 112 and len(kept) == base.SHIFT_POINTS
    assert kept[0] == points[0] and kept[-1] == points[-1]
    assert taps.thin(points[:5], base.SHIFT_POINTS) == list(points[:5])
