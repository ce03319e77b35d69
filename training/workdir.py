"""A run's workdir: created or checked against the config it holds, owned by one run at a time,
and its static files.

Layout: config.json, summary.txt / summary.json, environment.json (written here); .lock (the
advisory lock of the run that owns the workdir); metrics.jsonl and tensorboard/
(training.metrics); checkpoints/, best/ and quarantine/ (training.checkpoint); results.json
(training.loop).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import ml_collections
from absl import logging

from errors import UserError
from models import summary as model_summary
from training import runtime

# Fields that may change when resuming a run; any other difference is refused.
RESUMABLE_CHANGES = ("training.progress", "distributed.")
LOCK = ".lock"


def expand(workdir: str | Path) -> Path:
    """The workdir as a path: `~` and `~user` expanded (a flag value is not expanded by the
    shell when written as --workdir=~/x)."""
    return Path(os.path.expanduser(str(workdir)))


def read_config(path: Path) -> dict:
    """Returns the config saved in `path` (a workdir's config.json) as a dict.

    Raises UserError naming the file and the fix when it is not a saved config (not JSON, not
    an object, or without the config's sections, e.g. `{}` after a hand edit).
    """
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"is not JSON ({e})"
    except OSError as e:
        problem = f"cannot be read ({e.strerror})"
    else:
        if isinstance(saved, dict) and {"model", "training", "dataset"} <= set(saved):
            return saved
        problem = "is not a saved config (no model/dataset/training sections)"
    raise UserError(
        f"{path} {problem}. train.py writes it from the config of the run: restore it, or "
        "delete it to resume with the config given now (a checkpoint that does not fit that "
        "config is still refused)."
    )


def differences_from(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The fields where `config` differs from a saved config, except those a resume may change.

    A field added to configs/base.py after the run was saved counts as saved with its default
    (as `configs.from_json` reads it), so a new version of the project still resumes old runs.
    """
    import configs

    saved = json.loads(configs.from_json(json.dumps(saved)).to_json())
    differences = config_differences(saved, json.loads(config.to_json()))
    return [d for d in differences if not d.startswith(RESUMABLE_CHANGES)]


def has_checkpoint(workdir: Path) -> bool:
    """Whether the workdir holds a finished checkpoint or results (what a resume builds on)."""
    if (workdir / "results.json").exists():
        return True
    return any(
        p.name.isdigit()
        for sub in ("checkpoints", "best")
        if (workdir / sub).is_dir()
        for p in (workdir / sub).iterdir()
    )


class WorkdirLock:
    """An advisory lock (fcntl.flock) on WORKDIR/.lock, held by one run for its whole length.

    The file names the holder (pid, host, start time, command) for the message another run
    gets. The kernel drops the lock when its process ends, however it ends (kill -9 included),
    so a lock left by a dead run is simply taken over; the file's stale text is only a record.
    flock is advisory and local: two hosts sharing a workdir over NFS may not see each other's
    lock (depends on the NFS setup).
    """

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK
        self._file = None

    def acquire(self) -> None:
        f = open(self.path, "a+")  # noqa: SIM115 -- held open for the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = _describe_holder(f.read())
            f.close()
            raise UserError(
                f"workdir {self.path.parent} is in use by another run ({holder}); wait for it "
                "to finish, stop it, or use another --workdir."
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            logging.info(
                "taking over the workdir lock left by a run that ended without releasing it (%s)",
                _describe_holder(previous),
            )
        f.seek(0)
        f.truncate()
        holder = {
            "pid": os.getpid(),
            "host": platform.node(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": shlex.join([sys.executable, *sys.argv]),
        }
        f.write(json.dumps(holder) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        self._file.truncate(0)  # an empty file: released cleanly
        self._file.close()  # closing drops the lock
        self._file = None


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder unknown"


def require_writable(folder: Path, message: str) -> Path:
    """Creates `folder` and writes (then removes) a probe file there; returns the folder.
    Raises UserError with `message`, formatted with `folder` and `reason`, when it cannot."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("probe")
        probe.unlink()
    except OSError as e:
        raise UserError(message.format(folder=folder, reason=e.strerror)) from e
    return folder


def prepare(
    config: ml_collections.ConfigDict, workdir: str | Path, *, lock: bool = True
) -> tuple[Path, WorkdirLock | None]:
    """Creates `workdir` and locks it for this run (when `lock`), then checks that the config
    saved there matches `config` for a resume. Returns the workdir and the held lock.

    `lock`: whether this process owns the workdir (process 0 of a run; it alone also sets a
    replaced attempt's files aside). A saved config that differs is replaced when the workdir
    holds no checkpoint (a first attempt that failed before its first checkpoint), with one
    log line naming the differences; with a checkpoint it is refused. Raises UserError when the
    workdir is not writable, is in use by another run, or holds a run of another config.
    """
    workdir = expand(workdir)
    require_writable(
        workdir, "workdir {folder} is not writable ({reason}); choose another --workdir."
    )
    held = None
    if lock:
        held = WorkdirLock(workdir)
        held.acquire()
    try:
        _check_saved_config(config, workdir, chief=lock)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return workdir, held


def _check_saved_config(config: ml_collections.ConfigDict, workdir: Path, chief: bool) -> None:
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    resumable = has_checkpoint(workdir)
    try:
        saved = read_config(saved_path)
    except UserError:
        if resumable:
            raise
        logging.warning("replacing %s, which is not a saved config (no checkpoint)", saved_path)
        return
    differences = differences_from(saved, config)
    if not differences:
        return
    if not resumable:
        logging.warning(
            "workdir %s held a first attempt of another config that saved no checkpoint; "
            "replacing it with this config (%s)",
            workdir,
            "; ".join(differences),
        )
        if chief:  # the old attempt's records would mix with this run's: set them aside
            aside = workdir / "quarantine" / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            for name in ("config.json", "metrics.jsonl", "tensorboard"):
                if (workdir / name).exists():
                    aside.mkdir(parents=True, exist_ok=True)
                    (workdir / name).rename(aside / name)
        return
    raise UserError(
        f"workdir {workdir} holds a run of a different config; differing fields: "
        + "; ".join(differences)
        + ". Use a new --workdir, or rerun with the saved config to resume."
    )


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Returns 'field: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def write_run_files(workdir: Path, config: ml_collections.ConfigDict, specs) -> None:
    """Writes config.json, the architecture summary (txt and json) and environment.json."""
    (workdir / "config.json").write_text(config.to_json(indent=2))
    (workdir / "summary.txt").write_text(model_summary.format_table(specs) + "\n")
    (workdir / "summary.json").write_text(json.dumps(model_summary.to_json(specs), indent=2))
    (workdir / "environment.json").write_text(json.dumps(runtime.environment(), indent=2))
