"""The seed_claims experiment end to end on a tiny budget (the four families on 16x16 built-in
images, a few steps): trained, evaluated with the per-layer measures, and its claims report,
whose numbers come from the runs' eval.json."""

import dataclasses
import json

import pytest

from evaluation import probes
from experiments import Run, claims, report, runner, seed_claims

TINY = {
    "dataset.builtin_image_size": 16,
    "dataset.builtin_train_size": 512,
    "dataset.builtin_test_size": 128,
    "training.batch_size": 32,
    "training.eval_batch_size": 64,
    "training.num_steps": 6,
    "training.eval_every_steps": 6,
    "training.log_every_steps": 6,
    "training.progress": "none",
    "schedule.warmup_steps": 1,
}


def tiny_seed_claims():
    experiment = seed_claims.get_experiment("small")
    runs = tuple(Run(r.name, r.config, {**r.overrides, **TINY}) for r in experiment.runs)
    return dataclasses.replace(experiment, runs=runs, seeds=(0,), max_shift=2)


def _fake_weight_sharing(folder):
    folder.mkdir(parents=True)
    rows = [
        {
            "name": "plain (shared)",
            "params": 1000,
            "test_accuracy": [0.8],
            "shift_consistency": [0.6],
            "plateaued": [True],
        },
        {
            "name": "plain_local (not shared)",
            "params": 50000,
            "test_accuracy": [0.7, 0.72],
            "plateaued": [False, True],
        },
    ]
    rows[1]["shift_consistency"] = [0.5]
    (folder / "results.json").write_text(json.dumps(rows))


@pytest.mark.slow
def test_seed_claims_end_to_end_on_a_tiny_budget(tmp_path):
    experiment = tiny_seed_claims()
    assert [r.name for r in experiment.runs] == ["plain", "pooled_max", "allcnn_c", "resnet20"]
    output = tmp_path / "seed_claims_small"
    runner.run_missing(experiment, output)
    touched = claims.evaluate_missing(experiment, output)
    assert len(touched) == 4
    assert claims.evaluate_missing(experiment, output) == []  # everything measured
    report.write(experiment, output, "seed_claims:small")
    _fake_weight_sharing(tmp_path / "weight_sharing_small")
    text = claims.write(experiment, output, "seed_claims:small")
    assert (output / "claims.md").read_text() == text
    for heading in ("## 1. Translation invariance", "## 2. Hierarchical features"):
        assert heading in text
    assert "## 3. Parameter sharing" in text and "| plain_local (not shared) | 50,000 |" in text
    assert "50x the parameters" in text and "9.0 points higher than" in text
    assert "| 80.0% | 60.0% | 1/1 |" in text and "| 1/2 |" in text  # plateaued seeds
    assert "Not plateaued in every seed: plain_local (not shared);" in text
    for name in ("claims_invariance.png", "claims_probes.png", "report.md"):
        assert (output / name).stat().st_size > 1000, name
    numbers = json.loads((output / "claims.json").read_text())
    for run in experiment.runs:
        evaluated = json.loads((runner.run_dir(output, run, 0) / runner.EVALUATED).read_text())
        assert set(seed_claims.MEASURES) <= set(evaluated["measures"])
        assert "shift" in evaluated and "accuracy" in evaluated  # kept by the update
        expected = probes.trend(evaluated["probes"]["layers"], evaluated["probes"]["test_examples"])
        assert numbers["hierarchy"][run.name] == expected
        grid = f"claims_top_patches_{run.name}.png"
        assert (output / grid).is_file() and f"]({grid})" in text
        assert f"- **{run.name}**: probe accuracy" in text
    assert set(numbers["invariance"]) == {r.name for r in experiment.runs}
    # the same claims written elsewhere from these runs (--runs): figures and text move
    elsewhere = tmp_path / "claims_elsewhere"
    moved = claims.write(experiment, elsewhere, "seed_claims:small", runs=output)
    assert f"--output={elsewhere} --runs={output}`" in moved
    assert (elsewhere / "claims_probes.png").is_file() and (elsewhere / "claims.md").is_file()
