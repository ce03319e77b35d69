"""Runs an experiment's missing runs (resuming interrupted ones) and lists or scripts them."""

import shlex
from collections.abc import Callable
from pathlib import Path

from absl import logging

import configs
from errors import UserError
from experiments import Experiment, Run

TRAINED = "results.json"
EVALUATED = "eval/latest/eval.json"


def run_dir(output: Path, run: Run, seed: int) -> Path:
    """Returns the workdir of `run` with `seed` inside the experiment's output folder."""
    return Path(output).expanduser() / run.name / f"seed_{seed}"


def runs_flag(output: Path, runs: Path) -> str:
    """' --runs=DIR' when the runs live in another folder than the report, else ''."""
    return "" if Path(runs) == Path(output) else f" --runs={runs}"


def config_mismatch(workdir: Path, run: Run, seed: int) -> list[str]:
    """The fields where the run saved in `workdir` differs from `run` with `seed` ([] when it
    is that run). Raises UserError when the saved config.json cannot be read."""
    from configs import schema
    from training import workdir as workdir_lib

    saved = workdir_lib.read_config(Path(workdir) / "config.json")
    config = build_config(run, seed)
    schema.cap_warmup(config, quiet=True)  # as training saved it
    return workdir_lib.differences_from(saved, config)


def build_config(run: Run, seed: int):
    """Returns the resolved ConfigDict of `run` with `seed`."""
    config = configs.load(run.config)
    configs.override(config, run.overrides)
    config.seed = seed
    return config


def run_missing(
    experiment: Experiment,
    output: Path,
    only: tuple[str, ...] = (),
    train: Callable | None = None,
    evaluate: Callable | None = None,
) -> list[Path]:
    """Trains and evaluates every run (or the runs named in `only`) that has no results yet;
    returns the workdirs it touched. `train(config, workdir)` defaults to classification's
    `training.loop.train_and_evaluate` and `evaluate(workdir, max_shift=)` to eval.py's
    `evaluation.evaluate_workdir`; another task (detection) passes its own train and no
    evaluate when its training already evaluates.

    A run with a results.json is skipped when its folder holds that run's config; a folder
    holding another config's finished run is refused with one line (UserError). An
    interrupted one resumes from its checkpoint (train.py does that), so rerunning after a
    crash loses at most one checkpoint interval; a folder of another config without a
    checkpoint is retrained with this run's config, and one with a checkpoint is refused.
    """
    if train is None:  # deferred: importing JAX is slow
        import evaluation
        from training import loop

        train, evaluate = loop.train_and_evaluate, evaluation.evaluate_workdir
    names = [run.name for run in experiment.runs]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise UserError(
            f"--only names no run of {experiment.name}: {', '.join(unknown)}; its runs are "
            f"{', '.join(names)}"
        )
    touched = []
    for run in experiment.runs:
        if only and run.name not in only:
            continue
        for seed in experiment.seeds:
            workdir = run_dir(output, run, seed)
            if (workdir / TRAINED).exists():
                _check_finished(workdir, run, seed)
            else:
                logging.info("training %s seed %d in %s", run.name, seed, workdir)
                train(build_config(run, seed), workdir)
                touched.append(workdir)
            if evaluate is not None and not (workdir / EVALUATED).exists():
                evaluate(workdir, max_shift=experiment.max_shift)
                touched.append(workdir)
    return touched


def _check_finished(workdir: Path, run: Run, seed: int) -> None:
    differences = config_mismatch(workdir, run, seed)
    if differences:
        raise UserError(
            f"{workdir} holds a finished run of another config than {run.name} seed {seed} "
            f"({'; '.join(differences)}); move it aside or use another --output."
        )


def _flag_value(value) -> str:
    if isinstance(value, tuple | list):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


# Per task (Experiment.task): the program that trains a run (with --config, --workdir and
# --config.* flags), the one that evaluates it into WORKDIR/eval/latest/eval.json (its extra
# flags), and the one that reports the experiment.
PROGRAMS = {
    "classification": ("python train.py", "python eval.py", "--max_shift={max_shift}"),
    "detection": ("python -m detection train", "python -m detection eval", "--checkpoint=latest"),
}
REPORT_PROGRAMS = {
    "classification": "python -m experiments report",
    "detection": "python -m experiments.detection report",
}


def _train_eval_commands(experiment: Experiment, output: Path) -> list[tuple[Path, str, str]]:
    """(workdir, train command, eval command) per (run, seed), in the experiment's order."""
    train, evaluate, eval_flags = PROGRAMS[experiment.task]
    out = []
    for run in experiment.runs:
        for seed in experiment.seeds:
            workdir = run_dir(output, run, seed)
            args = [f"--config={run.config}", f"--workdir={workdir}", f"--config.seed={seed}"]
            args += [f"--config.{k}={_flag_value(v)}" for k, v in run.overrides.items()]
            train_cmd = " ".join([train, *map(shlex.quote, args)])
            eval_cmd = f"{evaluate} --workdir={shlex.quote(str(workdir))} " + eval_flags.format(
                max_shift=experiment.max_shift
            )
            out.append((workdir, train_cmd, eval_cmd))
    return out


def commands(experiment: Experiment, output: Path) -> list[str]:
    """Returns one shell command per (run, seed): train, then evaluate, in its own workdir."""
    return [f"{t} && {e}" for _, t, e in _train_eval_commands(experiment, output)]


# Seconds before the time limit at which SLURM sends SIGTERM to the run (--signal): enough for
# train.py to finish its step and write a checkpoint.
SLURM_SIGNAL_SECONDS = 120


def slurm_script(experiment: Experiment, output: Path, spec: str, runs: Path | None = None) -> str:
    """Returns a SLURM job-array script: one array task per run; each task's training uses
    every GPU of its allocation and, over several nodes, jax.distributed (auto-detected).

    The script installs the project with JAX's plugin for the node's accelerator once per
    environment (`CONVNETS_EXTRA`: auto, from the NVIDIA driver; cuda12, cuda13, tpu or none),
    passes SIGTERM on to the run (SLURM's `--signal` before the time limit, a preemption) so
    that train.py saves a checkpoint and exits 143, then requeues its own array task, which
    resumes from that checkpoint. What a run has done is skipped: training when results.json
    exists, evaluation when eval/latest/eval.json does.
    """
    # Long because the bash script it returns is written out here, as the user will read it.
    runs = Path(runs) if runs is not None else Path(output)
    runs_given = runs_flag(output, runs)
    report = REPORT_PROGRAMS[experiment.task]
    entries = _train_eval_commands(experiment, runs)

    def array(values) -> str:
        return "\n".join(f"  {shlex.quote(str(v))}" for v in values)

    workdirs = array(w for w, _, _ in entries)
    trains = array(t for _, t, _ in entries)
    evals = array(e for _, _, e in entries)
    return rf"""#!/bin/bash
# SLURM job array for the experiment {spec}: {len(entries)} runs, one per array task.
# Submit from the project root: sbatch {output}/slurm.sh
#   JAX's accelerator plugin: CONVNETS_EXTRA=cuda12|cuda13|tpu|none sbatch {output}/slurm.sh
#   (default auto: cuda13 for an NVIDIA driver >= 580, cuda12 below, none without one); the
#   first task installs it into $CONVNETS_VENV (default .venv), the others wait for it.
# Then, when all tasks are done: {report} {spec} --output={output}{runs_given}
# Adjust the resources to your cluster. With --nodes>1, train.py starts jax.distributed from
# SLURM's environment (config.distributed.initialize=auto) and trains on every node's devices.
# Time limit and preemption: SLURM sends SIGTERM {SLURM_SIGNAL_SECONDS} s before the limit
# (--signal), or when it preempts the job; train.py then saves a checkpoint and exits 143, and
# this script requeues its array task (--requeue), which resumes from that checkpoint. A task
# whose run is already trained and evaluated does nothing.
#SBATCH --job-name={experiment.name}
#SBATCH --array=0-{len(entries) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@{SLURM_SIGNAL_SECONDS}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={output}/slurm-%A_%a.out
set -uo pipefail
TASK=${{SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a job array}}
WORKDIRS=(
{workdirs}
)
TRAIN=(
{trains}
)
EVAL=(
{evals}
)

# --- The environment: the project and JAX's plugin, installed once (one task at a time).
VENV=${{CONVNETS_VENV:-.venv}}
EXTRA=${{CONVNETS_EXTRA:-auto}}
if [[ $EXTRA == auto ]]; then
  driver=$(sed -n 's/.*Kernel Module[^0-9]*\([0-9][0-9]*\)\..*/\1/p' \
    /proc/driver/nvidia/version 2>/dev/null | head -n 1)
  if [[ -z $driver ]]; then EXTRA=none
  elif (( driver >= 580 )); then EXTRA=cuda13
  else EXTRA=cuda12
  fi
fi
TARGET=.
[[ $EXTRA == none ]] || TARGET=".[$EXTRA]"
STAMP=$VENV/.installed-slurm-$EXTRA
if [[ ! $STAMP -nt pyproject.toml ]]; then
  mkdir -p "$VENV"
  (
    flock 9
    if [[ ! $STAMP -nt pyproject.toml ]]; then
      echo "slurm.sh: installing $TARGET into $VENV"
      [[ -x $VENV/bin/python ]] || "${{CONVNETS_PYTHON:-python3}}" -m venv "$VENV"
      "$VENV/bin/python" -m pip install --quiet -e "$TARGET" && touch "$STAMP"
    fi
  ) 9>"$VENV/.install.lock" || {{ echo "slurm.sh: installing $TARGET failed" >&2; exit 1; }}
fi
source "$VENV/bin/activate"

# --- The run: what is done is skipped.
workdir=${{WORKDIRS[$TASK]}}
steps=()
[[ -e $workdir/results.json ]] || steps+=("${{TRAIN[$TASK]}}")
[[ -e $workdir/eval/latest/eval.json ]] || steps+=("${{EVAL[$TASK]}}")
if (( ${{#steps[@]}} == 0 )); then
  echo "slurm.sh: $workdir is trained and evaluated; nothing to do"
  exit 0
fi

# Runs a command in the background, passes SIGTERM on to it and waits until it has ended
# (train.py saves a checkpoint first); returns its exit status.
forward_term() {{
  "$@" &
  local child=$! rc
  trap 'kill -TERM "$child" 2>/dev/null' TERM
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - TERM
  return "$rc"
}}
export -f forward_term
chain=$(printf 'forward_term %s && ' "${{steps[@]}}")
forward_term srun bash -c "${{chain% && }}"
rc=$?
if (( rc == 143 )); then
  echo "slurm.sh: stopped by SIGTERM after saving a checkpoint; requeueing" \
    "${{SLURM_ARRAY_JOB_ID}}_$TASK to resume"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_$TASK" || true
  exit 0
fi
exit "$rc"
"""
