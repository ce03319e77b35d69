"""Bad input ends in one clear line; interruptions and faults lose nothing.

The catalogue of user mistakes goes through the real command line (`train.py`), because what
the user sees there is the point: one line naming the cause, no traceback.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from errors import UserError
from training import checkpoint as ckpt_lib
from training import loop

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "--config.dataset.builtin_train_size=512",
    "--config.dataset.builtin_test_size=128",
    "--config.training.batch_size=32",
    "--config.training.eval_batch_size=64",
]


def train_cli(
    *args: str, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_clear_line(out: subprocess.CompletedProcess, *expected: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        # a layer whose output would be empty: the layer and the formula's numbers
        (
            ["--config=configs/builtin.py:plain", "--config.model.kernel_size=41"],
            ("conv1", "floor((32 + 2*1 - 41)/1) + 1"),
        ),
        (["--config=configs/builtin.py:plain", "--config.model.stride=-1"], ("model.stride",)),
        (["--config=configs/builtin.py", "--config.dataset.name=imagenet"], ("imagenet",)),
        (["--config=configs/builtin.py", "--config.model.name=vgg"], ("vgg", "resnet")),
        (
            [
                "--config=configs/fashion_mnist.py:plain",
                "--config.dataset.data_dir=/nonexistent/fashion",
            ],
            ("/nonexistent/fashion",),
        ),
    ],
)
def test_bad_config_values(tmp_path, args, expected):
    assert_one_clear_line(train_cli(*args, f"--workdir={tmp_path}"), *expected)


def test_batch_not_divisible_by_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = train_cli(
        "--config=configs/builtin.py:plain",
        *SMALL,
        "--config.training.batch_size=33",
        f"--workdir={tmp_path}",
        env=env,
    )
    assert_one_clear_line(out, "batch_size=33", "2 devices")


def test_workdir_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = train_cli("--config=configs/builtin.py:plain", *SMALL, f"--workdir={blocker}/run")
    assert_one_clear_line(out, "not writable", "--workdir")


def test_corrupt_dataset_file(tmp_path):
    data_dir = tmp_path / "fashion"
    data_dir.mkdir()
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        (data_dir / name).write_bytes(b"\x1f\x8b not really gzip")
    out = train_cli(
        "--config=configs/fashion_mnist.py:plain",
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert_one_clear_line(out, str(data_dir))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from tests.test_train import tiny_config

    loop.train_and_evaluate(tiny_config("plain", steps=6), tmp_path)
    # Someone edits config.json so that it no longer matches the checkpoint's arrays.
    config = tiny_config("plain", steps=6)
    config.model.widths = (8, 8, 8)
    (tmp_path / "config.json").write_text(config.to_json(indent=2))
    (tmp_path / "results.json").unlink()
    with pytest.raises(UserError, match="cannot read the checkpoint"):
        loop.train_and_evaluate(config, tmp_path)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from tests.test_train import tiny_config

    real_save = ckpt_lib.ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step >= 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", save)
    with pytest.raises(
        UserError, match=r"disk full .* step 12.*previous checkpoint \(step 6\) is intact"
    ):
        loop.train_and_evaluate(tiny_config(steps=12), tmp_path)
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", real_save)
    assert ckpt_lib.Checkpoints(tmp_path, keep=2).latest_step() == 6
    results = loop.train_and_evaluate(tiny_config(steps=12), tmp_path)  # space freed: resume
    assert results["steps"] == 12


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    args = [
        "--config=configs/builtin.py:plain",
        *SMALL,
        "--config.training.num_steps=100000",
        "--config.training.checkpoint_every_steps=100000",
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "rerun the same command to resume" in err
    assert ckpt_lib.Checkpoints(tmp_path, keep=2).latest_step() > 0


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """Kill -9 a run three times at random moments (checkpoints every 3 steps, so some kills
    land inside a checkpoint write); the finished run equals an uninterrupted one."""
    args = [
        "--config=configs/builtin.py:plain",
        *SMALL,
        "--config.training.num_steps=36",
        "--config.training.checkpoint_every_steps=3",
        "--config.training.log_every_steps=3",
        "--config.training.eval_every_steps=12",
        "--config.schedule.warmup_steps=2",
    ]
    reference = train_cli(*args, f"--workdir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-2000:]
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "train.py", *args, f"--workdir={workdir}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # wait for the loop to start (a metrics line), then kill at a random moment
        deadline = time.time() + 240
        metrics = workdir / "metrics.jsonl"
        start = len(metrics.read_text()) if metrics.exists() else 0
        while (
            time.time() < deadline
            and proc.poll() is None
            and not (metrics.exists() and len(metrics.read_text()) > start)
        ):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
    assert kills >= 1
    final = train_cli(*args, f"--workdir={workdir}")
    assert final.returncode == 0, final.stderr[-2000:]
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((workdir / "results.json").read_text())
    assert got["final"] == ref["final"]
    assert got["best"] == ref["best"]


@pytest.mark.slow
def test_compilation_cache_is_reused_and_a_broken_entry_loses_nothing(tmp_path):
    """The persistent compilation cache (training/runtime.py): a second run of the same config
    compiles nothing new and ends exactly as the first; after a run killed while writing the
    cache (here: every entry truncated), JAX recompiles and the result is again the same."""
    cache = tmp_path / "cache"
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_ENABLE_COMPILATION_CACHE="1",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # every program, however quick
        JAX_LOG_COMPILES="1",  # logs each persistent cache hit as a warning
    )
    args = [
        "--config=configs/builtin.py:pooled_max",
        *SMALL,
        "--config.training.num_steps=8",
        "--config.schedule.warmup_steps=2",
    ]

    def run(name: str) -> tuple[dict, str]:
        done = train_cli(*args, f"--workdir={tmp_path / name}", env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads((tmp_path / name / "results.json").read_text()), done.stderr

    first, log = run("first")
    assert "Persistent compilation cache hit" not in log
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_train_step") for name in entries)
    assert any(name.startswith("jit_eval_step") for name in entries)
    second, log = run("second")
    assert log.count("Persistent compilation cache hit") >= 2
    assert "train_step" in log and "eval_step" in log
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new was compiled
    assert second["final"] == first["final"]
    for path in cache.iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    third, log = run("third")
    assert "Error reading persistent compilation cache entry" in log
    assert third["final"] == first["final"]


def test_compilation_cache_settings_leave_the_users_alone(monkeypatch, tmp_path):
    from training import runtime

    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.configure_compilation_cache() == str(tmp_path / "convnets" / "jax")
    assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0.5"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/mine")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3")
    assert runtime.configure_compilation_cache() == "/mine"
    assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "3"
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
    assert runtime.configure_compilation_cache() is None


def test_unwritable_cache_folder_means_no_cache_not_an_error(monkeypatch, tmp_path):
    from training import runtime

    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE"):
        monkeypatch.delenv(name, raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file: no folder can go below it
    assert runtime.configure_compilation_cache() is None
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
