"""The benchmark: its arithmetic, the PyTorch reference's equivalence with our models, and one
real run of the script on a small model. (Every layer kind's torch translation: test_shapes.py;
the CPU kernels, once the pooling rewrite's tests here: test_models.py.)

Nothing here times anything: the numbers come from `python -m benchmarks.throughput` and
`python -m benchmarks.conv_parts`.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import app

from benchmarks import conv_parts, protocol, throughput

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
    # a benchmark's before/after comparison of the flags leaves $XLA_FLAGS as the user set it
    assert runtime.configure_xla_flags(project_flags=False) == ""
    assert runtime.DEFAULT_XLA_FLAGS["cpu"] == (flag,)  # the switch is a parameter, not a global


# --- glibc's malloc set up for XLA:CPU's buffers (training/runtime.configure_host_memory) ------

# A training step's gradient program whose temporary buffers are 128 MiB (asserted), run 24
# times; prints the minor page faults of each run, one per line, after what the set-up said.
_PAGE_FAULTS = """
import resource, sys
from training import runtime
print(runtime.configure_host_memory())
import jax, jax.numpy as jnp

def loss(w, x):
    for _ in range(3):
        x = jax.nn.relu(jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return (x * x).sum()

step = jax.jit(jax.grad(loss))
x, w = jnp.ones((64, 64, 64, 16)), jnp.full((3, 3, 16, 16), 0.01)
assert step.lower(w, x).compile().memory_analysis().temp_size_in_bytes == 128 << 20
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(w, x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(env: dict) -> tuple[str, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", _PAGE_FAULTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return out[0], [int(n) for n in out[1:] if n]


@pytest.mark.skipif(
    sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc",
    reason="glibc's malloc only",
)
def test_host_memory_setting_ends_the_page_faults_of_every_step():
    import os
    import statistics

    pages = (128 << 20) // os.sysconf("SC_PAGE_SIZE")
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_") and k != "CONVNETS_MALLOPT"
    }
    said, faults = _page_faults(env)
    assert said == "on"
    # the heap grows to hold the buffers of a few steps, then every step reuses it
    assert statistics.median(faults[-8:]) < 0.05 * pages, faults
    # glibc's default: each step's buffers are mapped afresh and touched page by page
    said, faults = _page_faults({**env, "CONVNETS_MALLOPT": "0"})
    assert said == "off ($CONVNETS_MALLOPT)"
    assert statistics.median(faults[-8:]) > 0.5 * pages, faults
    # the user's own settings of glibc's malloc come first
    said, _ = _page_faults({**env, "MALLOC_ARENA_MAX": "4"})
    assert said == "off (the environment sets glibc's malloc)"


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


def test_before_commit_worktree_builds_its_extension():
    """A --before_commit worktree gets that commit's compiled extension (this checkout's build
    when the sources are the same, as for HEAD): without it the "before" workers would
    silently time XLA's convolutions instead."""
    with protocol.worktree("HEAD") as tree:
        built = any((tree / "models").glob("_onednn_conv*.so"))
        assert (tree / "csrc").is_dir()
    assert built == any((ROOT / "models").glob("_onednn_conv*.so"))


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


TIME_TO_ACCURACY = [
    "--config=configs/builtin.py:resnet20",
    "--epochs=1",
    "--set=dataset.builtin_image_size=16",
    "--set=dataset.builtin_train_size=640",
    "--set=dataset.builtin_test_size=200",
    "--set=training.eval_batch_size=100",
]


def _time_to_accuracy(tmp_path, *args) -> dict:
    out = tmp_path / "tta.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.time_to_accuracy", *TIME_TO_ACCURACY, *args]
        + [f"--output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| jax |" in done.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_time_to_accuracy_stops_at_the_target_and_times_training_only(tmp_path):
    # 640 images / batch 128 = 5 steps per epoch, an evaluation after each step
    reached = _time_to_accuracy(tmp_path, "--target=0", "--reference=none")
    jax_side = reached["sides"]["jax"]
    assert jax_side["reached"] and jax_side["steps"] == 1 and len(jax_side["curve"]) == 1
    assert 0 < jax_side["train_seconds"] < jax_side["end_to_end_seconds"]
    assert jax_side["end_to_end_seconds"] == pytest.approx(
        jax_side["set_up_seconds"] + jax_side["train_seconds"]
    )
    assert reached["settings"]["steps_per_epoch"] == 5 and "ratios" not in reached
    missed = _time_to_accuracy(tmp_path, "--target=1.01", "--reference=none")["sides"]["jax"]
    assert not missed["reached"] and missed["train_seconds"] is None
    assert [p["step"] for p in missed["curve"]] == [1, 2, 3, 4, 5]  # the whole schedule


@pytest.mark.slow
def test_time_to_accuracy_races_pytorch_on_the_same_recipe(tmp_path):
    pytest.importorskip("torch", reason="needs the bench extra: pip install -e '.[bench]'")
    result = _time_to_accuracy(tmp_path, "--target=0")
    torch_side = result["sides"]["torch"]
    assert torch_side["reached"] and torch_side["steps"] == 1
    ours, theirs = result["sides"]["jax"], torch_side
    assert result["ratios"]["train_seconds"] == pytest.approx(
        ours["train_seconds"] / theirs["train_seconds"]
    )


def test_time_to_accuracy_reference_starts_from_our_initial_weights():
    """The PyTorch side's network holds the training library's initial weights for the
    config's seed (not PyTorch's own initialisation): every convolution's kernel is ours
    (OIHW for HWIO), and another seed gives other kernels."""
    torch = pytest.importorskip("torch", reason="needs the bench extra: pip install -e '.[bench]'")
    import configs
    import data
    from benchmarks import time_to_accuracy
    from training import runtime
    from training import state as state_lib

    config = configs.load("configs/builtin.py:resnet20")
    configs.override(config, {"dataset.builtin_image_size": 16})
    info = data.dataset_info(config.dataset)
    _, state = state_lib.create_train_state(config, info, runtime.make_mesh())
    ours = {
        k: np.asarray(v["kernel"]) for k, v in state["params"]["layers"].items() if "kernel" in v
    }
    theirs = time_to_accuracy.reference_network(config)
    config.seed = 1
    other = time_to_accuracy.reference_network(config)
    convs = [n for n, m in theirs.layers.items() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19  # ResNet-20's convolutions (the 20th layer is the dense head)
    for name in convs:
        kernel = theirs.layers[name].weight.detach().numpy().transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(kernel, ours[name])
        assert not np.array_equal(
            other.layers[name].weight.detach().numpy(), kernel.transpose(3, 2, 0, 1)
        )


def test_time_to_accuracy_reference_augmentation_is_a_zero_filled_shift_and_a_flip():
    from benchmarks import time_to_accuracy

    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 6, 5, 1)).astype(np.uint8)  # no zero pixels
    out = time_to_accuracy._augmented(images, np.random.default_rng(1), padding=2, flip=True)
    assert out.shape == images.shape and out.dtype == np.uint8
    kinds = set()
    for image, result in zip(images, out, strict=True):
        matches = [
            (dy, dx, mirror)
            for mirror in (False, True)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(result, _shifted(image[:, ::-1] if mirror else image, dy, dx))
        ]
        assert len(matches) == 1, matches  # exactly one shift (and flip) explains each image
        kinds.add(matches[0])
    assert len(kinds) > 10  # one draw per image, not one per batch


def _shifted(image, dy, dx):
    """`image` moved down by dy and right by dx, zeros shifted in."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    return padded[2 - dy : 2 - dy + h, 2 - dx : 2 - dx + w]
