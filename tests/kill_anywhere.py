"""Kill-anywhere loop: SIGKILL a real train.py at many moments, then compare with a clean run.

    .venv/bin/python tests/kill_anywhere.py [--kills=20] [--seed=0] [--workdir=/tmp/kill_anywhere]

Trains a small run once uninterrupted (the reference), then restarts the same command in a
second workdir and kills it with SIGKILL again and again, cycling through three moments:
- `checkpoint`: while Orbax writes a checkpoint (a `*.orbax-checkpoint-tmp*` folder exists);
- `evaluation`: after the train record of an evaluation step is written, before its
  evaluation record (the periodic evaluation is running);
- `random`: a uniformly random moment after the loop has started.
Whenever the killed run reaches its end (by itself between kills, or run to the end after the
last kill), the script checks that results.json's final and best metrics, and every
metrics.jsonl record (wall time and images/s aside), equal the reference's, and starts the
killed run over. It prints one line per kill and per check, and a summary; exit status 0 when
every check is equal.
Not collected by pytest (minutes); tests/test_reliability.py has a three-kill version.
"""

import argparse
import contextlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "--config=configs/builtin.py:plain",
    "--config.dataset.builtin_train_size=512",
    "--config.dataset.builtin_test_size=128",
    "--config.dataset.validation_size=128",
    "--config.dataset.eval_split=validation",
    "--config.training.batch_size=32",
    "--config.training.eval_batch_size=64",
    "--config.training.num_steps=72",
    "--config.training.checkpoint_every_steps=3",
    "--config.training.log_every_steps=3",
    "--config.training.eval_every_steps=12",
    "--config.training.progress=none",
    "--config.schedule.warmup_steps=2",
]
EVAL_EVERY = 12
MODES = ("checkpoint", "evaluation", "random")


def start(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", *ARGS, f"--workdir={workdir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def saving(workdir: Path) -> bool:
    return any(
        ".orbax-checkpoint-tmp" in p.name
        for sub in ("checkpoints", "best")
        if (workdir / sub).is_dir()
        for p in (workdir / sub).iterdir()
    )


def evaluating(workdir: Path) -> bool:
    """The last record is the train record of an evaluation step: its evaluation runs."""
    rs = records(workdir)
    return bool(rs) and rs[-1]["split"] == "train" and rs[-1]["step"] % EVAL_EVERY == 0


def attempt(workdir: Path, mode: str, rng: random.Random) -> str | None:
    """Starts train.py and kills it at the `mode` moment; returns what was seen at the kill,
    or None when the run finished (or the moment never came) before."""
    proc = start(workdir)
    count = len(records(workdir))
    started = None
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if started is None and len(records(workdir)) > count:
            started = time.time()  # the loop runs: a new record since the start
            delay = rng.uniform(0.0, 1.5)
        if mode == "checkpoint" and saving(workdir):
            break
        if mode == "evaluation" and started is not None and evaluating(workdir):
            break
        if mode == "random" and started is not None and time.time() - started >= delay:
            break
        time.sleep(0.003)
    if proc.poll() is not None:
        return None
    seen = {"saving": saving(workdir), "evaluating": evaluating(workdir)}
    rs = records(workdir)
    proc.kill()
    proc.wait()
    step = rs[-1]["step"] if rs else 0
    return f"last record step {step}, checkpoint write in flight: {seen['saving']}, " + (
        f"evaluation running: {seen['evaluating']}"
    )


def comparable(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("wall_time", "images_per_s")} for r in rs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/kill_anywhere")
    args = parser.parse_args()
    base = Path(args.workdir)
    shutil.rmtree(base, ignore_errors=True)
    reference, victim = base / "reference", base / "killed"
    begin = time.time()
    done = subprocess.run(
        [sys.executable, "train.py", *ARGS, f"--workdir={reference}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        print(done.stderr[-3000:])
        return 1
    rng = random.Random(args.seed)
    kills = {mode: 0 for mode in MODES}
    checks, since_check, tries = [], 0, 0

    def check() -> None:
        """The killed run has finished: compare it with the reference, then start it over."""
        ref = json.loads((reference / "results.json").read_text())
        got = json.loads((victim / "results.json").read_text())
        same = {
            "final": got["final"] == ref["final"],
            "best": got["best"] == ref["best"],
            "metrics.jsonl": comparable(records(victim)) == comparable(records(reference)),
        }
        aside = victim / "quarantine"
        quarantined = len(list(aside.iterdir())) if aside.exists() else 0
        checks.append((since_check, same))
        print(
            f"run finished after {since_check} kills; identical to the uninterrupted run: "
            + ", ".join(f"{k} {v}" for k, v in same.items())
            + f" (final validation accuracy {got['final']['validation']['accuracy']:.4f}, "
            f"best step {got['best']['step']}; quarantined checkpoints: {quarantined})",
            flush=True,
        )
        shutil.rmtree(victim)

    while sum(kills.values()) < args.kills and tries < 4 * args.kills:
        mode = MODES[tries % len(MODES)]
        tries += 1
        seen = attempt(victim, mode, rng)
        if seen is None:
            if (victim / "results.json").exists():
                check()
                since_check = 0
            continue
        kills[mode] += 1
        since_check += 1
        print(f"kill {sum(kills.values()):2d} ({mode:10s}): {seen}", flush=True)
    if since_check:
        final = subprocess.run(
            [sys.executable, "train.py", *ARGS, f"--workdir={victim}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if final.returncode:
            print(final.stderr[-3000:])
            return 1
        check()
    equal = all(all(same.values()) for _, same in checks)
    print(
        f"{sum(kills.values())} SIGKILLs ({', '.join(f'{k} {v}' for k, v in kills.items())}) "
        f"over {len(checks)} runs to the end, in {time.time() - begin:.0f} s: "
        + ("every run identical to the uninterrupted one" if equal else "DIFFERENCES")
    )
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
