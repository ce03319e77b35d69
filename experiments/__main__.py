"""python -m experiments {run|report|commands|slurm|archive} NAME[:VARIANT] [--output=DIR]
[--runs=DIR] [--seeds=..] [--only=ROW,..] [--jobs=auto|N]

archive copies the finished runs' records (everything but checkpoints) from --runs into
--output, where `report --runs=` that folder rebuilds the report and `run` counts them done."""

import sys
from pathlib import Path

from training import runtime

runtime.configure_jax()  # before JAX starts its backend

from absl import app, flags, logging  # noqa: E402

import experiments  # noqa: E402
from errors import UserError  # noqa: E402
from experiments import report, runner  # noqa: E402
from training import loop  # noqa: E402

_OUTPUT = flags.DEFINE_string("output", None, "Output folder (default: runs/NAME_VARIANT).")
_RUNS = flags.DEFINE_string(
    "runs",
    None,
    "Folder of the runs' workdirs (default: the output folder). Experiments given the same "
    "folder share their runs: a row of the same name and config is trained once (e.g. "
    "families' resnet20 is resnet_depth's).",
)
_ONLY = flags.DEFINE_list(
    "only",
    [],
    "run: train only these runs (row names, comma-separated); the report still "
    "shows every finished run.",
)
_SEEDS = flags.DEFINE_list(
    "seeds",
    [],
    "Seeds to train and report instead of the experiment's own (e.g. 3,4,5: the "
    "same comparison on another seed set).",
)
_JOBS = flags.DEFINE_string("jobs", "auto", runner.JOBS_HELP)
ACTIONS = ("run", "report", "commands", "slurm", "archive")


def main(argv):
    runtime.quiet_library_logs()
    if len(argv) != 3 or argv[1] not in ACTIONS:
        raise app.UsageError(f"usage: python -m experiments {{{'|'.join(ACTIONS)}}} NAME[:VARIANT]")
    action, spec = argv[1], argv[2]
    try:
        output = Path(_OUTPUT.value or Path("runs") / spec.replace(":", "_"))
        runs = Path(_RUNS.value) if _RUNS.value else output
        experiment = experiments.get(spec, runs if action in ("commands", "slurm") else None)
        if _SEEDS.value:
            experiment = experiments.with_seeds(experiment, _SEEDS.value)
        first = experiments.prerequisite(spec, experiment.seeds)
        if action == "commands":  # the runs these start from first, in the same folder
            before = runner.commands(first, runs) if first is not None else []
            print("\n".join([*before, *runner.commands(experiment, runs)]))
            return
        if action == "slurm":
            output.mkdir(parents=True, exist_ok=True)
            path = output / "slurm.sh"
            path.write_text(runner.slurm_script(experiment, output, spec, runs))
            print(f"wrote {path}: submit it with `sbatch {path}`")
            if first is not None:
                print(
                    f"its runs start from {first.name}'s {first.runs[0].name} runs in {runs}: "
                    f"train those first (`python -m experiments slurm {first.name}:"
                    f"{spec.partition(':')[2]} --only={first.runs[0].name} --runs={runs}`)"
                )
            return
        if action == "archive":
            if not (_OUTPUT.value and _RUNS.value):
                raise UserError(
                    "archive needs --runs (the runs' folder) and --output (where their records "
                    "go, e.g. experiments/results/runs_fashion_mnist)"
                )
            copied, unfinished = runner.archive(experiment, runs, output)
            print(f"archived {len(copied)} runs into {output}: {', '.join(copied) or 'none new'}")
            if unfinished:
                print(f"not finished, not archived: {', '.join(unfinished)}")
            return
        if action == "run":
            runner.run(experiment, runs, tuple(_ONLY.value), runner.parse_jobs(_JOBS.value))
        table = report.write(experiment, output, spec, runs)
    except (loop.Preempted, runner.Stopped) as e:  # SIGTERM or Ctrl-C: checkpoints saved
        logging.warning("%s", e)
        sys.exit(e.exit_code)
    except UserError as e:
        sys.exit(f"error: {e}")
    logging.info("report written to %s", output / "report.md")
    print(f"\n{experiment.question}\n\n{table}\n\nreport: {output / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
