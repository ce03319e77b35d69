"""Bad input ends in one clear line; interruptions and faults lose nothing.

The catalogue of user mistakes goes through the real command line (`train.py`), because what
the user sees there is the point: one line naming the cause, no traceback.
"""

import fcntl
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from errors import UserError
from tests.test_train import metrics_size, wait_for_metrics
from training import checkpoint as ckpt_lib
from training import loop
from training import workdir as workdir_lib

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
        (
            ["--config=configs/builtin.py:plain", "--config.training.ema_decay=1.0"],
            ("training.ema_decay", "[0, 1)"),
        ),
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


def test_missing_config_flag_is_named(tmp_path):
    out = train_cli(f"--workdir={tmp_path}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "both --config and --workdir are required" in out.stderr
    assert "NoneType" not in out.stderr  # was: "unknown config field: 'NoneType' object..."


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


TINY = [  # about tests.test_train.tiny_config as flags: checkpoints at 6 and 12, best at 12
    "--config=configs/builtin.py:pooled_max",
    *SMALL,
    "--config.dataset.validation_size=128",
    "--config.dataset.eval_split=validation",
    "--config.training.num_steps=12",
    "--config.training.log_every_steps=4",
    "--config.training.eval_every_steps=12",
    "--config.training.checkpoint_every_steps=6",
    "--config.training.progress=none",
    "--config.schedule.warmup_steps=2",
]


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 2.5 MiB filesystem (tmpfs): room for TINY's first checkpoint (about 1.4 MB), not
    for the second. Skipped where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(small_filesystem):
    workdir = small_filesystem / "run"
    out = train_cli(*TINY, f"--workdir={workdir}")
    assert_one_clear_line(
        out, "disk full while saving the checkpoint of step 12", "(step 6) is intact"
    )
    assert "RESOURCE_EXHAUSTED" not in out.stderr and "Event loop" not in out.stderr
    assert len(out.stderr.splitlines()) < 40, out.stderr[-3000:]
    assert ckpt_lib.Checkpoints(workdir, keep=2).latest_step() == 6
    assert not list(workdir.glob("*/*.orbax-checkpoint-tmp*"))  # the partial save is freed
    # space freed: the same command resumes from step 6 and finishes
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_filesystem)], check=True)
    out = train_cli(*TINY, f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from the checkpoint of step 6" in out.stderr
    assert json.loads((workdir / "results.json").read_text())["steps"] == 12


@pytest.mark.parametrize(
    "cli, signum, code, said",
    [
        ("train.py", signal.SIGTERM, 143, "stopped by SIGTERM after saving"),
        ("train.py", signal.SIGINT, 130, "stopped by SIGINT (Ctrl-C) after saving"),
        ("experiments", signal.SIGTERM, 143, "stopped by SIGTERM after saving"),
    ],
)
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit(tmp_path, cli, signum, code, said):
    if cli == "train.py":
        command = [
            "train.py",
            "--config=configs/builtin.py:plain",
            *SMALL,
            "--config.training.num_steps=100000",
            "--config.training.checkpoint_every_steps=100000",
            f"--workdir={tmp_path}",
        ]
        workdir = tmp_path
    else:  # the experiment runner, mid-way through one of its runs
        command = ["-m", "experiments", "run", "families:small", "--only=plain", "--seeds=0"]
        command.append(f"--output={tmp_path}")
        workdir = tmp_path / "plain" / "seed_0"
    proc = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_metrics(proc, workdir)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert said in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert ckpt_lib.Checkpoints(workdir, keep=2).latest_step() > 0


def _lock_is_free(workdir: Path) -> bool:
    """Whether no process holds the run's workdir lock (train.py holds it while it runs)."""
    try:
        with open(workdir / workdir_lib.LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two runs side by side: 2 cores")
@pytest.mark.parametrize(
    "how, code",
    [("SIGTERM", 143), ("Ctrl-C", 130), ("kill -9", None)],
)
def test_runs_side_by_side_save_their_checkpoints_however_the_runner_stops(tmp_path, how, code):
    """The experiment runner training two runs side by side (--jobs=2) is stopped by SIGTERM,
    by Ctrl-C (SIGINT to the whole terminal's process group) or by kill -9 (the runner alone):
    each run saves its checkpoint and ends; nothing keeps training in the workdirs."""
    command = ["-m", "experiments", "run", "families:small", "--only=plain", "--seeds=0,1"]
    proc = subprocess.Popen(
        [sys.executable, *command, "--jobs=2", f"--output={tmp_path}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
    )
    workdirs = [tmp_path / "plain" / f"seed_{seed}" for seed in (0, 1)]
    deadline = time.time() + 240
    while time.time() < deadline and not all(
        (w / "metrics.jsonl").exists() and (w / "metrics.jsonl").read_text() for w in workdirs
    ):
        time.sleep(0.1)
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    elif how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.kill()
    _, err = proc.communicate(timeout=120)
    if code is not None:
        assert proc.returncode == code, err[-2000:]
        assert "plain seed 0" in err and "plain seed 1" in err
        assert "after saving the checkpoints of" in err and "rerun the same command" in err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    deadline = time.time() + 120  # after kill -9: the runs end on their own (SIGTERM)
    while time.time() < deadline and not all(_lock_is_free(w) for w in workdirs):
        time.sleep(0.2)
    for workdir in workdirs:
        assert _lock_is_free(workdir), f"{workdir}: still training after the runner stopped"
        assert ckpt_lib.Checkpoints(workdir, keep=2).latest_step() > 0
        assert (
            "stopped by SIGTERM after saving the checkpoint"
            in (tmp_path / "logs" / "plain" / f"{workdir.name}.log").read_text()
            or how == "Ctrl-C"
        )


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
        before = metrics_size(workdir)
        proc = subprocess.Popen(
            [sys.executable, "train.py", *args, f"--workdir={workdir}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # wait for the loop to start (a new metrics line), then kill at a random moment
        wait_for_metrics(proc, workdir, since=before)
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


# --------------------------------------------------------------------------------------------
# Round two: damaged checkpoints, two runs in one workdir, failed first attempts, distributed
# start-up, hand-edited workdir files.


def _checkpoint_data_file(folder: Path) -> Path:
    """The largest data file of a checkpoint (the arrays' bytes)."""
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncated data file", "deleted metadata"])
def test_damaged_checkpoint_is_quarantined_and_the_run_finishes(tmp_path, caplog, damage):
    from tests.test_train import tiny_config

    reference = loop.train_and_evaluate(tiny_config(steps=12), tmp_path / "ref")
    workdir = tmp_path / "run"
    loop.train_and_evaluate(tiny_config(steps=12), workdir)
    (workdir / "results.json").unlink()
    step12 = workdir / "checkpoints" / "12"
    if damage == "truncated data file":
        data_file = _checkpoint_data_file(step12)
        data_file.write_bytes(data_file.read_bytes()[:100])
    else:
        (step12 / "state" / "_METADATA").unlink()
    with caplog.at_level(logging.WARNING):
        results = loop.train_and_evaluate(tiny_config(steps=12), workdir)
    said = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(said) == 1 and "checkpoints/12" in said[0], said
    assert [p.name.split("-")[:2] for p in (workdir / "quarantine").iterdir()] == [
        ["checkpoints", "12"]
    ]
    assert results["final"] == reference["final"] and results["best"] == reference["best"]
    # the step was saved again; later reruns do not trip over it either
    assert ckpt_lib.Checkpoints(workdir, keep=2).latest_step() == 12
    (workdir / "results.json").unlink()
    assert loop.train_and_evaluate(tiny_config(steps=12), workdir)["final"] == reference["final"]


def test_every_checkpoint_damaged_means_a_fresh_start(tmp_path):
    from tests.test_train import tiny_config

    config = tiny_config(steps=6)
    reference = loop.train_and_evaluate(config, tmp_path / "ref")
    loop.train_and_evaluate(config, tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()
    for folder in (tmp_path / "run" / "checkpoints" / "6", tmp_path / "run" / "best" / "6"):
        data_file = _checkpoint_data_file(folder)
        data_file.write_bytes(data_file.read_bytes()[:100])
    results = loop.train_and_evaluate(config, tmp_path / "run")
    assert results["final"] == reference["final"]


def test_two_runs_in_one_workdir_the_second_names_the_first(tmp_path):
    args = [
        "--config=configs/builtin.py:plain",
        *SMALL,
        "--config.training.num_steps=100000",
        "--config.training.checkpoint_every_steps=5",
        f"--workdir={tmp_path}",
    ]
    first = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        wait_for_metrics(first, tmp_path)
        second = train_cli(*args)
        assert_one_clear_line(second, "in use by another run", f"pid {first.pid}", "train.py")
        before = metrics.read_text()
    finally:
        first.kill()  # kill -9: the lock file stays, naming a dead process
        first.wait()
    # the dead run's TensorBoard events are on disk (flushed as they are written)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (events,) = (tmp_path / "tensorboard").iterdir()
    tags = {v.tag for e in EventFileLoader(str(events)).Load() for v in e.summary.value}
    assert "train/loss" in tags
    assert (tmp_path / ".lock").read_text().strip()  # the stale holder's record
    # a third run takes the stale lock over and resumes; SIGTERM it once it trains
    third = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and metrics.read_text() == before:
        time.sleep(0.1)
    third.send_signal(signal.SIGTERM)
    _, err = third.communicate(timeout=120)
    assert third.returncode == 143, err[-2000:]
    assert "taking over the workdir lock left by a run" in err and f"pid {first.pid}" in err
    assert (tmp_path / ".lock").read_text() == ""  # released


def test_workdir_lock_in_one_process(tmp_path):
    from training import workdir as workdir_lib

    lock = workdir_lib.WorkdirLock(tmp_path)
    lock.acquire()
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
        workdir_lib.WorkdirLock(tmp_path).acquire()
    lock.release()
    workdir_lib.WorkdirLock(tmp_path).acquire()  # released: free again


def test_first_attempt_without_checkpoint_is_replaced(tmp_path, caplog):
    from tests.test_train import tiny_config

    too_big = tiny_config(steps=6)
    too_big.training.batch_size = 1024  # larger than the 384 training images
    with pytest.raises(UserError):
        loop.train_and_evaluate(too_big, tmp_path)
    assert (tmp_path / "config.json").exists()
    with caplog.at_level(logging.WARNING):
        loop.train_and_evaluate(tiny_config(steps=6), tmp_path)
    said = [r.getMessage() for r in caplog.records if "first attempt" in r.getMessage()]
    assert len(said) == 1 and "training.batch_size: 1024 -> 32" in said[0]
    # with a checkpoint, another config is still refused
    with pytest.raises(UserError, match="training.batch_size: 32 -> 1024"):
        loop.train_and_evaluate(too_big, tmp_path)


@pytest.mark.parametrize("text", ["{not json", "{}", "[1, 2]"])
def test_hand_edited_config_json_is_one_line(tmp_path, text):
    from tests.test_train import tiny_config

    loop.train_and_evaluate(tiny_config(steps=6), tmp_path)
    (tmp_path / "results.json").unlink()
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=r"config.json (is not JSON|is not a saved config).*delete"):
        loop.train_and_evaluate(tiny_config(steps=6), tmp_path)
    (tmp_path / "config.json").unlink()  # the fix the message gives
    assert loop.train_and_evaluate(tiny_config(steps=6), tmp_path)["steps"] == 6


def test_partial_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from tests.test_train import read_metrics, tiny_config

    loop.train_and_evaluate(tiny_config(steps=12), tmp_path)
    whole = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "results.json").unlink()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "split": "tra')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        loop.train_and_evaluate(tiny_config(steps=12), tmp_path)
    assert any("dropped 1 line(s)" in r.getMessage() for r in caplog.records)
    records = read_metrics(tmp_path)  # every line parses again
    assert len(records) == len(whole.splitlines())


def test_one_test_record_per_step_when_eval_split_is_test(tmp_path):
    from tests.test_train import read_metrics, tiny_config

    config = tiny_config(steps=6)
    config.dataset.eval_split = "test"
    results = loop.train_and_evaluate(config, tmp_path)
    tests = [r for r in read_metrics(tmp_path) if r["split"] == "test"]
    assert [r["step"] for r in tests] == [6]
    assert results["final"]["test"]["accuracy"] == tests[0]["accuracy"]


def test_workdir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    from tests.test_train import tiny_config
    from training import workdir as workdir_lib

    monkeypatch.setenv("HOME", str(tmp_path))
    workdir, lock = workdir_lib.prepare(tiny_config(), "~/runs/x")
    lock.release()
    assert workdir == tmp_path / "runs" / "x" and workdir.is_dir()
    assert not Path("~").exists()


def test_warmup_as_long_as_training_is_capped(caplog):
    from configs import builtin, schema

    config = builtin.get_config()
    config.training.num_steps = 30  # the built-in config warms up for 30 steps
    with caplog.at_level(logging.WARNING):
        schema.validate(config)
    assert config.schedule.warmup_steps == 15
    assert any("warm-up capped at 15 steps" in r.getMessage() for r in caplog.records)


def test_read_only_checkpoints_say_nothing(tmp_path, caplog):
    from tests.test_train import tiny_config

    loop.train_and_evaluate(tiny_config(steps=6), tmp_path)
    with caplog.at_level(logging.INFO):
        ckpt_lib.Checkpoints(tmp_path, keep=2, read_only=True).close()
    assert not [r for r in caplog.records if "read" in r.getMessage() and "only" in r.getMessage()]


def test_distributed_on_without_an_address_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD"))}
    out = train_cli(
        "--config=configs/builtin.py:plain",
        "--config.distributed.initialize=on",
        f"--workdir={tmp_path}",
        env=env,
    )
    assert_one_clear_line(out, "distributed.initialize='on' needs", "coordinator_address")


def test_two_processes_declared_one_started_times_out_with_a_message(tmp_path):
    from tests.test_train import _free_port

    start = time.time()
    out = train_cli(
        "--config=configs/builtin.py:plain",
        "--config.distributed.initialize=on",
        f"--config.distributed.coordinator_address=127.0.0.1:{_free_port()}",
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=0",
        "--config.distributed.initialization_timeout=3",
        f"--workdir={tmp_path}",
        timeout=120,
    )
    assert_one_clear_line(out, "not all 2 processes joined", "within 3 s")
    assert time.time() - start < 60


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "eval.py", "--measures=accuracy", "--nofigures", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_eval_output_folder_is_a_flag_checked_before_the_work(tmp_path):
    from tests.test_train import tiny_config

    workdir = tmp_path / "run"
    loop.train_and_evaluate(tiny_config(steps=6), workdir)
    # a read-only workdir (e.g. another user's run): a read-only bind mount of it
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(workdir), str(readonly)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(readonly)], check=True)
        out = _eval_cli(f"--workdir={readonly}")
        assert_one_clear_line(out, "cannot write the evaluation to", "--output=DIR")
        assert "evaluating step" not in out.stderr  # refused before loading anything
        out = _eval_cli(f"--workdir={readonly}", f"--output={tmp_path / 'elsewhere'}")
        assert out.returncode == 0, out.stderr[-2000:]
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False)
    assert json.loads((tmp_path / "elsewhere" / "eval.json").read_text())["step"] == 6
    assert any((tmp_path / "elsewhere" / "tensorboard").iterdir())
    assert not (workdir / "eval").exists()


def test_a_field_added_to_base_since_the_run_was_saved_does_not_block_the_resume(tmp_path):
    from tests.test_train import tiny_config

    config = tiny_config(steps=6)
    loop.train_and_evaluate(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["training"]["keep_checkpoints"]  # as if the field came with a later version
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "results.json").unlink()
    assert loop.train_and_evaluate(config, tmp_path)["steps"] == 6


def test_cores_from_the_runner_that_name_no_core_are_one_line(tmp_path):
    env = dict(os.environ, CONVNETS_CPU_CORES="a,b")
    out = train_cli("--config=configs/builtin.py:plain", f"--workdir={tmp_path}", env=env)
    assert_one_clear_line(out, "$CONVNETS_CPU_CORES='a,b'", "it names CPU cores")
