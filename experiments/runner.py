"""Runs an experiment's missing runs (resuming interrupted ones) and lists or scripts them."""

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import logging

import configs
from errors import UserError
from experiments import Experiment, Run
from training import runtime

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
    touched = []
    for run in _selected(experiment, only):
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


def _selected(experiment: Experiment, only: tuple[str, ...]) -> list[Run]:
    """The runs named in `only` (all when it is empty); UserError for a name of no run."""
    names = [run.name for run in experiment.runs]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise UserError(
            f"--only names no run of {experiment.name}: {', '.join(unknown)}; its runs are "
            f"{', '.join(names)}"
        )
    return [run for run in experiment.runs if not only or run.name in only]


def _check_finished(workdir: Path, run: Run, seed: int) -> None:
    differences = config_mismatch(workdir, run, seed)
    if differences:
        raise UserError(
            f"{workdir} holds a finished run of another config than {run.name} seed {seed} "
            f"({'; '.join(differences)}); move it aside or use another --output."
        )


# --- Run records: what a finished run leaves besides its checkpoints.
#
# A run's record (its config, results, test evaluation, learning curve and environment, about
# 100-200 kB) is all `report` and `run` read from a finished run: copied into another folder
# (`archive`), it regenerates the report and counts as done for `run`, without the
# checkpoints (megabytes to hundreds of megabytes each). The committed reports keep their
# runs' records beside them this way, so a report can be rebuilt, or extended with more seeds,
# on a machine that never held the checkpoints.
RECORD_FILES = (
    "config.json",
    TRAINED,
    EVALUATED,
    "environment.json",
    "metrics.jsonl",
    "summary.json",
)


def archive(experiment: Experiment, runs: Path, dest: Path) -> tuple[list[str], list[str]]:
    """Copies the record (RECORD_FILES) of every finished run of `experiment` in `runs` into
    `dest`, laid out as `runs` is (DEST/<run>/seed_<seed>/). Returns the runs copied and those
    not finished (not trained, or not evaluated when the task evaluates separately), each as
    'name seed N'. A record already in `dest` is kept when it is the same run's and refused
    (UserError) when it differs, so an archive is never overwritten in silence."""
    copied, unfinished = [], []
    for run in experiment.runs:
        for seed in experiment.seeds:
            label, workdir = f"{run.name} seed {seed}", run_dir(runs, run, seed)
            trained = (workdir / TRAINED).exists()
            evaluated = not SEPARATE_EVAL[experiment.task] or (workdir / EVALUATED).exists()
            if not (trained and evaluated):
                unfinished.append(label)
                continue
            _check_finished(workdir, run, seed)
            target = run_dir(dest, run, seed)
            if (target / TRAINED).exists():
                changed = [
                    name
                    for name in RECORD_FILES
                    if (workdir / name).exists()
                    and (
                        not (target / name).exists()
                        or (target / name).read_bytes() != (workdir / name).read_bytes()
                    )
                ]
                if changed:
                    raise UserError(
                        f"{target} already holds a record of {label} that differs from "
                        f"{workdir}'s ({', '.join(changed)}); remove that folder to archive "
                        "this run instead, or archive into another folder."
                    )
                continue
            for name in sorted(RECORD_FILES, key=lambda n: n == TRAINED):  # results.json last
                if (workdir / name).exists():
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(workdir / name, target / name)
            copied.append(label)
    return copied, unfinished


# --- Several runs at once: each its own train.py / eval.py process on its own CPU cores.
#
# On a CPU a small run uses two cores little better than one (measured on this project's
# 2-core machine, families:small: ResNet-20 600 steps in 33.5 s on both cores, 35.5 s on one;
# two such runs side by side, one core each, 37.6 s for both), so an experiment's runs finish
# sooner side by side than one after another. Each run's cores are fixed when it starts, and
# its environment.json records how many it had.

JOBS_HELP = (
    "run: how many runs train at once, each its own train/eval process on its share of the CPU "
    "cores (output in RUNS/logs/). auto: one per CPU core, at most the runs left to train, and "
    "one (in this process) when a GPU or TPU is visible. 1: one after another, in this process."
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOGS = "logs"  # <runs folder>/logs/<run>/seed_<seed>.log: the output of a run's programs
_POLL_SECONDS = 0.2


class Stopped(Exception):
    """SIGTERM or SIGINT (Ctrl-C) reached the runner while runs trained side by side: each was
    passed SIGTERM, saved its checkpoint and stopped. `exit_code` as `training.loop.Preempted`."""

    def __init__(self, signum: int, stopped: Sequence[str]):
        name = runtime.signal_name(signum)
        saved = f" the checkpoints of {', '.join(stopped)}" if stopped else ""
        super().__init__(
            f"stopped by {name} after saving{saved or ' what was running'}; "
            "rerun the same command to resume"
        )
        self.signum, self.exit_code = signum, 128 + signum


def run(
    experiment: Experiment,
    output: Path,
    only: tuple[str, ...] = (),
    jobs: int | None = None,
    train: Callable | None = None,
) -> list[Path]:
    """Trains (and evaluates) what `experiment` still lacks in `output`: side by side on the
    CPU cores (`run_parallel`) when `jobs` (None: auto, see `job_cores`) comes to more than
    one, else one run after another in this process (`run_missing`, with `train` when the
    task brings its own); returns the workdirs it touched."""
    pending = pending_jobs(experiment, output, only)
    groups = job_cores(jobs, len(pending))
    if len(groups) <= 1:
        return run_missing(experiment, output, only, train=train)
    logging.info("%d runs to do, %d at a time: CPU cores %s", len(pending), len(groups), groups)
    return run_parallel(pending, groups)


def parse_jobs(value: str) -> int | None:
    """--jobs: None for 'auto', else a positive number; UserError otherwise."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"--jobs={value}: use auto or a number of runs at once (1 or more).")


def job_cores(
    jobs: int | None,
    pending: int,
    cores: Sequence[int] | None = None,
    accelerator: str | None = None,
) -> list[tuple[int, ...]]:
    """The CPU cores of each of the runs that train at once: `jobs` groups of the cores this
    process may use (`cores`, default its affinity), split evenly (the first groups get the
    cores left over). `jobs` None (auto): one run per core, at most `pending` (the runs left
    to train), or one when an accelerator is visible (`accelerator`, default the runtime's
    detection: its runs would share one device). UserError for more jobs than cores, or for
    several on an accelerator."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if accelerator is None:
        accelerator = runtime.visible_gpu() or runtime.visible_tpu()
    if jobs is None:
        jobs = 1 if accelerator else max(1, min(len(cores), pending))
    elif jobs > 1 and accelerator:
        raise UserError(
            f"--jobs={jobs}: runs side by side would share one accelerator ({accelerator}); "
            "use --jobs=1, or `python -m experiments slurm` for a cluster."
        )
    elif jobs > len(cores):
        raise UserError(
            f"--jobs={jobs}: more runs at once than the {len(cores)} CPU cores this process may "
            f"use; use --jobs={len(cores)} or fewer."
        )
    size, extra = divmod(len(cores), jobs)
    groups, start = [], 0
    for i in range(jobs):
        end = start + size + (i < extra)
        groups.append(tuple(cores[start:end]))
        start = end
    return groups


@dataclasses.dataclass
class _Job:
    """A run's programs still to do (train and/or evaluate), run one after another."""

    label: str  # 'plain seed 0'
    workdir: Path
    steps: list[list[str]]  # argument lists, 'python' first
    log: Path
    started: float = 0.0
    program: str = ""  # of the running process: 'train.py', 'eval.py', 'detection'
    proc: subprocess.Popen | None = None


def pending_jobs(experiment: Experiment, output: Path, only: tuple[str, ...] = ()) -> list[_Job]:
    """The (run, seed) pairs of `experiment` (or of the runs in `only`) not yet trained or
    evaluated, with the programs each still needs. A finished run of another config is refused
    (UserError), as `run_missing` does."""
    output = Path(output).expanduser().resolve()
    jobs = []
    for run in _selected(experiment, only):
        for seed in experiment.seeds:
            workdir = run_dir(output, run, seed)
            train, evaluate = _train_eval_argv(experiment, output, run, seed)
            steps = []
            if (workdir / TRAINED).exists():
                _check_finished(workdir, run, seed)
            else:
                steps.append(train)
            if SEPARATE_EVAL[experiment.task] and not (workdir / EVALUATED).exists():
                steps.append(evaluate)
            if steps:
                log = output / LOGS / run.name / f"seed_{seed}.log"
                jobs.append(_Job(f"{run.name} seed {seed}", workdir, steps, log))
    return jobs


def run_parallel(jobs: Sequence[_Job], groups: Sequence[tuple[int, ...]]) -> list[Path]:
    """Runs `jobs` (from `pending_jobs`) side by side, one per group of CPU cores in `groups`,
    each program a process of its own (its output in the job's log); returns the workdirs.

    SIGTERM or Ctrl-C: every running program gets SIGTERM (train.py saves its checkpoint and
    exits), no new one starts, then `Stopped` is raised. A program that fails stops the others
    the same way and raises UserError with its last error line and its log. If the runner
    itself dies (kill -9), its programs get SIGTERM from the kernel (Linux: PR_SET_PDEATHSIG).
    """
    waiting, running, done = list(jobs), {}, []
    state = {"signum": None, "failed": None, "stopped": []}

    def stop_all():
        for job in running.values():
            job.proc.send_signal(signal.SIGTERM)  # a no-op for one that has ended

    def on_signal(signum, frame):
        if state["signum"] is None:
            state["signum"] = signum
            logging.warning("signal %d: stopping the runs (each saves its checkpoint)", signum)
            stop_all()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while waiting or running:
            go_on = state["signum"] is None and state["failed"] is None
            for slot, cores in enumerate(groups):
                if go_on and waiting and slot not in running:
                    job = waiting.pop(0)
                    job.started = time.monotonic()
                    running[slot] = job
                    _start(job, cores)
            time.sleep(_POLL_SECONDS)
            for slot, job in list(running.items()):
                code = job.proc.poll()
                if code is None:
                    continue
                job.steps.pop(0)
                if code == 0 and job.steps and state["signum"] is None and not state["failed"]:
                    _start(job, groups[slot])
                    continue
                del running[slot]
                if code == 0 and not job.steps:
                    seconds = time.monotonic() - job.started
                    logging.info("%s: done in %.0f s (%s)", job.label, seconds, job.workdir)
                    done.append(job.workdir)
                elif state["signum"] is not None or state["failed"] is not None:
                    state["stopped"].append(job.label)
                else:
                    state["failed"] = (job, code)
                    stop_all()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for job in running.values():  # only after an exception here: leave nothing behind
            job.proc.terminate()
            job.proc.wait()
    if state["signum"] is not None:
        raise Stopped(state["signum"], state["stopped"])
    if state["failed"] is not None:
        job, code = state["failed"]
        raise UserError(
            f"{job.label} failed ({job.program} exited with status {code}): "
            f"{_last_error(job.log)}; its output is in {job.log}. The runs beside it saved "
            "their checkpoints: fix the cause and rerun the same command to resume."
        )
    return done


def _start(job: _Job, cores: tuple[int, ...]) -> None:
    """Starts the job's next program on `cores`, its output appended to the job's log. It runs
    in the runner's working folder (relative paths in a config mean what they meant to the
    runner), the project's scripts and modules found wherever that is."""
    argv = [sys.executable if job.steps[0][0] == "python" else job.steps[0][0], *job.steps[0][1:]]
    if argv[1].endswith(".py"):
        argv[1] = str(PROJECT_ROOT / argv[1])
    for i, arg in enumerate(argv):  # config files are named relative to the project
        if arg.startswith("--config=") and not Path(arg.removeprefix("--config=")).is_absolute():
            argv[i] = f"--config={PROJECT_ROOT / arg.removeprefix('--config=')}"
    job.program = argv[2] if argv[1] == "-m" else Path(argv[1]).name
    paths = [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        # the program keeps to its cores and stops when the runner dies: set up by itself
        # (training.runtime.follow_runner), not between fork and exec here
        runtime.CORES_ENV: ",".join(map(str, cores)),
        runtime.RUNNER_ENV: str(os.getpid()),
    }
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"$ {shlex.join(argv)}  # CPU cores {','.join(map(str, cores))}\n")
        log.flush()
        job.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    logging.info("%s: %s on CPU cores %s, output in %s", job.label, job.program, cores, job.log)


def _last_error(log: Path) -> str:
    """The last 'error: ...' line of a program's output, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no output"
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


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
# Whether the runner evaluates a trained run with the task's eval program (detection's training
# evaluates its runs itself: their results.json holds the test measures).
SEPARATE_EVAL = {"classification": True, "detection": False}
REPORT_PROGRAMS = {
    "classification": "python -m experiments report",
    "detection": "python -m experiments.detection report",
}


def _train_eval_argv(
    experiment: Experiment, output: Path, run: Run, seed: int
) -> tuple[list[str], list[str]]:
    """The train and the eval program of (`run`, `seed`) as argument lists ('python' first)."""
    train, evaluate, eval_flags = PROGRAMS[experiment.task]
    workdir = run_dir(output, run, seed)
    args = [f"--config={run.config}", f"--workdir={workdir}", f"--config.seed={seed}"]
    args += [f"--config.{k}={_flag_value(v)}" for k, v in run.overrides.items()]
    eval_args = [f"--workdir={workdir}", eval_flags.format(max_shift=experiment.max_shift)]
    return shlex.split(train) + args, shlex.split(evaluate) + eval_args


def _train_eval_commands(experiment: Experiment, output: Path) -> list[tuple[Path, str, str]]:
    """(workdir, train command, eval command) per (run, seed), in the experiment's order."""
    out = []
    for run in experiment.runs:
        for seed in experiment.seeds:
            train, evaluate = _train_eval_argv(experiment, output, run, seed)
            out.append((run_dir(output, run, seed), shlex.join(train), shlex.join(evaluate)))
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
