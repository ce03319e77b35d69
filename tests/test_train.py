"""The training loop: learning, data parallelism, multi-host, resume, outputs, real data."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import data
from configs import builtin, fashion_mnist
from errors import UserError
from training import checkpoint as ckpt_lib
from training import loop, runtime
from training import setup as setup_lib
from training import state as state_lib

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "train_worker.py"
FASHION_DIR = Path(fashion_mnist.DEBIAN_DIR)


def tiny_config(preset: str = "pooled_max", steps: int = 12):
    """A run of a few seconds: small built-in dataset, frequent logs, evals and checkpoints."""
    config = builtin.get_config(preset)
    config.dataset.builtin_train_size = 512
    config.dataset.builtin_test_size = 128
    config.dataset.validation_size = 128
    config.dataset.eval_split = "validation"
    config.training.batch_size = 32
    config.training.eval_batch_size = 64
    config.training.num_steps = steps
    config.training.log_every_steps = 4
    config.training.eval_every_steps = 6
    config.training.checkpoint_every_steps = 6
    config.training.progress = "none"
    config.schedule.warmup_steps = 2
    return config


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def metrics_size(workdir: Path) -> int:
    """How many characters WORKDIR/metrics.jsonl holds (0 before it exists)."""
    metrics = workdir / "metrics.jsonl"
    return len(metrics.read_text()) if metrics.exists() else 0


def wait_for_metrics(proc: subprocess.Popen, workdir: Path, since: int = 0, timeout=240) -> bool:
    """Waits while `proc` (a training process) runs until WORKDIR/metrics.jsonl holds more than
    `since` characters: the loop has started (a resumed run appends: pass `metrics_size` from
    before it started). Returns whether it did within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and metrics_size(workdir) <= since:
        time.sleep(0.02)
    return metrics_size(workdir) > since


def test_run_writes_every_output(tmp_path):
    results = loop.train_and_evaluate(tiny_config(), tmp_path)
    for name in ("config.json", "summary.txt", "summary.json", "environment.json", "results.json"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    assert sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    ) == [6, 12]
    assert len([p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]) == 1
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["params"] == json.loads((tmp_path / "summary.json").read_text())["total_params"]
    records = read_metrics(tmp_path)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [4, 6, 8, 12]
    keys = {
        "step",
        "epoch",
        "split",
        "loss",
        "accuracy",
        "learning_rate",
        "images_per_s",
        "wall_time",
    }
    assert keys <= set(train_records[0])
    assert [r["step"] for r in records if r["split"] == "validation"] == [6, 12]
    # Every held-out example is counted exactly once (64-image batches, 128 images).
    assert all(r["count"] == 128 for r in records if r["split"] == "validation")
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["versions"]["jax"] and env["device_count"] >= 1 and "git_commit" in env


def test_itstime_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 11) if loop.itstime(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if loop.itstime(s, 0, 10)] == [10]  # never, but the last


def test_checkpoint_metadata_is_the_loop_record(tmp_path):
    results = loop.train_and_evaluate(tiny_config(steps=12), tmp_path)
    s = setup_lib.setup(tiny_config(steps=12), workdir=tmp_path, steps=())
    s.checkpoints.close()
    record = loop.LoopRecord.from_meta(s.meta)
    assert s.step == 12 and record.to_meta() == s.meta
    assert record.best["step"] == results["best"]["step"]
    assert record.best["accuracy"] == results["best"]["validation"]["accuracy"]
    assert record.train_seconds == results["train_seconds"]
    assert len(record.rates) == len([r for r in read_metrics(tmp_path) if r["split"] == "train"])


def test_same_seed_same_metrics(tmp_path):
    a = loop.train_and_evaluate(tiny_config(steps=6), tmp_path / "a")
    b = loop.train_and_evaluate(tiny_config(steps=6), tmp_path / "b")
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("wall_time", "images_per_s")} for r in rs
    ]
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    assert a["final"] == b["final"]


def test_refuses_workdir_of_another_config(tmp_path):
    loop.train_and_evaluate(tiny_config(steps=6), tmp_path)
    other = tiny_config(steps=6)
    other.optimizer.learning_rate = 0.5
    with pytest.raises(UserError, match=r"optimizer.learning_rate: 0.001 -> 0.5"):
        loop.train_and_evaluate(other, tmp_path)


def test_sigterm_saves_and_rerun_finishes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    full = loop.train_and_evaluate(tiny_config(steps=12), tmp_path / "full")
    real_batches = data.train_batches

    def preempted_after_7(*args, **kwargs):
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if i == 6:  # while step 7 runs, the cluster sends SIGTERM
                signal.raise_signal(signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data, "train_batches", preempted_after_7)
    part = tmp_path / "part"
    with pytest.raises(loop.Preempted, match="step 7"):
        loop.train_and_evaluate(tiny_config(steps=12), part)
    assert ckpt_lib.Checkpoints(part, keep=2).latest_step() == 7
    monkeypatch.setattr(data, "train_batches", real_batches)
    resumed = loop.train_and_evaluate(tiny_config(steps=12), part)
    assert resumed["final"] == full["final"]
    assert resumed["best"] == full["best"]
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("wall_time", "images_per_s")}
        for r in rs
        if r["step"] not in (7, 8)  # preemption logged step 7 alone, then 8
    ]
    assert strip(read_metrics(part)) == strip(read_metrics(tmp_path / "full"))


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path):
    config = tiny_config(steps=12)
    config.optimizer.learning_rate = 1e30
    config.schedule.warmup_steps = 0
    with pytest.raises(loop.Diverged, match=r"at step \d+.*No checkpoint was saved") as error:
        loop.train_and_evaluate(config, tmp_path)
    assert "step 0" not in str(error.value)
    # the fixed command may reuse the workdir: no checkpoint, so its config is replaced
    fixed = tiny_config(steps=12)
    fixed.training.checkpoint_every_steps = 3
    assert loop.train_and_evaluate(fixed, tmp_path)["steps"] == 12
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 1e-3
    assert all(r["step"] > 0 for r in read_metrics(tmp_path))
    # a divergence after a checkpoint names it (the warm-up's first step has learning rate 0)
    late = tiny_config(steps=12)
    late.optimizer.learning_rate = 1e30
    late.schedule.warmup_steps = 4
    late.training.checkpoint_every_steps = 1
    with pytest.raises(loop.Diverged, match=r"last good checkpoint is step [12] .*new --workdir"):
        loop.train_and_evaluate(late, tmp_path / "late")


def test_nonfinite_loss_can_skip_updates(tmp_path, caplog):
    config = tiny_config(steps=6)
    config.optimizer.learning_rate = 1e30
    config.schedule.warmup_steps = 0
    config.training.on_nonfinite_loss = "skip"
    with caplog.at_level(logging.WARNING):
        results = loop.train_and_evaluate(config, tmp_path)
    assert results["skipped_updates"] > 0
    said = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert said == [
        f"skipped {results['skipped_updates']} of 6 updates for a non-finite loss "
        "(training.on_nonfinite_loss=skip); the results come from the others"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", ["plain", "plain_local", "pooled_max", "allcnn_c", "resnet20", "mlp"]
)
def test_every_family_learns(tmp_path, preset):
    """On a fixed small training set, a few dozen steps lower the loss and raise accuracy."""
    config = tiny_config(preset, steps=40)
    config.dataset.builtin_train_size = 64 + 128
    config.training.batch_size = 64
    config.dataset.augment_crop_padding = 0
    config.dataset.augment_flip = False
    config.training.log_every_steps = 10
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.schedule.name = "constant"
    config.training.eval_every_steps = 40
    config.training.checkpoint_every_steps = 40
    if config.model.name == "allconv":
        # Without BatchNorm, All-CNN-C's loss sits at ln 10 for far longer than 40 steps (its
        # known initial plateau), and dropout 0.5 would hide the fit: test the family's
        # machinery with BatchNorm and no dropout.
        config.model.dropout = config.model.input_dropout = 0.0
        config.model.norm = "batch"
    loop.train_and_evaluate(config, tmp_path)
    records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.2


def _run_worker(out: Path, devices: int, *cluster: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    # XLA's kernels on every device count: one device would otherwise take oneDNN's, whose
    # float rounding differs (compared with XLA's in tests/test_onednn.py), not what this tests
    env["CONVNETS_ONEDNN"] = "0"
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "resnet20", "3", *cluster],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def _compare(a: Path, b: Path) -> None:
    x, y = np.load(a), np.load(b)
    assert int(x["devices"]) != int(y["devices"])
    for key in x.files:
        if key != "devices":
            np.testing.assert_allclose(x[key], y[key], rtol=2e-4, atol=2e-5, err_msg=key)


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
    """Same global batch on 8 simulated devices and on 1: same parameters and BN statistics."""
    one, eight = _run_worker(tmp_path / "1.npz", 1), _run_worker(tmp_path / "8.npz", 8)
    _wait(one)
    _wait(eight)
    _compare(tmp_path / "1.npz", tmp_path / "8.npz")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
    """Two jax.distributed processes on 127.0.0.1 (2 CPU devices each) agree with 1 device."""
    port = str(_free_port())
    procs = [_run_worker(tmp_path / "2x2.npz", 2, str(i), "2", port) for i in range(2)]
    single = _run_worker(tmp_path / "1.npz", 1)
    for proc in [*procs, single]:
        _wait(proc)
    _compare(tmp_path / "1.npz", tmp_path / "2x2.npz")


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_like_an_uninterrupted_run(tmp_path):
    def cli(workdir: Path) -> subprocess.Popen:
        args = [
            "--config=configs/builtin.py:plain",
            f"--workdir={workdir}",
            "--config.dataset.builtin_train_size=512",
            "--config.dataset.builtin_test_size=128",
            "--config.training.batch_size=32",
            "--config.training.num_steps=40",
            "--config.training.checkpoint_every_steps=5",
            "--config.training.log_every_steps=5",
            "--config.training.eval_every_steps=20",
            "--config.schedule.warmup_steps=2",
            "--config.training.eval_batch_size=64",
        ]
        return subprocess.Popen(
            [sys.executable, "train.py", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    reference = cli(tmp_path / "ref")
    _wait(reference)
    victim = cli(tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"step": 15' in metrics.read_text()):
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    _wait(cli(tmp_path / "killed"))
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert got["final"] == ref["final"] and got["best"] == ref["best"]


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_reaches_85_percent(tmp_path):
    config = fashion_mnist.get_config("pooled_max")
    config.training.num_steps = 600
    config.training.eval_every_steps = 300
    config.training.checkpoint_every_steps = 300
    config.training.progress = "none"
    results = loop.train_and_evaluate(config, tmp_path)
    assert results["final"]["test"]["count"] == 10_000
    assert results["test_accuracy"] >= 0.85, results


def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
    config = tiny_config("resnet20", steps=6)
    config.model.dtype = "bfloat16"
    results = loop.train_and_evaluate(config, tmp_path)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path) if "loss" in r)
    graphdef, state = state_lib.create_train_state(
        config, data.dataset_info(config.dataset), runtime.make_mesh()
    )
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
    assert results["steps"] == 6


def test_abstract_train_state_describes_the_created_state():
    # what a restore (train.py's resume, eval.py) reads a checkpoint into
    config = tiny_config("resnet20", steps=1)
    info, mesh = data.dataset_info(config.dataset), runtime.make_mesh()
    graphdef, state = state_lib.create_train_state(config, info, mesh)
    abstract_graphdef, abstract = state_lib.abstract_train_state(config, info, mesh)
    assert abstract_graphdef == graphdef
    leaves, abstract_leaves = jax.tree.leaves(state), jax.tree.leaves(abstract)
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    for array, spec in zip(leaves, abstract_leaves, strict=True):
        assert (spec.shape, spec.dtype, spec.sharding) == (array.shape, array.dtype, array.sharding)


def test_weight_averaging_follows_its_recurrence_and_every_evaluation_uses_it(tmp_path):
    """training.ema_decay: the state keeps the moving average of the parameters and BatchNorm
    statistics, ema_t = r_t ema_(t-1) + (1 - r_t) w_t with r_t = min(decay, (1 + t) / (10 + t)),
    the periodic and final evaluations and eval.py measure it, and a run resumes with it."""
    config = tiny_config("resnet20", steps=6)
    config.training.ema_decay = 0.8
    s = setup_lib.setup(config)
    state, batches = s.state, s.train_batches(start_step=0)
    weights = lambda state: jax.device_get(  # copied: the train step donates the state
        {"params": state["params"], "batch_stats": state["batch_stats"]}
    )
    expected = weights(state)
    for t in range(6):
        state, _ = s.train_step(state, next(batches))
        rate = min(0.8, (1 + t) / (10 + t))
        new = weights(state)
        expected = jax.tree.map(lambda e, w, r=rate: r * e + (1 - r) * w, expected, new)
    for e, got in zip(jax.tree.leaves(expected), jax.tree.leaves(state["ema"]), strict=True):
        np.testing.assert_allclose(got, e, rtol=1e-5, atol=1e-6)
    averaged, last = jax.tree.leaves(state["ema"]["params"]), jax.tree.leaves(state["params"])
    assert not all(np.allclose(a, b) for a, b in zip(averaged, last, strict=True))
    # evaluation measures the average: the raw weights do not matter, the average does
    test = s.test_split()
    zeroed = dict(state, params=jax.tree.map(np.zeros_like, state["params"]))
    raw = dict(state, ema={"params": state["params"], "batch_stats": state["batch_stats"]})
    with_ema = s.evaluate(state, test)
    assert s.evaluate(zeroed, test) == with_ema and s.evaluate(raw, test) != with_ema
    # a whole run: its final test accuracy is the average's, and eval.py restores it
    results = loop.train_and_evaluate(config, tmp_path)
    from evaluation import run as run_lib

    run = run_lib.load_run(tmp_path)
    assert "ema" in run.state
    assert run.setup.evaluate(run.state, run.splits.test)["accuracy"] == pytest.approx(
        results["final"]["test"]["accuracy"]
    )
