"""The experiment runner: a tiny experiment end to end, its report, skipping, cluster scripts."""

import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
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
    touched = runner.run_missing(experiment, tmp_path, only=("pooled_avg",))
    assert {p.parent.name for p in touched} == {"pooled_avg"} and len(set(touched)) == 2
    touched = runner.run_missing(experiment, tmp_path)  # the rest
    assert {p.parent.name for p in touched} == {"plain"} and len(set(touched)) == 2
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
    commit = json.loads((touched[0] / "environment.json").read_text())["git_commit"]
    assert f"commit {commit};" in text  # all four runs trained at one commit
    assert "**Ranking by test accuracy**" in table and "Pairs told apart" in table
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [s["name"] for s in summary] == ["plain", "pooled_avg"]
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("results.json") if "seed_" in str(p)}
    assert runner.run_missing(experiment, tmp_path) == []  # everything finished: skipped
    assert before == {p: p.stat().st_mtime for p in before}


@pytest.mark.slow
def test_archived_records_rebuild_the_report_and_count_as_done(tmp_path):
    from errors import UserError

    experiment = dataclasses.replace(tiny_experiment(), seeds=(0,))
    plain = experiment.runs[0]
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    runner.run_missing(experiment, runs, only=("plain",))  # trained for real; pooled_avg not
    assert runner.archive(experiment, runs, archive) == (["plain seed 0"], ["pooled_avg seed 0"])
    source, record = runner.run_dir(runs, plain, 0), runner.run_dir(archive, plain, 0)
    assert (source / "checkpoints").is_dir()  # what stays behind
    files = sorted(str(p.relative_to(record)) for p in record.rglob("*") if p.is_file())
    assert files == sorted(runner.RECORD_FILES)
    assert all((record / f).read_bytes() == (source / f).read_bytes() for f in files)
    # the record alone rebuilds the report, and a runner given it has only the rest to do
    from_runs = report.write(experiment, tmp_path / "report_runs", "tiny", runs=runs)
    from_archive = report.write(experiment, tmp_path / "report_archive", "tiny", runs=archive)
    assert from_archive == from_runs and "| plain | 1 |" in from_archive
    assert [job.label for job in runner.pending_jobs(experiment, archive)] == ["pooled_avg seed 0"]
    # archiving again adds nothing; a record that differs from the run's is refused, not replaced
    assert runner.archive(experiment, runs, archive) == ([], ["pooled_avg seed 0"])
    metrics = source / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + metrics.read_text().splitlines(True)[-1])
    with pytest.raises(
        UserError,
        match=r"plain/seed_0 already holds a record of plain seed 0 "
        r"that differs from .*\(metrics.jsonl\); remove that folder",
    ):
        runner.archive(experiment, runs, archive)
    assert files == sorted(str(p.relative_to(record)) for p in record.rglob("*") if p.is_file())


def test_the_committed_records_reproduce_the_committed_reports_numbers():
    """experiments/results/runs_fashion_mnist holds the records of the runs behind the
    Fashion-MNIST reports trained since it exists: each such report's numbers (results.json)
    are what `report` computes from those records alone."""
    results = ROOT / "experiments" / "results"
    records = results / "runs_fashion_mnist"
    checked = []
    for name in experiments.NAMES:
        committed = results / f"{name}_fashion_mnist" / "results.json"
        if name == "detection" or not committed.exists():
            continue
        experiment = experiments.get(f"{name}:fashion_mnist")
        rows = report.collect(experiment, records)
        recorded = {row["name"]: len(row["seeds"]) for row in rows}
        summary = json.loads(committed.read_text())
        if any(recorded.get(row["name"]) != row["seeds"] for row in summary):
            continue  # a report from runs before the records (their runs are gone)
        computed = [
            dict(report.summarize(row), config=row["config"], overrides=row["overrides"])
            for row in rows
        ]
        assert json.loads(json.dumps(computed)) == summary, name  # as results.json holds it
        checked.append(name)
    assert {"weight_sharing", "families", "resnet_depth", "recipe"} <= set(checked)


def test_jobs_split_the_cpu_cores_among_runs_side_by_side():
    none = ""  # no accelerator visible
    assert runner.job_cores(None, 12, cores=[0, 1], accelerator=none) == [(0,), (1,)]
    assert runner.job_cores(None, 1, cores=[0, 1], accelerator=none) == [(0, 1)]  # one left
    assert runner.job_cores(None, 0, cores=[0, 1], accelerator=none) == [(0, 1)]
    assert runner.job_cores(1, 12, cores=[0, 1], accelerator=none) == [(0, 1)]
    eight = runner.job_cores(3, 12, cores=range(8), accelerator=none)
    assert eight == [(0, 1, 2), (3, 4, 5), (6, 7)]  # the first groups get the cores left over
    assert runner.job_cores(None, 12, cores=[0, 1], accelerator="/dev/nvidia0") == [(0, 1)]
    with pytest.raises(experiments.UserError, match=r"^--jobs=3: more runs at once than the 2"):
        runner.job_cores(3, 12, cores=[0, 1], accelerator=none)
    with pytest.raises(experiments.UserError, match=r"share one accelerator \(/dev/nvidia0\)"):
        runner.job_cores(2, 12, cores=[0, 1], accelerator="/dev/nvidia0")
    assert runner.parse_jobs("auto") is None and runner.parse_jobs(" 2 ") == 2
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(experiments.UserError, match=f"^--jobs={bad}: use auto or"):
            runner.parse_jobs(bad)


def test_runs_to_do_name_their_programs_and_detection_is_not_evaluated_again(tmp_path):
    jobs = runner.pending_jobs(tiny_experiment(), tmp_path, only=("pooled_avg",))
    assert [job.label for job in jobs] == ["pooled_avg seed 0", "pooled_avg seed 1"]
    train, evaluate = jobs[0].steps
    assert train[:2] == ["python", "train.py"] and evaluate[:2] == ["python", "eval.py"]
    assert f"--workdir={tmp_path.resolve() / 'pooled_avg' / 'seed_0'}" in train
    assert jobs[0].log == tmp_path.resolve() / "logs" / "pooled_avg" / "seed_0.log"
    detection = Experiment(
        "det", "?", (Run("rcnn", "configs/detection.py:rcnn"),), seeds=(0,), task="detection"
    )
    (job,) = runner.pending_jobs(detection, tmp_path)
    assert job.steps == [
        ["python", "-m", "detection", "train", "--config=configs/detection.py:rcnn"]
        + [f"--workdir={tmp_path.resolve() / 'rcnn' / 'seed_0'}", "--config.seed=0"]
    ]  # its training evaluates: no second program


def _two_cores() -> list[tuple[int, ...]]:
    """Two groups of one core each: the machine's first and last (the same one on one core)."""
    cores = sorted(os.sched_getaffinity(0))
    return [(cores[0],), (cores[-1],)]


@pytest.mark.slow
def test_runs_side_by_side_train_evaluate_and_are_skipped_after(tmp_path):
    experiment = tiny_experiment()
    jobs = runner.pending_jobs(experiment, tmp_path)
    labels = ["plain seed 0", "plain seed 1", "pooled_avg seed 0", "pooled_avg seed 1"]
    assert [job.label for job in jobs] == labels
    assert [len(job.steps) for job in jobs] == [2, 2, 2, 2]  # train.py, then eval.py
    done = runner.run_parallel(jobs, _two_cores())
    assert sorted(done) == sorted(job.workdir for job in jobs)
    for job in jobs:
        assert (job.workdir / runner.TRAINED).is_file()
        assert (job.workdir / runner.EVALUATED).is_file()
        environment = json.loads((job.workdir / "environment.json").read_text())
        assert environment["cpu_cores_used"] == 1
        log = job.log.read_text()
        assert log.count("$ ") == 2 and "train.py" in log and "eval.py" in log
    assert runner.pending_jobs(experiment, tmp_path) == []  # everything finished: skipped
    report.write(experiment, tmp_path, "tiny")
    if os.cpu_count() > 1:  # each run had one of the machine's cores: the report says so
        text = (tmp_path / "report.md").read_text()
        assert f"{os.cpu_count()} CPU cores, each run on 1)" in text


def test_the_report_says_how_many_cores_each_run_had():
    assert report.cores_phrase([{"cpu_count": 2}, {"cpu_count": 2}]) == "2 CPU cores"
    both = [{"cpu_count": 2, "cpu_cores_used": 2}]
    assert report.cores_phrase(both) == "2 CPU cores"
    side = [{"cpu_count": 8, "cpu_cores_used": 1}, {"cpu_count": 8, "cpu_cores_used": 2}]
    assert report.cores_phrase(side) == "8 CPU cores, each run on 1-2"
    assert report.cores_phrase([]) == "? CPU cores"


@pytest.mark.slow
def test_a_run_that_fails_beside_others_stops_them_and_is_named(tmp_path):
    long = {**TINY, "training.num_steps": 100000, "training.checkpoint_every_steps": 100000}
    runs = (
        Run("long", "configs/builtin.py:plain", long),
        Run("bad", "configs/builtin.py:plain", {**TINY, "model.stride": -1}),
    )
    experiment = Experiment("tiny", "Does a failure stop the rest?", runs, seeds=(0,))
    jobs = runner.pending_jobs(experiment, tmp_path)
    start = time.monotonic()
    with pytest.raises(experiments.UserError) as failure:
        runner.run_parallel(jobs, _two_cores())
    message = str(failure.value)
    assert message.startswith("bad seed 0 failed (train.py exited with status 1): error: ")
    assert "model.stride" in message and str(jobs[1].log) in message
    assert "\n" not in message and "rerun the same command to resume" in message
    assert time.monotonic() - start < 120  # the long run was stopped, not waited for
    assert jobs[0].proc.poll() is not None  # and has ended


def test_every_experiment_and_variant_builds_valid_configs():
    from configs import schema

    for name in experiments.NAMES:
        for variant in experiments.variants(name):
            experiment = experiments.get(f"{name}:{variant}")
            assert experiment.runs and experiment.seeds
            for run in experiment.runs:
                schema.validate(runner.build_config(run, seed=0))


def test_weight_sharings_dense_network_has_the_plain_convnets_parameter_count():
    """The comparison holds the parameter budget: on every variant the dense network has
    within 2 % of the plain ConvNet's parameters (the locally connected net many times more)."""
    import data
    import models

    for variant in experiments.variants("weight_sharing"):
        params = {}
        for run in experiments.get(f"weight_sharing:{variant}").runs:
            config = runner.build_config(run, 0)
            info = data.dataset_info(config.dataset)
            specs = models.architecture(config.model, info.image_shape, info.num_classes)
            params[run.name] = sum(spec.params for spec in specs)
        assert abs(params["mlp"] / params["plain"] - 1) < 0.02, (variant, params)
        assert params["plain_local"] > 30 * params["plain"], (variant, params)


def test_variant_overrides_apply_to_their_variant_only():
    def allcnn(variant):
        experiment = experiments.get(f"families:{variant}")
        return next(r for r in experiment.runs if r.name == "allcnn_c").overrides

    for variant in ("small", "fashion_mnist"):  # the CPU versions of All-CNN-C
        assert allcnn(variant)["model.widths"] == (32, 64)
        assert allcnn(variant)["model.norm"] == "batch" and allcnn(variant)["model.dropout"] == 0
    assert "model.widths" not in allcnn("cifar10")  # the paper's model
    small_resnet = next(r for r in experiments.get("families:small").runs if r.name == "resnet20")
    assert "optimizer.name" not in small_resnet.overrides  # the variant override is not there
    fmnist_resnet = next(
        r for r in experiments.get("families:fashion_mnist").runs if r.name == "resnet20"
    )
    assert fmnist_resnet.overrides["optimizer.name"] == "sgd"  # a ResNet's own recipe there
    fmnist = experiments.get("families:fashion_mnist")
    assert len(fmnist.seeds) >= 3
    steps = {r.overrides["training.num_steps"] for r in fmnist.runs}
    assert steps == {15 * 430}


def test_only_names_unknown_runs_in_one_line(tmp_path):
    with pytest.raises(experiments.UserError, match="--only names no run of tiny: nope"):
        runner.run_missing(tiny_experiment(), tmp_path, only=("nope",))
    assert not any(tmp_path.iterdir())  # nothing trained


def test_the_report_names_the_seeds_flag_only_for_other_seeds():
    families = experiments.get("families:small")
    assert report.seeds_flag(families, "families:small") == ""
    other = experiments.with_seeds(families, ["3", "4", "5"])
    assert report.seeds_flag(other, "families:small") == " --seeds=3,4,5"
    assert report.seeds_flag(tiny_experiment(), "tiny") == ""  # no file to compare with


def test_the_report_names_every_commit_its_runs_came_from():
    one = [{"git_commit": "abc"}, {"git_commit": "abc"}]
    assert report.commits_line(one) == "commit abc"
    mixed = [{"git_commit": "abc"}, {"git_commit": "def+dirty"}, {"git_commit": "abc"}]
    assert report.commits_line(mixed) == "commits abc (2 runs), def+dirty (1 runs)"
    assert report.commits_line([]) == "commit ?"


def test_seeds_must_be_distinct_non_negative_integers():
    tiny = tiny_experiment()
    assert experiments.with_seeds(tiny, ["3", "4", "5"]).seeds == (3, 4, 5)
    for bad in (["x"], ["-1"], ["2", "2"], []):
        with pytest.raises(experiments.UserError, match="--seeds"):
            experiments.with_seeds(tiny, bad)


def test_unknown_experiment_or_variant():
    with pytest.raises(experiments.UserError, match="unknown experiment 'nope'"):
        experiments.get("nope")
    with pytest.raises(experiments.UserError, match="unknown experiment variant 'huge'"):
        experiments.get("families:huge")
    # an experiment defined for some variants only (recipe: Fashion-MNIST's recipe)
    with pytest.raises(experiments.UserError, match=r"\(recipe:small\); recipe has fashion_mnist"):
        experiments.get("recipe")


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
    other = _experiments_cli(
        "commands", "weight_sharing:cifar10", f"--output={tmp_path}", "--seeds=3,4"
    ).splitlines()
    assert len(other) == len(experiment.runs) * 2
    assert [line.count("--config.seed=3") for line in other[:2]] == [1, 0]
    assert "--config.seed=4" in other[1] and "/seed_3" in other[0] and "/seed_4" in other[1]
    _experiments_cli("slurm", "weight_sharing:cifar10", f"--output={tmp_path}")
    script = (tmp_path / "slurm.sh").read_text()
    assert f"#SBATCH --array=0-{len(lines) - 1}" in script
    assert script.count("python train.py") == len(lines)
    check = subprocess.run(
        ["bash", "-n", str(tmp_path / "slurm.sh")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_detection_commands_train_the_backbones_first_with_detection_programs(tmp_path):
    runs = tmp_path / "runs"
    lines = _experiments_cli(
        "commands", "detection:fashion_mnist", f"--output={tmp_path}", f"--runs={runs}"
    ).splitlines()
    experiment = experiments.get("detection:fashion_mnist")
    seeds = experiment.seeds
    # families' pooled_max classifier of each seed, then each detector row (R-CNN, Fast
    # R-CNN and its variants) per seed
    assert len(experiment.runs) == 7 and experiment.runs[0].name == "rcnn"
    assert len(lines) == (1 + len(experiment.runs)) * len(seeds)
    for line, seed in zip(lines, seeds, strict=False):
        assert line.startswith("python train.py --config=configs/fashion_mnist.py:pooled_max")
        assert f"--workdir={runs}/pooled_max/seed_{seed} " in line
    detectors = lines[len(seeds) :]
    assert all(line.startswith("python -m detection train --config=configs/detection.py:")
               for line in detectors)  # fmt: skip
    backbone = f"--config.detection.backbone_workdir={runs}/pooled_max/seed_{{seed}}"
    assert backbone in detectors[0]
    assert (
        f"python -m detection eval --workdir={runs}/rcnn/seed_0 --checkpoint=latest"
        in (detectors[0])
    )
    out = _experiments_cli("slurm", "detection:small", f"--output={tmp_path}")
    script = (tmp_path / "slurm.sh").read_text()
    assert script.count("python -m detection train") == 2 and "python train.py" not in script
    assert "python -m experiments.detection report detection:small" in script
    assert "start from" not in out  # small: no backbone to train first
    out = _experiments_cli("slurm", "detection:fashion_mnist", f"--output={tmp_path}")
    assert "train those first" in out and "families:fashion_mnist --only=pooled_max" in out


def _fake_finished_run(
    workdir: Path, config, metrics_tail: str = "", accuracy: float = 0.5
) -> None:
    """A finished run's files, as train.py leaves them (without training: the numbers are
    made up)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json(indent=2))
    results = {
        "eval_split": "test",
        "test_accuracy": accuracy,
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


def test_archive_on_the_command_line_names_what_it_copied_and_what_it_left(tmp_path):
    runs, dest = tmp_path / "runs", tmp_path / "records"
    plain = experiments.get("weight_sharing:small").runs[0]
    workdir = runner.run_dir(runs, plain, 1)
    _fake_finished_run(workdir, runner.build_config(plain, 1))
    (workdir / runner.EVALUATED).parent.mkdir(parents=True)
    (workdir / runner.EVALUATED).write_text("{}")
    out = _experiments_cli("archive", "weight_sharing:small", f"--runs={runs}", f"--output={dest}")
    assert f"archived 1 runs into {dest}: plain seed 1\n" in out
    assert "not finished, not archived: plain seed 0, plain seed 2, plain_local seed 0" in out
    assert (dest / "plain" / "seed_1" / runner.EVALUATED).read_text() == "{}"
    missing = subprocess.run(
        [sys.executable, "-m", "experiments", "archive", "weight_sharing:small", f"--runs={runs}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: archive needs --runs (the runs' folder) and --output (where their records go, "
        "e.g. experiments/results/runs_fashion_mnist)"
    )


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


def test_experiments_sharing_a_runs_folder_train_a_row_of_one_name_once():
    """Rows of the same name in two experiments of one variant (families' resnet20 and
    resnet_depth's, ...) must be the same run, or a shared --runs folder would refuse them."""
    for variant in experiments.VARIANTS:
        seen = {}
        for name in experiments.NAMES:
            if name == "detection" or variant not in experiments.variants(name):
                continue
            for run in experiments.get(f"{name}:{variant}").runs:
                config = runner.build_config(run, seed=0).to_dict()
                if run.name in seen:
                    assert config == seen[run.name][1], (variant, run.name, seen[run.name][0])
                else:
                    seen[run.name] = (name, config)
    shared = experiments.get("families:fashion_mnist").runs
    assert {r.name for r in shared} <= {
        r.name
        for n in ("pooling_vs_strided", "resnet_depth", "weight_sharing")
        for r in experiments.get(f"{n}:fashion_mnist").runs
    }


def test_a_report_from_a_shared_runs_folder(tmp_path):
    experiment = tiny_experiment()
    runs, output = tmp_path / "runs", tmp_path / "report"
    for run in experiment.runs:
        for seed in experiment.seeds:
            _fake_finished_run(runner.run_dir(runs, run, seed), runner.build_config(run, seed))
    report.write(experiment, output, "tiny", runs=runs)
    text = (output / "report.md").read_text()
    assert f"--output={output} --runs={runs}`" in text
    assert all((output / name).exists() for name in report.PLOTS)
    assert not (runs / "report.md").exists()
    report.write(experiment, runs, "tiny")  # the default: the runs' own folder
    assert f"--output={runs}`" in (runs / "report.md").read_text()


def _rows(accuracies: dict[str, list[float]]) -> list[dict]:
    return [
        {"name": name, "seeds": [{"results": {"test_accuracy": a}} for a in values]}
        for name, values in accuracies.items()
    ]


def test_the_report_sets_its_numbers_beside_the_published_ones():
    from experiments import Ordering, Reference

    experiment = tiny_experiment()
    rows = _rows({"plain": [0.90, 0.91, 0.92], "pooled_avg": [0.80, 0.81, 0.82]})
    # disjoint 95 % intervals (91 +- 2.5, 81 +- 2.5): plain is above pooled_avg
    published = {"plain": Reference(0.935, "Paper A, Table 1")}
    orderings = (
        Ordering("plain", "pooled_avg", "A 6 %, B 7 %"),
        Ordering("pooled_avg", "plain", "B 5 %, A 7 %"),
        Ordering("plain", "pooled_avg", "A 6 %, B 6.1 %", tied=True),
    )
    with_refs = dataclasses.replace(experiment, published=published, orderings=orderings)
    text = report.published_section(with_refs, rows)
    assert "| plain | 91.00 | 93.50 | -2.50 | Paper A, Table 1 |" in text
    assert "| plain > pooled_avg | A 6 %, B 7 % | plain 91.00 > pooled_avg 81.00 | yes |" in text
    assert "| pooled_avg > plain | B 5 %, A 7 % | pooled_avg 81.00 < plain 91.00 | no |" in text
    assert "| plain ≈ pooled_avg | A 6 %, B 6.1 % | plain 91.00 > pooled_avg 81.00 | no |" in text
    # overlapping intervals: tied, which does not settle a published strict ordering
    tied = _rows({"plain": [0.90, 0.92, 0.94], "pooled_avg": [0.89, 0.91, 0.93]})
    text = report.published_section(with_refs, tied)
    assert "| plain 92.00 tied with pooled_avg 91.00 | not resolved: tied here |" in text
    assert "| plain 92.00 tied with pooled_avg 91.00 | yes |" in text  # the tied=True one
    # a row not run yet, and an experiment with no published results
    text = report.published_section(with_refs, _rows({"pooled_avg": [0.8, 0.81]}))
    assert "| plain | not run yet | 93.50 | – |" in text and "| not run yet | – |" in text
    assert report.published_section(experiment, rows) == ""


def test_a_variant_can_narrow_its_rows():
    assert [r.name for r in experiments.get("resnet_depth:fashion_mnist").runs] == [
        "resnet20",
        "resnet32",
    ]
    assert len(experiments.get("resnet_depth:cifar10").runs) == 5
    with pytest.raises(ValueError, match="unknown rows"):
        experiments.define("x", "?", {"a": "plain"}, budgets={}, seeds={}, rows={"small": ("b",)})(
            "small"
        )


def test_report_without_a_finished_run_says_so(tmp_path):
    runs = tmp_path / "runs"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments",
            "report",
            "families:small",
            f"--output={tmp_path}",
            f"--runs={runs}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert f"error: no finished run of families:small in {runs} yet" in out.stderr
    assert f"--output={tmp_path} --runs={runs}` first" in out.stderr
    assert "report written" not in out.stderr + out.stdout and "Traceback" not in out.stderr


# --- the SLURM script: install, preemption, requeue, skipping what is done --------------------

_FAKE_PYTHON = """#!/bin/bash
# train.py / eval.py stand-ins: record the call, write what the real ones leave behind.
echo "$*" >> "$LOG"
for a in "$@"; do case $a in --workdir=*) wd=${a#--workdir=};; esac; done
case $1 in
  train.py)
    mkdir -p "$wd"
    if [[ -n ${FAKE_BLOCK:-} ]]; then  # a long run: SIGTERM saves and exits 143
      trap 'kill $sleeper; echo "saved a checkpoint" >> "$LOG"; exit 143' TERM
      sleep 60 > /dev/null 2>&1 &
      sleeper=$!
      echo $$ > "$wd/pid"
      wait $sleeper
      exit 1
    fi
    echo '{}' > "$wd/results.json";;
  eval.py) mkdir -p "$wd/eval/latest"; echo '{}' > "$wd/eval/latest/eval.json";;
esac
"""


def _slurm_machine(tmp_path: Path) -> tuple[Path, dict]:
    """A project folder with a fake venv, and PATH with fake python, srun and scontrol."""
    bin_dir, project = tmp_path / "bin", tmp_path / "project"
    bin_dir.mkdir()
    project.mkdir()
    fakes = {
        "python": _FAKE_PYTHON,
        "srun": '#!/bin/bash\necho "srun $*" >> "$LOG"\nexec "$@"\n',
        "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$LOG"\n',
        "venv-python": '#!/bin/bash\necho "venv-python $*" >> "$LOG"\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (project / "pyproject.toml").write_text("")
    venv = project / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    (venv / "python").symlink_to(bin_dir / "venv-python")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        LOG=str(tmp_path / "log"),
        SLURM_ARRAY_TASK_ID="1",
        SLURM_ARRAY_JOB_ID="77",
        CONVNETS_VENV="venv",
    )
    return project, env


def _log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().splitlines() if path.exists() else []


def test_slurm_script_installs_once_then_trains_and_evaluates(tmp_path):
    project, env = _slurm_machine(tmp_path)
    experiment = tiny_experiment()
    script = project / "slurm.sh"
    script.write_text(runner.slurm_script(experiment, tmp_path / "out", "tiny"))
    for line in ("--signal=TERM@120", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script.read_text()
    env["CONVNETS_EXTRA"] = "cuda12"
    done = subprocess.run(["bash", str(script)], cwd=project, env=env, timeout=60)
    assert done.returncode == 0
    # task 1: plain, seed 1
    workdir = runner.run_dir(tmp_path / "out", experiment.runs[0], 1)
    log = _log(tmp_path)
    assert log[0] == "venv-python -m pip install --quiet -e .[cuda12]"
    assert log[1].startswith("srun bash -c forward_term python train.py")
    assert any(line.startswith(f"train.py --config=configs/builtin.py:plain --workdir={workdir}")
               for line in log)  # fmt: skip
    assert log[-1] == f"eval.py --workdir={workdir} --max_shift=2"
    assert (workdir / "eval" / "latest" / "eval.json").exists()
    # again: installed (the stamp is newer than pyproject.toml) and finished: nothing runs
    (tmp_path / "log").unlink()
    done = subprocess.run(
        ["bash", str(script)], cwd=project, env=env, timeout=60, capture_output=True, text=True
    )
    assert done.returncode == 0 and "nothing to do" in done.stdout
    assert _log(tmp_path) == []
    # trained but not evaluated: only the evaluation runs
    (workdir / "eval" / "latest" / "eval.json").unlink()
    subprocess.run(["bash", str(script)], cwd=project, env=env, timeout=60, check=True)
    assert [line.split()[0] for line in _log(tmp_path)] == ["srun", "eval.py"]


@pytest.mark.parametrize("who", ["run", "batch shell"])
def test_slurm_script_passes_sigterm_on_and_requeues_its_task(tmp_path, who):
    """SIGTERM to the run (--signal before the time limit) or to the batch shell (a
    preemption): train.py saves and exits 143, the script requeues its own array task."""
    project, env = _slurm_machine(tmp_path)
    experiment = tiny_experiment()
    script = project / "slurm.sh"
    script.write_text(runner.slurm_script(experiment, tmp_path / "out", "tiny"))
    (project / "venv" / ".installed-slurm-none").touch()
    env.update(CONVNETS_EXTRA="none", FAKE_BLOCK="1")
    workdir = runner.run_dir(tmp_path / "out", experiment.runs[0], 1)
    proc = subprocess.Popen(
        ["bash", str(script)], cwd=project, env=env, stdout=subprocess.PIPE, text=True
    )
    pid_file = workdir / "pid"
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)  # the shells have set their traps
    target = int(pid_file.read_text()) if who == "run" else proc.pid
    os.kill(target, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    log = _log(tmp_path)
    assert "saved a checkpoint" in log
    assert log[-1] == "scontrol requeue 77_1"
    assert not any(line.startswith("eval.py") for line in log)  # stopped before evaluating
    assert "requeueing 77_1" in out
