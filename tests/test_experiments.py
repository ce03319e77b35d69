"""The experiment runner: a tiny experiment end to end, its report, skipping, cluster scripts."""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
from experiments import Experiment, Run, report, runner, stats

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
        # the 95 % interval of the mean: mean -/+ t(0.975, 1) * std / sqrt(2), t = 12.7062
        half = 12.7062 * statistics.stdev(accs) / 2**0.5
        low, high = re.search(r"\| \[([-\d.]+), ([-\d.]+)\] \|", row).groups()
        assert float(low) == pytest.approx(100 * (statistics.fmean(accs) - half), abs=0.006)
        assert float(high) == pytest.approx(100 * (statistics.fmean(accs) + half), abs=0.006)
        flat = sum(
            stats.plateau(
                [
                    (r["step"], r["accuracy"])
                    for r in map(
                        json.loads,
                        (runner.run_dir(tmp_path, run, s) / "metrics.jsonl")
                        .read_text()
                        .splitlines(),
                    )
                    if r["split"] == "test"
                ]
            ).flat
            for s in experiment.seeds
        )
        assert f"| {flat}/2 |" in row
    for name in report.PLOTS:
        assert (tmp_path / name).stat().st_size > 1000, name
    text = (tmp_path / "report.md").read_text()
    assert "Does the runner work?" in text and table in text
    assert "**Ranking by test accuracy**" in table and "Pairs told apart" in table
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


def _fake_finished_run(workdir: Path, config, metrics_tail: str = "") -> None:
    """A finished run's files, as train.py leaves them (without training: the numbers are
    made up)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json(indent=2))
    results = {
        "eval_split": "test",
        "test_accuracy": 0.5,
        "params": 1000,
        "flops_per_image": 2e6,
        "train_seconds": 3.0,
        "images_per_s": 100.0,
    }
    (workdir / "results.json").write_text(json.dumps(results))
    records = [{"step": 4, "split": "test", "accuracy": 0.4}, {"step": 8, "split": "test"}]
    records[1]["accuracy"] = 0.5
    text = "".join(json.dumps(r) + "\n" for r in records)
    (workdir / "metrics.jsonl").write_text(text + metrics_tail)


def test_a_folder_of_another_config_is_neither_skipped_nor_reported(tmp_path, caplog):
    import logging

    from errors import UserError

    experiment = tiny_experiment()
    plain, pooled = experiment.runs
    # runs/plain/seed_0 holds pooled_avg's run (e.g. runs renamed between two versions)
    _fake_finished_run(runner.run_dir(tmp_path, plain, 0), runner.build_config(pooled, 0))
    with pytest.raises(UserError, match=r"plain/seed_0 holds a finished run of another config"):
        runner.run_missing(experiment, tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="no finished run"):
        report.write(experiment, tmp_path, "tiny")
    assert any("left out of the report" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "report.md").exists()


def test_report_drops_a_partial_metrics_line(tmp_path, caplog):
    import logging

    experiment = tiny_experiment()
    for run in experiment.runs:
        for seed in experiment.seeds:
            _fake_finished_run(
                runner.run_dir(tmp_path, run, seed),
                runner.build_config(run, seed),
                metrics_tail='{"step": 9, "spl',  # a run killed while writing
            )
    with caplog.at_level(logging.WARNING):
        table = report.write(experiment, tmp_path, "tiny")
    assert "| plain | 2 | 50.00 ± 0.00 |" in table
    assert sum("dropped 1 line(s)" in r.getMessage() for r in caplog.records) == 4


def test_report_without_a_finished_run_says_so(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "report", "families:small", f"--output={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "error: no finished run of families:small" in out.stderr
    assert "report written" not in out.stderr + out.stdout and "Traceback" not in out.stderr
