"""Runs an experiment's missing runs (resuming interrupted ones) and lists or scripts them."""

import shlex
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


def run_missing(experiment: Experiment, output: Path) -> list[Path]:
    """Trains and evaluates every run that has no results yet; returns the workdirs it touched.

    A run with a results.json is skipped when its folder holds that run's config; a folder
    holding another config's finished run is refused with one line (UserError). An
    interrupted one resumes from its checkpoint (train.py does that), so rerunning after a
    crash loses at most one checkpoint interval; a folder of another config without a
    checkpoint is retrained with this run's config, and one with a checkpoint is refused.
    """
    import evaluation  # deferred: importing JAX is slow
    from training import loop

    touched = []
    for run in experiment.runs:
        for seed in experiment.seeds:
            workdir = run_dir(output, run, seed)
            if (workdir / TRAINED).exists():
                _check_finished(workdir, run, seed)
            else:
                logging.info("training %s seed %d in %s", run.name, seed, workdir)
                loop.train_and_evaluate(build_config(run, seed), workdir)
                touched.append(workdir)
            if not (workdir / EVALUATED).exists():
                evaluation.evaluate_workdir(workdir, max_shift=experiment.max_shift)
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


def commands(experiment: Experiment, output: Path) -> list[str]:
    """Returns one shell command per (run, seed): train, then evaluate, in its own workdir."""
    out = []
    for run in experiment.runs:
        for seed in experiment.seeds:
            workdir = run_dir(output, run, seed)
            args = [f"--config={run.config}", f"--workdir={workdir}", f"--config.seed={seed}"]
            args += [f"--config.{k}={_flag_value(v)}" for k, v in run.overrides.items()]
            train_cmd = " ".join(["python", "train.py", *map(shlex.quote, args)])
            eval_cmd = (
                f"python eval.py --workdir={shlex.quote(str(workdir))}"
                f" --max_shift={experiment.max_shift}"
            )
            out.append(f"{train_cmd} && {eval_cmd}")
    return out


def slurm_script(experiment: Experiment, output: Path, spec: str) -> str:
    """Returns a SLURM job-array script: one array task per run; each task's training uses
    every GPU of its allocation and, over several nodes, jax.distributed (auto-detected)."""
    lines = commands(experiment, output)
    body = "\n".join(f"  {shlex.quote(c)}" for c in lines)
    return f"""#!/bin/bash
# SLURM job array for the experiment {spec}: {len(lines)} runs, one per array task.
# Submit from the project root: sbatch {output}/slurm.sh
# Then, when all tasks are done: python -m experiments report {spec} --output={output}
# Adjust the resources to your cluster. With --nodes>1, train.py starts jax.distributed from
# SLURM's environment (config.distributed.initialize=auto) and trains on every node's devices.
#SBATCH --job-name={experiment.name}
#SBATCH --array=0-{len(lines) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output={output}/slurm-%A_%a.out
set -euo pipefail
COMMANDS=(
{body}
)
source .venv/bin/activate
srun bash -c "${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}"
"""
