"""The benchmark: its arithmetic, the PyTorch reference's equivalence with our models, the
pooling rewrite's gradients, and one real run of the script on a small model.

Nothing here times anything: the numbers come from `python -m benchmarks.throughput` and
`python -m benchmarks.conv_parts`.
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
from flax import nnx

from benchmarks import conv_parts, throughput
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


@pytest.mark.parametrize(
    "size, f, s, padding",
    [
        (32, 3, 2, ((1, 1), (1, 1))),  # the ResNets' and All-CNN-C's downsampling
        (32, 1, 2, ((0, 0), (0, 0))),  # a 1x1 projection: three of four phases get no tap
        (9, 3, 2, ((1, 1), (1, 1))),  # odd size: the last phase row is cropped
        (10, 5, 3, ((2, 2), (2, 2))),  # stride 3, kernel 5
        (11, 2, 2, ((0, 1), (1, 0))),  # even kernel, asymmetric padding
        (7, 3, 3, ((0, 0), (0, 0))),  # windows that skip input rows: zero gradient there
    ],
)
def test_strided_conv_gradients_equal_lax(size, f, s, padding):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(f, f, 3, 5)), jnp.float32)
    dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def conv(implementation):
        return lambda x, k: implementation(x, k, (s, s), padding, dimension_numbers=dims)

    ours, theirs = conv(layers.conv_general_dilated), conv(jax.lax.conv_general_dilated)
    np.testing.assert_array_equal(ours(x, kernel), theirs(x, kernel))
    weights = jnp.asarray(rng.normal(size=theirs(x, kernel).shape), jnp.float32)
    grads = [
        jax.jit(jax.grad(lambda x, k, c=c: jnp.sum(c(x, k) * weights), argnums=(0, 1)))(x, kernel)
        for c in (ours, theirs)
    ]
    for a, b in zip(*grads, strict=True):
        assert a.shape == b.shape and float(jnp.max(jnp.abs(b))) > 0.1
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if f <= s and not any(padding[0]):  # rows no window reads get no gradient
        covered = np.zeros(size, bool)
        for start in range(0, size - f + 1, s):
            covered[start : start + f] = True
        assert not np.any(np.asarray(grads[0][0])[:, ~covered])


def test_strided_conv_layer_uses_phases_and_unstrided_ones_lax():
    def backward(layer, x):
        return jax.jit(jax.grad(lambda x: jnp.sum(layer(x)))).lower(x).as_text()

    x = jnp.ones((1, 8, 8, 3))
    dims = ("NHWC", "HWIO", "NHWC")
    strided = layers.conv(3, 4, 3, 2, 1, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    kernel = strided.kernel[...]
    lax_strided = lambda x: jax.lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1),) * 2, None, None, dims
    )
    # XLA's own input gradient dilates dy with zeros; the layer's does not
    assert "lhs_dilate = [2, 2]" in backward(lax_strided, x)
    assert "lhs_dilate = [2, 2]" not in backward(strided, x)
    # stride 1, or padding given by name: lax's convolution, untouched
    plain = layers.conv(3, 4, 3, 1, 1, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert "custom_vjp" not in str(jax.make_jaxpr(plain)(x))
    named = lambda x: layers.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=dims)
    assert "custom_vjp" not in str(jax.make_jaxpr(named)(x))
    assert "custom_vjp" in str(jax.make_jaxpr(strided)(x))
    # dimension numbers given as strings, as conv_parts.py does, mean the same
    by_name = lambda x: layers.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1),) * 2, None, None, dims
    )
    assert "custom_vjp" in str(jax.make_jaxpr(by_name)(x))
    nchw = jnp.ones((1, 3, 8, 8))  # other layouts: lax's
    by_nchw = lambda x: layers.conv_general_dilated(
        x, kernel.transpose(3, 2, 0, 1), (2, 2), ((1, 1),) * 2, dimension_numbers=None
    )
    assert "custom_vjp" not in str(jax.make_jaxpr(by_nchw)(nchw))


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


# --- the project's XLA flags (training/runtime.py) -------------------------------------------


def test_project_xla_flags_are_added_without_overriding_the_users(monkeypatch):
    from training import runtime

    (flag,) = runtime.DEFAULT_XLA_FLAGS["cpu"]
    name = flag.split("=", 1)[0]
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert runtime.configure_xla_flags() == flag
    assert runtime.configure_xla_flags() == flag  # idempotent: not added twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert runtime.configure_xla_flags() == f"--xla_force_host_platform_device_count=4 {flag}"
    for own in (f"{name}=", f"{name}=reduce,eltwise"):  # the user's value, even empty, wins
        monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {own}")
        assert runtime.configure_xla_flags() == f"--xla_force_host_platform_device_count=2 {own}"
    monkeypatch.delenv("XLA_FLAGS")
    assert runtime.configure_xla_flags(platform="tpu") == ""  # none measured there: none set


# --- the convolution passes (benchmarks/conv_parts.py) -----------------------------------------


def test_conv_parts_takes_each_convolution_from_the_architecture():
    import models
    from configs import builtin

    specs = models.architecture(builtin.get_config("resnet20").model, (32, 32, 3), 10)
    conv_specs = [s for s in specs if s.kind == "conv"]
    convs = conv_parts.model_convs("resnet20")
    assert len(convs) == len(conv_specs) == 19
    # only the stem's input gradient is never needed: nothing before it is trained
    assert [needs_dx for _, needs_dx in convs] == [False] + [True] * 18
    for (conv, _), spec in zip(convs, conv_specs, strict=True):
        assert (conv.height, conv.width, conv.depth) == spec.in_shape
        assert (conv.output_size(conv.height), conv.output_size(conv.width)) == spec.out_shape[:2]
        assert conv.flops(batch=1) == spec.flops  # W2 = (W1 + 2P - F) / S + 1, per pass
    assert len({conv.key for conv, _ in convs}) == 6


def test_conv_parts_torch_passes_compute_what_jax_passes_compute():
    pytest.importorskip("torch", reason="needs the bench extra: pip install -e '.[bench]'")
    # a strided convolution (its input gradient dilates), the stem (3 channels), a 1x1
    for conv in (
        conv_parts.Conv(16, 16, 8, 16, 3, 2, 1),
        conv_parts.Conv(12, 12, 3, 8, 3, 1, 1),
        conv_parts.Conv(8, 8, 16, 4, 1, 1, 0),
    ):
        inputs = conv_parts.make_inputs(conv, batch=4)
        ours = {k: np.asarray(run()) for k, run in conv_parts.jax_passes(conv, *inputs).items()}
        torch = {k: run().numpy() for k, run in conv_parts.torch_passes(conv, *inputs).items()}
        assert set(ours) == set(torch) == set(conv_parts.PASSES)
        x, w, dy = inputs
        assert ours["fwd"].shape == dy.shape and ours["dx"].shape == x.shape
        assert ours["dw"].shape == w.shape
        for name in conv_parts.PASSES:
            scale = np.max(np.abs(ours[name]))
            assert scale > 0.1, (conv.key, name)
            np.testing.assert_allclose(torch[name], ours[name], atol=1e-5 * scale, rtol=1e-4)


def test_conv_parts_step_ceilings_arithmetic():
    # steps of 128 images: ours 0.4 s (320 img/s), torch 0.2 s (640 img/s); convolutions
    # 0.3 s of ours and 0.1 s of torch's
    throughput = {"settings": {"batch_size": 128}, "models": [_result("m", 320.0, 640.0)]}
    totals = {"m": {"xla": 0.3, "xla_ynnpack": 0.5, "torch": 0.1}}
    (ceiling,) = conv_parts.step_ceilings(totals, throughput).values()
    assert ceiling["ratio"] == pytest.approx(0.5)
    assert ceiling["conv_share"] == {"xla": pytest.approx(0.75), "torch": pytest.approx(0.5)}
    assert ceiling["if_rest_equal"] == pytest.approx(0.2 / (0.1 + 0.3))
    assert ceiling["if_rest_free"] == pytest.approx(0.2 / 0.3)
    assert "m" in conv_parts.format_ceilings({"m": ceiling})
    # models measured without torch, or missing from the other report, are left out
    assert conv_parts.step_ceilings({"other": totals["m"]}, throughput) == {}


def test_conv_parts_refuses_step_times_it_cannot_use(tmp_path):
    wrong_batch = tmp_path / "batch64.json"
    wrong_batch.write_text(json.dumps({"settings": {"batch_size": 64}, "models": []}))
    for path, expected in ((wrong_batch, "batch size 64"), (tmp_path / "none.json", "none.json")):
        run = run_module("benchmarks.conv_parts", f"--step_times={path}", timeout=120)
        assert run.returncode != 0
        assert expected in run.stderr and "Traceback" not in run.stderr


def test_conv_parts_script_times_every_pass_and_sums_each_model(tmp_path):
    output = tmp_path / "conv_parts.json"
    run = run_module(
        "benchmarks.conv_parts",
        "--models=pooled_max",
        "--windows=1",
        "--window_seconds=0.01",
        "--reference=none",
        f"--output={output}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "xla dw ms" in run.stdout and "pooled_max" in run.stdout
    report = json.loads(output.read_text())
    convs = report["convolutions"]
    assert len(convs) == 3 and all(c["uses"] == {"pooled_max": 1} for c in convs)
    for contestant in ("xla", "xla_ynnpack"):
        seconds = [c["seconds"][contestant] for c in convs]
        assert all(s[p] > 0 for s in seconds for p in conv_parts.PASSES)
        # one training step: the stem's forward and weight gradient, all three passes after
        expected = seconds[0]["fwd"] + seconds[0]["dw"] + sum(sum(s.values()) for s in seconds[1:])
        assert report["models"]["pooled_max"][contestant] == pytest.approx(expected)
    assert report["environment"]["contestants"]["xla"]["xla_flags"]  # the project's flags
    assert not report["environment"]["contestants"]["xla_ynnpack"]["xla_flags"]


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
        "--before_commit=HEAD",  # that commit's worker, from a temporary git worktree
        f"--output={output}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "plain" in run.stdout and "train img/s" in run.stdout
    assert "our step / before: plain" in run.stdout
    report = json.loads(output.read_text())
    (result,) = report["models"]
    ours = result["contestants"]["jax"]
    assert result["contestants"]["before"]["train_images_per_s"] > 0
    assert result["ours_over_before_train"] > 0
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


@pytest.mark.parametrize("module", ["throughput", "compile_time", "conv_parts"])
def test_benchmark_scripts_refuse_an_unknown_model(module):
    run = run_module(f"benchmarks.{module}", "--models=resnet20,nosuch", timeout=120)
    assert run.returncode != 0
    assert "nosuch" in run.stderr and "resnet56" in run.stderr  # names the valid presets
    assert "Traceback" not in run.stderr


def test_compile_time_script_refuses_an_unknown_commit():
    run = run_module("benchmarks.compile_time", "--before_commit=no-such-commit", timeout=120)
    assert run.returncode != 0
    assert "--before_commit=no-such-commit" in run.stderr
    assert "Traceback" not in run.stderr
