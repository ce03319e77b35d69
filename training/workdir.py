"""A run's workdir: created or checked against the config it holds, and its static files.

Layout: config.json, summary.txt / summary.json, environment.json (written here);
metrics.jsonl and tensorboard/ (training.metrics); checkpoints/ and best/
(training.checkpoint); results.json (training.loop).
"""

import json
from pathlib import Path

import ml_collections

from errors import UserError
from models import summary as model_summary
from training import runtime

# Fields that may change when resuming a run; any other difference is refused.
RESUMABLE_CHANGES = ("training.progress", "distributed.")


def prepare(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Creates `workdir`, or checks that the config saved there matches `config` for a resume.

    Raises UserError when the workdir is not writable or holds a run of another config.
    """
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir."
        ) from e
    saved = workdir / "config.json"
    if saved.exists():
        differences = config_differences(
            json.loads(saved.read_text()), json.loads(config.to_json())
        )
        differences = [d for d in differences if not d.startswith(RESUMABLE_CHANGES)]
        if differences:
            raise UserError(
                f"workdir {workdir} holds a run of a different config; differing fields: "
                + "; ".join(differences)
                + ". Use a new --workdir, or rerun with the saved config to resume."
            )
    return workdir


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
