"""The architecture summary: table, JSON, real parameter count, and `python -m models`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

import models
from models import summary

ROOT = Path(__file__).resolve().parent.parent
CIFAR = (32, 32, 3)


def _specs(preset, shape=CIFAR):
    return models.architecture(models.preset(preset), shape, 10)


def test_table_lists_every_layer_and_the_totals():
    specs = _specs("pooled_max")
    table = summary.format_table(specs)
    for spec in specs:
        assert spec.name in table
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line}
    # name, kind, F, S, P, input, output, weights, biases, FLOPs, RF
    assert rows["conv1"] == ["conv1", "conv", "3", "1", "1", "32x32x3", "32x32x32", "864", "32",
                             "1,769,472", "3"]  # fmt: skip
    assert rows["pool1"][:8] == ["pool1", "pool", "max", "2", "2", "0", "32x32x32", "16x16x32"]
    assert f"trained params: {summary.totals(specs)['params']:,}" in table
    assert "input 32x32x3 -> output 10" in table


def test_table_shows_what_weight_sharing_saves():
    table = summary.format_table(_specs("plain_local"))
    # conv1: 3x3x3 -> 16 at 32x32 positions: 1024 * 448 unshared vs 448 shared.
    assert "shared conv: 448 params (sharing saves 458,304, 1,024x)" in table
    assert "locally connected layers: 14,680,064 params; with weight sharing 14,336" in table


def test_table_shows_residual_inputs_and_batch_statistics():
    table = summary.format_table(_specs("resnet20"))
    assert "from stage1_block1_norm2 + stem_relu" in table
    assert "stage2_block1_shortcut  shortcut A" in table
    assert "BatchNorm running statistics (state, not trained): 1,376" in table


@pytest.mark.parametrize("preset", ["pooled_depth", "allcnn_c", "resnet20_b"])
def test_json_totals_equal_the_real_model(preset):
    specs = _specs(preset)
    report = json.loads(json.dumps(summary.to_json(specs)))  # JSON-serialisable
    cfg = models.preset(preset)
    model = nnx.eval_shape(lambda: models.create_model(cfg, CIFAR, 10, rngs=nnx.Rngs(0)))
    assert report["total_params"] == summary.count_params(model)
    assert report["total_params"] == sum(layer["params"] for layer in report["layers"])
    assert report["total_flops"] == sum(layer["flops"] for layer in report["layers"])
    assert report["input_shape"] == [32, 32, 3] and report["output_shape"] == [10]
    first = report["layers"][0]
    for key in (
        "name",
        "kind",
        "kernel_size",
        "stride",
        "padding",
        "in_shape",
        "out_shape",
        "weights",
        "biases",
        "flops",
        "receptive_field",
    ):
        assert key in first


def test_command_line_prints_the_summary():
    data = pytest.importorskip("data")
    if not hasattr(data, "dataset_info"):
        pytest.skip("data.dataset_info is not there yet")
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "models", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    done = run("--config=configs/base.py:resnet20", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total_params"] == 269_722
    done = run("--config=configs/base.py:plain", "--config.model.kernel_size=40")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: layer 'conv1': H2 = floor((32 + 2*1 - 40)/1)")
