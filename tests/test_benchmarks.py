"""The benchmark: its arithmetic, the PyTorch reference's equivalence with our models, the
pooling rewrite's gradients, and one real run of the script on a small model.

Nothing here times anything: the numbers come from `python -m benchmarks.throughput`.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from benchmarks import throughput
from models import layers

ROOT = Path(__file__).resolve().parent.parent


# --- arithmetic of the report ----------------------------------------------------------------


def test_parse_variant_keeps_equals_signs_and_empty_flags():
    assert throughput.parse_variant("off=--xla_a=b --xla_c=") == ("off", "--xla_a=b --xla_c=")
    assert throughput.parse_variant("jax_default=") == ("jax_default", "")
    for bad in ("no_equals", "=--flag", "jax=--flag", "torch="):
        with pytest.raises(app.UsageError):
            throughput.parse_variant(bad)


def test_window_arithmetic():
    assert throughput.steps_for(0.5, 2.0) == 4
    assert throughput.steps_for(5.0, 2.0) == 1  # at least one step
    windows = [
        {"seconds": 2.0, "steps": 4},
        {"seconds": 9.0, "steps": 3},
        {"seconds": 1.2, "steps": 4},
    ]
    assert throughput.seconds_per_step(windows) == pytest.approx(0.5)  # median of 0.5, 3, 0.3
    assert throughput.pipeline_share(0.95, 1.0) == pytest.approx(0.05)
    assert throughput.pipeline_share(1.0, 0.98) < 0  # noise can make the fed step faster


def _result(model, ours, torch=None):
    contestants = {
        "jax": {
            "train_images_per_s": ours,
            "eval_images_per_s": 2 * ours,
            "first_step_seconds": 3.0,
            "compile_seconds": 2.0,
            "pipeline_share": 0.01,
            "train_gflops": 50.0,
            "peak_rss_mib": 500.0,
            "matmul_gflops": 100.0,
        }
    }
    result = {"model": model, "params": 1000, "contestants": contestants}
    if torch:
        contestants["torch"] = {
            "train_images_per_s": torch,
            "eval_images_per_s": torch,
            "peak_rss_mib": 400.0,
            "matmul_gflops": 150.0,
        }
        result["ours_over_torch_train"] = ours / torch
        result["ours_over_torch_eval"] = 2 * ours / torch
    return result


def test_peak_table_and_targets():
    results = [_result("plain", 300.0, 200.0), _result("resnet20", 100.0, 200.0)]
    assert throughput.add_peak_ratios(results) == 150.0  # best matmul of the run
    assert results[0]["contestants"]["jax"]["train_share_of_peak"] == pytest.approx(1 / 3)
    table = throughput.format_table(results, 150.0)
    assert "ours/torch" in table and "1.50" in table and "0.50" in table
    targets = throughput.targets(results)
    assert targets["plain"]["train_at_least_torch"]
    assert not targets["resnet20"]["train_at_least_torch"]
    assert targets["plain"]["pipeline_share_at_most_5pct"]


# --- the pooling rewrite: same values, same gradients ------------------------------------------


def _reduce_window_pool(x, function, f, s, p):
    """The previous implementation (lax.reduce_window, differentiated by JAX)."""
    pads = ((0, 0), (p, p), (p, p), (0, 0))
    if function == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, f, f, 1), (1, s, s, 1), pads)
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, f, f, 1), (1, s, s, 1), pads)
    return summed / (f * f)


@pytest.mark.parametrize("function", ["max", "avg"])
@pytest.mark.parametrize("f, s, p", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
def test_pooling_gradients_equal_reduce_window(function, f, s, p):
    # distinct values: no ties, so every max window has one well-defined gradient
    x = jnp.asarray(np.random.default_rng(0).permutation(2 * 7 * 7 * 3).reshape(2, 7, 7, 3) / 50)
    x = x.astype(jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 7, 3)), jnp.float32)

    def loss(pool):
        return lambda x: jnp.sum(pool(x) * weights[:, : pool(x).shape[1], : pool(x).shape[2]])

    ours = lambda x: layers.pool(x, function, f, s, p)
    theirs = lambda x: _reduce_window_pool(x, function, f, s, p)
    np.testing.assert_array_equal(ours(x), theirs(x))
    np.testing.assert_allclose(
        jax.grad(loss(ours))(x), jax.grad(loss(theirs))(x), rtol=1e-6, atol=1e-6
    )


def test_depth_pooling_gradient_equals_reduce_window():
    x = jnp.asarray(np.random.default_rng(2).permutation(2 * 3 * 3 * 8).reshape(2, 3, 3, 8) / 9)
    x = x.astype(jnp.float32)
    previous = lambda x: jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 1, 1, 3), (1, 1, 1, 2), ((0, 0), (0, 0), (0, 0), (1, 1))
    )
    ours = lambda x: layers.pool(x, "depth", 3, 2, 1)
    np.testing.assert_array_equal(ours(x), previous(x))
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(ours(x) ** 2))(x),
        jax.grad(lambda x: jnp.sum(previous(x) ** 2))(x),
        rtol=1e-6,
    )


def test_materialized_is_the_identity_under_jit_grad_and_vmap():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5, 5, 2)), jnp.float32)
    np.testing.assert_array_equal(jax.jit(layers.materialized)(x), x)
    np.testing.assert_array_equal(jax.vmap(layers.materialized)(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(layers.materialized(x) * x))(x), 2 * x)
    nan = x.at[0, 0, 0, 0].set(jnp.nan)
    np.testing.assert_array_equal(layers.materialized(nan), nan)  # the other branch


# --- the PyTorch reference ------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["pooled_max", "resnet20"])
def test_torch_reference_computes_what_our_model_computes(preset):
    pytest.importorskip("torch", reason="needs the bench extra: pip install -e '.[bench]'")
    from benchmarks import equivalence

    result = equivalence.check(preset, batch=4)
    assert result["params_equal"], result
    assert result["eval_allclose"] and result["train_allclose"], result
    assert result["eval_max_abs_logit"] > 0.01  # the check compares non-trivial logits


def test_torch_reference_has_our_parameter_count_for_every_preset():
    pytest.importorskip("torch", reason="needs the bench extra: pip install -e '.[bench]'")
    import models
    from benchmarks import torch_reference
    from models import summary

    for preset in models.PRESETS:
        specs = models.architecture(models.preset(preset), (32, 32, 3), 10)
        network = torch_reference.Network(specs)
        assert torch_reference.count_params(network) == summary.to_json(specs)["total_params"]


# --- the script itself ----------------------------------------------------------------------


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -m module args...` in the project root and returns what it did."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_benchmark_script_runs_and_writes_its_report(tmp_path):
    output = tmp_path / "results.json"
    run = run_module(
        "benchmarks.throughput",
        "--models=plain",
        "--windows=1",
        "--window_seconds=0.05",
        "--eval_batch_size=64",
        "--reference=none",
        f"--output={output}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "plain" in run.stdout and "train img/s" in run.stdout
    report = json.loads(output.read_text())
    (result,) = report["models"]
    ours = result["contestants"]["jax"]
    assert result["params"] == result["params_real"] == 342_026
    assert ours["train_images_per_s"] > 0 and ours["eval_images_per_s"] > 0
    assert ours["compile_seconds"] > 0 and ours["peak_rss_mib"] > 0
    assert "pipeline_share" in ours and report["matmul_peak_gflops"] > 0
    assert report["environment"]["xla_flags"]  # the project's default flags were set


def test_compile_time_script_measures_every_setting(tmp_path):
    output = tmp_path / "compile_time.json"
    run = run_module(
        "benchmarks.compile_time",
        "--models=pooled_max",
        "--eval_batch_size=64",
        "--before_commit=HEAD",  # that commit's worker, from a temporary git worktree
        f"--output={output}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| pooled_max |" in run.stdout
    report = json.loads(output.read_text())
    times = report["models"]["pooled_max"]
    assert set(times) == {"before", "cold", "warm"}
    for setting in times.values():
        assert 0 < setting["init_seconds"] < setting["first_step_seconds"]
        assert 0 < setting["compile_seconds"] < setting["first_step_seconds"]
    assert report["settings"]["before"] == "commit HEAD"
    assert set(report["targets"]["pooled_max"]) == {
        "compile_at_most_10s_before",
        "compile_at_most_10s_cold",
        "compile_at_most_10s_warm",
    }


def test_compile_time_script_refuses_an_unknown_commit():
    run = run_module("benchmarks.compile_time", "--before_commit=no-such-commit", timeout=120)
    assert run.returncode != 0
    assert "--before_commit=no-such-commit" in run.stderr
    assert "Traceback" not in run.stderr
