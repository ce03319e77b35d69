"""experiments/detection.py: R-CNN vs Fast R-CNN, its runs, its runner and its report."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
from data import builtin
from errors import UserError
from experiments import detection as experiment_lib
from experiments import runner

ROOT = Path(__file__).resolve().parent.parent


def test_the_experiment_compares_the_two_methods_on_the_same_scenes():
    for variant in experiments.variants("detection"):
        experiment = experiments.get(f"detection:{variant}")
        configs = [runner.build_config(run, 0) for run in experiment.runs]
        assert [c.detection.mode for c in configs[:2]] == ["rcnn", "fast_rcnn"]
        assert configs[0].dataset.name == configs[1].dataset.name
        # everything but the method is the same
        a, b, *pyramid = (c.to_dict() for c in configs)
        for c in (a, b, *pyramid):
            c["detection"].pop("mode")
        assert a == b
        # Fashion-MNIST's other rows are Fast R-CNN with an image pyramid, RoIAlign or both,
        # then R-CNN's context alone and with both, nothing else
        assert len(pyramid) == 5 * (variant == "fashion_mnist")
        changed = [
            ("pyramid_scales",),
            ("roi_pool",),
            ("roi_pool", "pyramid_scales"),
            ("roi_context",),
            ("roi_pool", "pyramid_scales", "roi_context"),
        ]
        for row, fields in zip(pyramid, changed[: len(pyramid)], strict=True):
            for field in fields:
                assert row["detection"][field] != b["detection"][field]
                row["detection"][field] = b["detection"][field]
            assert row == b
    with pytest.raises(UserError, match="detection:cifar10"):
        experiments.get("detection:cifar10")


def test_the_table_gives_ap50s_interval_and_plateau_from_known_numbers():
    # AP50 0.80, 0.82, 0.84: mean 82.0, std 2.0, 95 % interval 82.0 -/+ t(0.975, 2) 4.3027 x
    # 2.0 / sqrt(3) = 4.97 points: [77.0, 87.0]. Held-out curves: the first flat at its end (last
    # three within 2 points), the second still rising, the third with two evaluations only.
    curves = (
        [(1, 0.5), (2, 0.79), (3, 0.80), (4, 0.80)],
        [(1, 0.70), (2, 0.75), (3, 0.82)],
        [(1, 0.80), (2, 0.80)],
    )
    seeds = [
        {key: 1.0 for key, *_ in experiment_lib.MEASURES} | {"ap50": ap50, "curve": curve}
        for ap50, curve in zip((0.80, 0.82, 0.84), curves, strict=True)
    ]
    table = experiment_lib.markdown_table([{"name": "rcnn", "seeds": seeds}])
    head, _, row = table.splitlines()
    assert head.startswith("| method | seeds | AP50 | AP50 95 % interval | plateaued | AP@")
    assert row.startswith("| R-CNN | 3 | 82.0 ± 2.0 | [77.0, 87.0] | 1/3 | 100.0 ± 0.0 |")
    assert [experiment_lib.plateaued(s) for s in seeds] == [True, False, False]
    seeds[0]["curve"] = [(2, 0.77), (3, 0.80), (4, 0.80)]  # 3 points apart: not flat
    assert not experiment_lib.plateaued(seeds[0])
    one = experiment_lib.markdown_table([{"name": "fast_rcnn", "seeds": seeds[:1]}])
    assert "| Fast R-CNN | 1 | 80.0 | n = 1 | 0/1 |" in one
    # the speed-up of each Fast R-CNN row over R-CNN's, from the seeds' means
    rows = [
        {"name": name, "seeds": [{"test_images_per_s": v} for v in values]}
        for name, values in [
            ("rcnn", (10, 30)),
            ("fast_rcnn", (300,)),
            ("fast_rcnn_pyramid", (50,)),
        ]
    ]
    assert experiment_lib.ratio(rows, "test_images_per_s") == 15.0
    assert experiment_lib.ratio(rows, "test_images_per_s", "fast_rcnn_pyramid") == 2.5
    assert experiment_lib.ratio(rows[1:], "test_images_per_s") is None


def test_fashion_mnist_detectors_start_from_the_classifier_of_their_seed(tmp_path):
    from detection import train

    experiment = experiment_lib.get_experiment("fashion_mnist", runs=tmp_path)
    classifier = runner.build_config(experiment_lib.backbone_run("fashion_mnist"), 0)
    assert classifier.dataset.name == "fashion_mnist" and classifier.seed == 0
    for run in experiment.runs:
        for seed in (0, 2):
            config = runner.build_config(run, seed)
            assert train.backbone_workdir(config) == str(tmp_path / "pooled_max" / f"seed_{seed}")
            assert (config.model.norm, config.detection.batchnorm) == ("batch", "frozen")
            # the model sections agree, as with_pretrained_backbone requires
            assert config.model.to_dict() == classifier.model.to_dict()
    small = experiment_lib.get_experiment("small", runs=tmp_path)
    assert all("detection.backbone_workdir" not in run.overrides for run in small.runs)
    assert experiment_lib.train_backbones("small", (0,), tmp_path) == []


def test_the_classification_runner_refuses_detection_runs(tmp_path):
    experiment = experiments.get("detection:small")
    with pytest.raises(UserError, match="python -m experiments.detection run"):
        runner.run_missing(experiment, tmp_path)


def test_report_without_runs_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no finished run of detection:small"):
        experiment_lib.main(["prog", "report", "detection:small", f"--output={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown flag --outptu"):
        experiment_lib.main(["prog", "report", "detection:small", f"--outptu={tmp_path}"])


@pytest.mark.slow
def test_small_variant_runs_and_reports_end_to_end(tmp_path):
    tiny = {
        "detection.train_scenes": 24,
        "detection.test_scenes": 8,
        "detection.test_proposals": 100,
        "detection.proposal_cache": str(tmp_path / "proposals"),
        "training.num_steps": 20,
        "training.eval_every_steps": 20,
        "training.checkpoint_every_steps": 10,
        "training.log_every_steps": 10,
        "training.progress": "none",
        "schedule.warmup_steps": 2,
    }
    experiment = experiments.get("detection:small")
    runs = tuple(
        dataclasses.replace(run, overrides={**run.overrides, **tiny}) for run in experiment.runs
    )
    experiment = dataclasses.replace(experiment, runs=runs)
    output = tmp_path / "out"
    touched = experiment_lib.run_missing(experiment, output)
    assert len(touched) == 2
    table = experiment_lib.write_report(experiment, output, "detection:small")
    results = {
        row: json.loads((runner.run_dir(output, run, 0) / "results.json").read_text())
        for row, run in zip(("rcnn", "fast_rcnn"), runs, strict=True)
    }
    assert [r["method"] for r in results.values()] == ["rcnn", "fast_rcnn"]
    ratio = results["fast_rcnn"]["test_images_per_s"] / results["rcnn"]["test_images_per_s"]
    assert f"**{ratio:.1f}x**" in table
    for label, result in zip(("R-CNN", "Fast R-CNN"), results.values(), strict=True):
        line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {100 * result['ap50']:,.1f} | n = 1 | 0/1 |" in line  # one evaluation
    summary = json.loads((output / "results.json").read_text())
    assert summary["fast_over_rcnn_test_speed"] == pytest.approx(ratio)
    assert (output / "ap.png").stat().st_size > 0
    text = (output / "report.md").read_text()
    assert "VOC 2007 mAP 58.5" in text
    assert "| IoU | 10 | 50 | 100 | 300 | 500 |" in text and "| 0.5 | " in text  # recall
    for figure in ("proposals", "detections_rcnn", "detections_fast_rcnn", "pr_curves"):
        assert (output / f"{figure}.png").stat().st_size > 5000 and f"]({figure}.png)" in text
    for result in results.values():  # what the figures are drawn from
        assert len(result["final"]["test"]["examples"]) == 6
        assert set(result["final"]["test"]["pr50"]) <= set(builtin.CLASS_NAMES)
    # the final checkpoint evaluated again (`python -m detection eval --checkpoint=latest`):
    # the report takes that evaluation's test measures and says so
    fast = runner.run_dir(output, runs[1], 0)
    subprocess.run(
        [sys.executable, "-m", "detection", "eval", f"--workdir={fast}", "--checkpoint=latest"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    again = json.loads((fast / "eval" / "latest" / "eval.json").read_text())
    assert again["step"] == 20 and again["proposals_per_image"] <= 100
    assert again["flops_per_image"] == results["fast_rcnn"]["test_flops_per_image"]
    # a test-time setting tried on held-out scenes the run was trained without: its own file
    subprocess.run(
        [sys.executable, "-m", "detection", "eval", f"--workdir={fast}", "--checkpoint=latest",
         "--split=validation", "--validation_scenes=3", "--nms_iou=0.6",
         "--proposal_mode=quality", "--test_proposals=120"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    tried = (fast / "eval" / "latest" / "eval_validation_nms0.6_quality_p120.json").read_text()
    tried = json.loads(tried)
    assert (tried["split"], tried["images"], tried["nms_iou"]) == ("validation", 3, 0.6)
    assert (tried["proposal_mode"], tried["test_proposals"]) == ("quality", 120)
    assert again["proposals_per_image"] < tried["proposals_per_image"] <= 120  # quality: more
    assert json.loads((fast / "eval" / "latest" / "eval.json").read_text()) == again
    table = experiment_lib.write_report(experiment, output, "detection:small")
    ratio = again["images_per_s"] / results["rcnn"]["test_images_per_s"]
    assert f"**{ratio:.1f}x**" in table and "Test measures of fast_rcnn 0 at " in table
    # finished runs are skipped; another config's finished run in the folder is refused
    assert experiment_lib.run_missing(experiment, output) == []
    changed = dataclasses.replace(
        runs[0], overrides={**runs[0].overrides, "training.num_steps": 30}
    )
    with pytest.raises(UserError, match="another config"):
        experiment_lib.run_missing(dataclasses.replace(experiment, runs=(changed,)), output)
