"""The README's training and evaluation commands, run as the README writes them.

Each command is read from README.md itself (so a changed flag there is tested), its workdir
moved under the test's folder, and the runs shrunk by overrides appended after the README's
own (absl takes a flag's last value): a small built-in dataset and a few steps.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHRINK = [
    "--config.dataset.builtin_train_size=256",
    "--config.dataset.builtin_test_size=64",
    "--config.training.batch_size=32",
    "--config.training.eval_batch_size=64",
    "--config.training.num_steps=4",
    "--config.training.eval_every_steps=4",
    "--config.training.checkpoint_every_steps=4",
    "--config.schedule.warmup_steps=1",
    "--config.training.progress=none",
]


def readme_commands() -> list[list[str]]:
    """Every command of README.md's bash blocks as argv (continuation lines joined, comments
    cut), `.venv/bin/python` as this interpreter."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append([sys.executable if a == ".venv/bin/python" else a for a in argv])
    return commands


def the_command(*words: str) -> list[str]:
    """The README's one command that contains all of `words` (as arguments)."""
    found = [argv for argv in readme_commands() if all(w in argv for w in words)]
    assert len(found) == 1, f"README.md: {len(found)} commands with {words}"
    return found[0]


def run(argv: list[str], workdirs: dict[str, Path]) -> subprocess.CompletedProcess:
    """Runs `argv` from the project root with each README workdir replaced as `workdirs` says."""
    argv = [re.sub(r"^--workdir=(.*)$", lambda m: f"--workdir={workdirs[m[1]]}", a) for a in argv]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (argv, done.stderr[-3000:])
    return done


def test_readme_commands_are_read():
    commands = readme_commands()
    assert ["make", "run"] in commands and ["make", "test"] in commands
    l2 = the_command("train.py", "--config=configs/builtin.py:pooled_l2")
    assert "--config.training.num_steps=1000" in l2  # the continuation line joined


@pytest.mark.slow
def test_training_one_model_and_evaluating_it(tmp_path):
    """README "Training one model" and "Evaluating": both train.py commands, the summary, then
    eval.py on the ResNet-20 run (the best checkpoint; the opt-in measures, --update)."""
    workdirs = {"runs/r20": tmp_path / "r20", "runs/l2": tmp_path / "l2"}
    run([*the_command("train.py", "--config=configs/builtin.py:resnet20"), *SHRINK], workdirs)
    run([*the_command("train.py", "--config=configs/builtin.py:pooled_l2"), *SHRINK], workdirs)
    for name in ("r20", "l2"):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["steps"] == 4
    config = json.loads((tmp_path / "l2" / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == 0.02  # the README's own override
    summary = run(the_command("-m", "models", "--config=configs/cifar10.py:allcnn_c"), {})
    assert "conv9" in summary.stdout and "trained params: 1,369,738" in summary.stdout

    run(the_command("eval.py", "--checkpoint=best"), workdirs)
    measures = json.loads((tmp_path / "r20" / "eval" / "best" / "eval.json").read_text())
    assert "accuracy" in measures and "probes" not in measures
    run(the_command("eval.py", "--measures=probes,top_patches", "--update"), workdirs)
    updated = json.loads((tmp_path / "r20" / "eval" / "latest" / "eval.json").read_text())
    assert "probes" in updated and "top_patches" in updated


def test_archiving_runs_rebuilding_the_report_and_resuming_from_the_records(tmp_path):
    """README "Committed reports": the archive, report-from-records and copy-back commands as
    written, their folders moved under the test's folder, over made-up finished runs."""
    from experiments import get, runner
    from tests.test_experiments import _fake_finished_run

    folders = {
        "runs/fashion_mnist": tmp_path / "runs",
        "experiments/results/runs_fashion_mnist": tmp_path / "records",
        "runs/weight_sharing_report": tmp_path / "report",
    }

    def moved(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            flag, eq, value = arg.rpartition("=")
            tail = next((t for t in ("/.", "/") if value.endswith(t)), "")
            folder = folders.get(value.removesuffix(tail) if tail else value)
            out.append(f"{flag}{eq}{folder}{tail}" if folder else arg)
        return out

    experiment = get("weight_sharing:fashion_mnist")
    for run_ in experiment.runs:
        for seed in experiment.seeds:
            workdir = runner.run_dir(folders["runs/fashion_mnist"], run_, seed)
            _fake_finished_run(workdir, runner.build_config(run_, seed), accuracy=0.9)
            (workdir / runner.EVALUATED).parent.mkdir(parents=True)
            (workdir / runner.EVALUATED).write_text("{}")
            (workdir / "checkpoints").mkdir()
    archive = the_command("archive", "weight_sharing:fashion_mnist")
    assert "archived 9 runs" in run(moved(archive), {}).stdout
    report_argv = the_command("report", "--runs=experiments/results/runs_fashion_mnist")
    table = run(moved(report_argv), {}).stdout
    assert "| plain_local | 3 | 90.00 ± 0.00 |" in table
    assert (folders["runs/weight_sharing_report"] / "report.md").exists()
    # copied back into an empty runs folder, the records count as done
    folders["runs/fashion_mnist"] = tmp_path / "fresh_runs"
    folders["runs/fashion_mnist"].mkdir()
    copy_back = the_command("cp", "-rn")
    run(moved(copy_back), {})
    assert not list(folders["runs/fashion_mnist"].rglob("checkpoints"))
    assert runner.pending_jobs(experiment, folders["runs/fashion_mnist"]) == []


@pytest.mark.slow
def test_training_a_detector_and_evaluating_it(tmp_path):
    """README "Detection": the Fast R-CNN and R-CNN train commands on the built-in scenes and
    both eval commands, as written, shrunk to a few scenes and steps."""
    workdirs = {"runs/det": tmp_path / "det", "runs/det_rcnn": tmp_path / "det_rcnn"}
    shrink = [
        "--config.detection.train_scenes=6",
        "--config.detection.test_scenes=3",
        "--config.detection.test_proposals=40",
        f"--config.detection.proposal_cache={tmp_path / 'proposals'}",
        *(f for f in SHRINK if "dataset" not in f and "batch_size" not in f),
    ]
    run([*the_command("detection", "train", "--workdir=runs/det"), *shrink], workdirs)
    run([*the_command("detection", "train", "--workdir=runs/det_rcnn"), *shrink], workdirs)
    for name, mode in (("det", "fast_rcnn"), ("det_rcnn", "rcnn")):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert (results["method"], results["steps"]) == (mode, 4)
    run(the_command("detection", "eval", "--checkpoint=best"), workdirs)
    best = json.loads((tmp_path / "det" / "eval" / "best" / "eval.json").read_text())
    assert best["split"] == "test" and best["images"] == 3 and 0 <= best["ap50"] <= 1
    held_out = the_command("detection", "eval", "--split=validation")
    run([*held_out, "--validation_scenes=2"], workdirs)  # the README's 200, fewer
    tried = tmp_path / "det" / "eval" / "best" / "eval_validation_nms0.4.json"  # eval's default
    tried = json.loads(tried.read_text())
    assert (tried["split"], tried["images"], tried["nms_iou"]) == ("validation", 2, 0.4)
