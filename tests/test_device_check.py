"""GPUs for real, tested on the CPU: the warnings when hardware and install disagree, the
dataset held on the devices (same batches as the host pipeline, resumable, no recompilation),
and the GPU device check's smoke run (benchmarks/device_check.py with a tiny setting).

The machine is faked through parameters and environment variables (a fake /dev folder, a
fake driver file, SLURM's variables), never by faking JAX.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import data
from benchmarks import device_check
from data import batches as batches_lib
from data import loading
from tests.test_train import read_metrics, tiny_config
from training import checkpoint as ckpt_lib
from training import loop, runtime
from training import setup as setup_lib

ROOT = Path(__file__).resolve().parent.parent


# --- hardware and install -------------------------------------------------------------------


def _machine(tmp_path, *, nodes=(), driver=None):
    """A fake /dev with `nodes` and a fake /proc with the NVIDIA driver `driver` (or none)."""
    dev, proc = tmp_path / "dev", tmp_path / "proc"
    dev.mkdir(parents=True, exist_ok=True)
    for node in nodes:
        (dev / node).touch()
    if driver:
        (proc / "driver" / "nvidia").mkdir(parents=True, exist_ok=True)
        (proc / "driver" / "nvidia" / "version").write_text(
            f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Thu Sep 4 2025\n"
            "GCC version:  gcc version 12.3.0\n"
        )
    return dev, proc


def _warnings(tmp_path, platform="cpu", dtype="float32", environ=None, nodes=(), driver=None,
              smi=False, extras=()):  # fmt: skip
    dev, proc = _machine(tmp_path, nodes=nodes, driver=driver)
    return runtime.hardware_warnings(
        platform,
        dtype,
        environ=environ or {},
        dev=dev,
        proc=proc,
        which=lambda name: f"/usr/bin/{name}" if smi else None,
        extras=list(extras),
    )


def test_a_clean_cpu_machine_gets_no_warning(tmp_path):
    assert _warnings(tmp_path) == []
    assert _warnings(tmp_path, environ={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert _warnings(tmp_path, environ={"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert _warnings(tmp_path, environ={"SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_ID": "7"}) == []


@pytest.mark.parametrize(
    ("machine", "evidence", "extra"),
    [
        ({"nodes": ("nvidia0", "nvidiactl"), "driver": "580.159.03"}, "/dev/nvidia0", "cuda13"),
        ({"smi": True, "driver": "535.104.05"}, "nvidia-smi on the PATH", "cuda12"),
        ({"environ": {"CUDA_VISIBLE_DEVICES": "0,1"}}, "CUDA_VISIBLE_DEVICES=0,1", "cuda13"),
        (
            {"environ": {"SLURM_GPUS_ON_NODE": "4"}, "driver": "550.54"},
            "SLURM_GPUS_ON_NODE=4",
            "cuda12",
        ),  # fmt: skip
        ({"environ": {"SLURM_JOB_GRES": "gpu:h100:1"}}, "a SLURM GPU request", "cuda13"),
    ],
)
def test_a_visible_gpu_without_the_plugin_names_the_extra(tmp_path, machine, evidence, extra):
    (line,) = _warnings(tmp_path, **machine)
    assert evidence in line and "only CPU devices" in line
    assert f"pip install -e '.[{extra}]'" in line
    if "driver" not in machine:  # unknown driver: both extras, and how to tell
        assert "'.[cuda12]'" in line and "nvidia-smi" in line


def test_an_old_driver_is_named_before_the_extra(tmp_path):
    (line,) = _warnings(tmp_path, nodes=("nvidia0",), driver="470.82.01")
    assert "newer NVIDIA driver" in line and "470" in line


def test_the_plugin_installed_but_unused_says_so_instead(tmp_path):
    (line,) = _warnings(tmp_path, nodes=("nvidia0",), extras=("cuda12",))
    assert "cuda12 extra is installed, but JAX found no GPU" in line
    assert "pip install" not in line


def test_a_gpu_backend_or_a_chosen_cpu_gets_no_warning(tmp_path):
    assert _warnings(tmp_path, platform="gpu", nodes=("nvidia0",)) == []
    assert _warnings(tmp_path, environ={"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0"}) == []


def test_a_visible_tpu_names_the_tpu_extra(tmp_path):
    (line,) = _warnings(tmp_path, nodes=("accel0",))
    assert "/dev/accel0" in line and "'.[tpu]'" in line
    assert _warnings(tmp_path / "b", nodes=("accel0",), extras=("tpu",)) == []


def test_bfloat16_on_the_cpu_says_what_it_costs(tmp_path):
    (line,) = _warnings(tmp_path, dtype="bfloat16")
    assert "bfloat16 on the CPU backend" in line and runtime.CPU_BFLOAT16_RATIO in line
    assert "?" not in runtime.CPU_BFLOAT16_RATIO  # a measured figure, not a placeholder
    assert _warnings(tmp_path / "b", platform="gpu", dtype="bfloat16") == []
    both = _warnings(tmp_path / "c", dtype="bfloat16", environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert len(both) == 2


def test_each_warning_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(runtime, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        first = runtime.warn_about_hardware("float32")
        second = runtime.warn_about_hardware("float32")
    assert len(first) == 1 and "CUDA_VISIBLE_DEVICES=3" in first[0]
    assert second == []
    assert sum("CUDA_VISIBLE_DEVICES=3" in r.getMessage() for r in caplog.records) == 1


def test_jaxs_own_gpu_hint_gives_way_to_the_projects():
    runtime.replace_jax_gpu_hint()
    logger = logging.getLogger("jax._src.xla_bridge")
    hint = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1,
        "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not "
        "installed. Falling back to cpu.", (), None,
    )  # fmt: skip
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "other", (), None)
    assert not logger.filter(hint) and logger.filter(other)


# --- the dataset on the devices ----------------------------------------------------------------


def _split(n: int = 100) -> loading.Split:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return loading.Split(images, rng.integers(0, 10, n).astype(np.int32))


@pytest.mark.parametrize("start_step", [0, 4, 13])
def test_device_batches_are_the_host_pipelines(start_step):
    """For every (seed, step), across epoch boundaries and from a resumed step on."""
    split, batch, seed = _split(), 16, 5  # 6 steps per epoch, 4 examples dropped per epoch
    mesh = runtime.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batched = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    host = data.train_batches(
        split, global_batch_size=batch, seed=seed, start_step=start_step, sharding=batched
    )
    device = batches_lib.device_train_inputs(
        batches_lib.device_dataset(split, replicated),
        global_batch_size=batch,
        seed=seed,
        start_step=start_step,
        sharding=replicated,
    )
    cut = jax.jit(batches_lib.gather_batch, static_argnums=2)
    orders = []  # the epochs' permutations, kept alive so that no id() is reused
    for step in range(start_step, start_step + 14):
        expected, inputs = next(host), next(device)
        if not any(inputs["order"] is order for order in orders):
            orders.append(inputs["order"])
        got = cut(inputs, np.int32(step), batch)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
    assert len(orders) == len({s // 6 for s in range(start_step, start_step + 14)})


def test_auto_holds_the_data_on_an_accelerator_that_has_room_and_never_on_the_cpu():
    splits = data.load(tiny_config().dataset, seed=0)
    needed = batches_lib.dataset_bytes(splits.train, splits.validation, splits.test)

    class Device:
        platform, device_kind = "gpu", "fake GPU"

        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit} if self.limit else None

    resolve = setup_lib.resolve_on_device
    assert resolve("auto", splits) == (False, "auto: the CPU backend")
    assert resolve("auto", splits, Device(8 * needed))[0]
    assert not resolve("auto", splits, Device(2 * needed))[0]  # over a quarter of the memory
    assert resolve("auto", splits, Device(None))[0]  # no figure: up to 2 GiB
    assert resolve("on", splits)[0] and not resolve("off", splits, Device(8 * needed))[0]


# The two pipelines make two different programs. On XLA's kernels they round alike; with
# oneDNN's (whose convolution inputs are not materialised, `cpu_kernels.materialized`) XLA
# fuses the input's producers differently in the two, and the trajectories part at float
# rounding after a few steps. What these tests check is the pipeline, so on XLA's kernels.
XLA_KERNELS = ("CONVNETS_ONEDNN", "0")


def test_on_device_training_matches_the_host_pipeline_bit_for_bit(monkeypatch):
    """Same seed, same steps across an epoch boundary: the same losses, parameters and eval."""
    monkeypatch.setenv(*XLA_KERNELS)
    runs = {}
    for mode in ("off", "on"):
        config = tiny_config("resnet20")
        config.dataset.on_device = mode
        s = setup_lib.setup(config)
        assert s.on_device == (mode == "on")
        state, inputs, losses = s.state, s.train_batches(), []
        for _ in range(15):  # 384 training images / 32: 12 steps per epoch
            state, metrics = s.train_step(state, next(inputs))
            losses.append(metrics["loss"])
        runs[mode] = (
            np.asarray(jax.device_get(losses)),
            jax.device_get(state["params"]),
            s.evaluate(state, s.eval_split()),
            s.evaluate(state, s.splits.test),
        )
    off, on = runs["off"], runs["on"]
    np.testing.assert_array_equal(on[0], off[0])
    jax.tree.map(np.testing.assert_array_equal, on[1], off[1])
    assert on[2:] == off[2:]


def test_no_compilation_between_train_and_eval_steps():
    config = tiny_config("plain")
    config.dataset.on_device = "on"
    s = setup_lib.setup(config)
    state, inputs = s.state, s.train_batches()
    compiles = []
    listen = {"on": False}

    def listener(event, duration, **kwargs):
        if listen["on"] and "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    for round_ in range(2):
        listen["on"] = round_ == 1  # the first round may compile the eval sums' additions
        for _ in range(13):  # an epoch boundary: a new order goes to the devices
            state, _ = s.train_step(state, next(inputs))
        s.evaluate(state, s.eval_split())
        jax.block_until_ready(state)
    listen["on"] = False
    assert compiles == []


def test_sigterm_with_the_data_on_the_device_resumes_like_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    """An on-device run preempted at step 7 and resumed ends as the host pipeline's run."""
    monkeypatch.setenv(*XLA_KERNELS)
    full = loop.train_and_evaluate(tiny_config(steps=12), tmp_path / "full")
    real_inputs = batches_lib.device_train_inputs

    def preempted_after_7(*args, **kwargs):
        for i, inputs in enumerate(real_inputs(*args, **kwargs)):
            if i == 6:
                signal.raise_signal(signal.SIGTERM)
            yield inputs

    config = tiny_config(steps=12)
    config.dataset.on_device = "on"
    monkeypatch.setattr(batches_lib, "device_train_inputs", preempted_after_7)
    part = tmp_path / "part"
    with pytest.raises(loop.Preempted, match="step 7"):
        loop.train_and_evaluate(config, part)
    assert ckpt_lib.Checkpoints(part, keep=2).latest_step() == 7
    monkeypatch.setattr(batches_lib, "device_train_inputs", real_inputs)
    resumed = loop.train_and_evaluate(config, part)
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("wall_time", "images_per_s")}
        for r in rs
        if r["step"] not in (7, 8)
    ]
    assert strip(read_metrics(part)) == strip(read_metrics(tmp_path / "full"))


# --- the device check ---------------------------------------------------------------------------

# Imports the GPU machine cannot satisfy (benchmarks/device_check.py must not need them).
_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow_datasets", "tensorboardX", "matplotlib"):
            raise ImportError(f"{name} is not on the GPU machine")
        return None
sys.meta_path.insert(0, _Block())
"""

SMOKE = [
    "--models=plain",
    "--dtypes=bfloat16",
    "--batch_sizes=8",
    "--windows=1",
    "--window_seconds=0.01",
    "--image_size=8",
    "--train_examples=64",
    "--test_examples=32",
    "--on_device=on",
    "--accuracy_dataset=builtin",
    "--accuracy_model=plain",
    "--accuracy_dtype=float32",
    "--accuracy_batch=16",
    "--accuracy_eval_batch=32",
    "--accuracy_epochs=2",
    "--target_accuracy=0.05",
]


def test_device_check_smoke_run_on_the_cpu(tmp_path):
    """The whole check, tiny: one model, one dtype, one batch, a reachable accuracy target;
    without tensorflow-datasets, tensorboardX and matplotlib (the GPU machine has none)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", f"--output={tmp_path}", *SMOKE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    env_ = report["environment"]
    assert env_["versions"]["jax"] == jax.__version__ and env_["jax_backend"] == "cpu"
    (entry,) = report["throughput"]
    ours = entry["ours"]
    assert ours["train_images_per_s"] > 0 and ours["eval_images_per_s"] > 0
    assert ours["on_device"] and ours["compile_seconds"] > 0
    assert ours["train_program_memory"]["total_bytes"] > 0
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "torch" not in entry
    else:
        assert entry["torch"]["params"] > 0 and entry["ours_over_torch_train"] > 0
    accuracy = report["accuracy"]
    assert accuracy["reached"] and accuracy["seconds_to_target"] > 0
    table = (tmp_path / "device_check.md").read_text()
    assert "| plain | bfloat16 | 8 |" in table and "test accuracy after" in table
    assert "| plain | bfloat16 | 8 |" in out.stdout


def test_device_check_table_keeps_failures_and_skips():
    report = {
        "environment": {
            "started": "now", "jax_device": "H200", "jax_backend": "gpu",
            "nvidia_smi": "NVIDIA H200, 580", "versions": {"jax": "0.11.2"},
        },
        "throughput": [
            {"model": "resnet20", "dtype": "float32", "batch_size": 128,
             "ours": {"train_images_per_s": 300.0, "eval_images_per_s": 900.0,
                      "init_seconds": 1.0, "compile_seconds": 2.0,
                      "train_program_memory": {"total_bytes": 2**21}},
             "torch": {"train_images_per_s": 200.0, "eval_images_per_s": 1000.0,
                       "peak_memory_bytes": 2**22}},
            {"model": "resnet56", "dtype": "float32", "batch_size": 128,
             "ours": {"error": "Traceback\nValueError: boom"}},
            {"model": "plain", "dtype": "float32", "batch_size": 128, "skipped": "over budget"},
        ],
        "skipped": ["plain/float32/128"],
        "accuracy": {"model": "resnet20", "dataset": "fashion_mnist", "dtype": "bfloat16",
                     "batch_size": 512, "target_accuracy": 0.94, "reached": False,
                     "best_test_accuracy": 0.93, "epochs": 30.0,
                     "curve": [{"seconds": 40.0, "epoch": 30.0}]},
        "wall_seconds": 400.0,
    }  # fmt: skip
    device_check.ratios(report["throughput"][0])
    assert report["throughput"][0]["ours_over_torch_train"] == pytest.approx(1.5)
    table = device_check.format_table(report)
    assert "| resnet20 | float32 | 128 | 300 | 200 | 1.50 | 900 | 1000 | 0.90 | 3.0 | 2 | 4 |" in (
        table
    )
    assert "ValueError: boom" in table and "Skipped (over --budget_seconds): plain" in table
    assert "did not reach 94.0 % (best 93.00 %" in table


def test_the_fashion_mnist_run_is_a_valid_config():
    from configs import schema

    config, steps_per_epoch = device_check.accuracy_config(device_check.Settings())
    schema.validate(config)
    assert steps_per_epoch == 60_000 // 512
    assert config.training.num_steps == 30 * steps_per_epoch
    assert config.dataset.validation_size == 0 and config.dataset.eval_split == "test"
    assert config.model.dtype == "bfloat16" and config.training.eval_batch_size == 2000


def test_device_check_script_parses():
    check = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


_TWO_DEVICES = """
from training import runtime
runtime.configure_jax()
import jax, numpy as np
from tests.test_train import tiny_config
from training.setup import setup
assert jax.device_count() == 2
losses = {}
for mode in ("off", "on"):
    config = tiny_config("resnet20")
    config.dataset.on_device = mode
    s = setup(config, steps=("train",))
    state, inputs, out = s.state, s.train_batches(), []
    for _ in range(14):
        state, metrics = s.train_step(state, next(inputs))
        out.append(metrics["loss"])
    losses[mode] = np.asarray(jax.device_get(out))
np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-6, atol=1e-7)
print("ok", losses["on"][-1])
"""


@pytest.mark.slow
def test_on_device_data_over_two_devices_trains_as_the_host_pipeline():
    """The batch cut on the devices and split over a 2-device mesh: the same losses."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    done = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
