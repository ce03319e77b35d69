"""The experiment runner: a tiny experiment end to end, its report, skipping, cluster scripts."""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
from experiments import Experiment, Run, report, runner

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "dataset.builtin_train_size": 512,
    "dataset.builtin_test_size": 128,
    "training.batch_size": 32,
    "training.eval_batch_size": 64,
    "training.num_steps": 8,
    "training.eval_every_steps": 4,
    "training.log_every_steps": 4,
    "training.progress": "none",
    "schedule.warmup_steps": 1,
}


def tiny_experiment() -> Experiment:
    runs = (
        Run("plain", "configs/builtin.py:plain", TINY),
        Run("pooled_avg", "configs/builtin.py:pooled_avg", TINY),
    )
    return Experiment("tiny", "Does the runner work?", runs, seeds=(0, 1), max_shift=2)


@pytest.mark.slow
def test_tiny_experiment_end_to_end_and_rerun_skips(tmp_path):
    experiment = tiny_experiment()
    touched = runner.run_missing(experiment, tmp_path)
    assert len(set(touched)) == 4
    table = report.write(experiment, tmp_path, "tiny")
    rows = [line for line in table.splitlines() if line.startswith(("| plain", "| pooled"))]
    assert [r.split("|")[1].strip() for r in rows] == ["plain", "pooled_avg"]
    for row, run in zip(rows, experiment.runs, strict=True):
        accs = [
            json.loads((runner.run_dir(tmp_path, run, s) / "results.json").read_text())[
                "test_accuracy"
            ]
            for s in experiment.seeds
        ]
        mean, std = re.search(r"\| 2 \| ([\d.]+) ± ([\d.]+) \|", row).groups()
        assert float(mean) == pytest.approx(100 * statistics.fmean(accs), abs=0.006)
        assert float(std) == pytest.approx(100 * statistics.stdev(accs), abs=0.006)
    for name in report.PLOTS:
        assert (tmp_path / name).stat().st_size > 1000, name
    text = (tmp_path / "report.md").read_text()
    assert "Does the runner work?" in text and table in text
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [s["name"] for s in summary] == ["plain", "pooled_avg"]
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("results.json") if "seed_" in str(p)}
    assert runner.run_missing(experiment, tmp_path) == []  # everything finished: skipped
    assert before == {p: p.stat().st_mtime for p in before}


def test_every_experiment_and_variant_builds_valid_configs():
    from configs import schema

    for name in experiments.NAMES:
        for variant in experiments.VARIANTS:
            experiment = experiments.get(f"{name}:{variant}")
            assert experiment.runs and experiment.seeds
            for run in experiment.runs:
                schema.validate(runner.build_config(run, seed=0))


def test_unknown_experiment_or_variant():
    with pytest.raises(experiments.UserError, match="unknown experiment 'nope'"):
        experiments.get("nope")
    with pytest.raises(experiments.UserError, match="unknown experiment variant 'huge'"):
        experiments.get("families:huge")


def _experiments_cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "experiments", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_commands_and_slurm_script(tmp_path):
    lines = _experiments_cli("commands", "weight_sharing:cifar10", f"--output={tmp_path}")
    lines = lines.strip().splitlines()
    experiment = experiments.get("weight_sharing:cifar10")
    assert len(lines) == len(experiment.runs) * len(experiment.seeds)
    assert lines[0].startswith("python train.py --config=configs/cifar10.py:plain")
    assert "--config.seed=0" in lines[0] and "python eval.py --workdir=" in lines[0]
    _experiments_cli("slurm", "weight_sharing:cifar10", f"--output={tmp_path}")
    script = (tmp_path / "slurm.sh").read_text()
    assert f"#SBATCH --array=0-{len(lines) - 1}" in script
    assert script.count("python train.py") == len(lines)
    check = subprocess.run(
        ["bash", "-n", str(tmp_path / "slurm.sh")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
