"""Named comparisons: each file here lists runs (a config, the fields to vary, the seeds).

    python -m experiments run families:small        # train what is missing, then report
    python -m experiments report families:small     # the report from finished runs only
    python -m experiments commands families:cifar10 # one shell command per run (for a cluster)
    python -m experiments slurm families:cifar10    # a SLURM job-array script

An experiment name is `FILE[:VARIANT]`; variants: `small` (the built-in dataset, minutes on a
CPU), `fashion_mnist` (the real offline files), `cifar10` (TFDS, for GPUs/TPUs).
"""

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from errors import UserError

NAMES = (
    "families",
    "pooling_vs_strided",
    "resnet_depth",
    "weight_sharing",
    "recipe",
    "seed_claims",
    "detection",
)
VARIANTS = ("small", "fashion_mnist", "cifar10")
CONFIG_FILES = {
    "small": "configs/builtin.py",
    "fashion_mnist": "configs/fashion_mnist.py",
    "cifar10": "configs/cifar10.py",
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration of an experiment, trained once per seed."""

    name: str  # row label in the report
    config: str  # 'configs/file.py:arg'
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Reference:
    """A published result set beside a row of the report: its test accuracy (a fraction) and
    where it comes from (paper or table, the network and the training it had)."""

    accuracy: float
    source: str


@dataclasses.dataclass(frozen=True)
class Ordering:
    """A published comparison of two rows, checked against this experiment's: `above` beat
    `below` (or, with `tied`, the paper reads them as equal); `published` says it in the
    paper's numbers, e.g. 'Model C 9.74 % error, Strided-CNN-C 10.19 % (CIFAR-10)'."""

    above: str
    below: str
    published: str
    tied: bool = False


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What an experiment file returns: the question, the runs, the seeds, and the published
    results (per row) and orderings the report compares them with."""

    name: str
    question: str
    runs: tuple[Run, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    max_shift: int = 8  # largest shift of the translation measurements in eval
    published: Mapping[str, Reference] = dataclasses.field(default_factory=dict)
    orderings: tuple[Ordering, ...] = ()
    task: str = "classification"  # or "detection": which programs train and evaluate a run


def preset_runs(
    variant: str,
    presets: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
    per_run: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Run, ...]:
    """Returns one Run per `{row name: model preset}` on the variant's config file, with the
    shared `overrides` plus `per_run[row name]`."""
    per_run = per_run or {}
    if variant not in CONFIG_FILES:
        raise UserError(
            f"unknown experiment variant {variant!r}; choose one of {', '.join(VARIANTS)}"
        )
    return tuple(
        Run(
            name,
            f"{CONFIG_FILES[variant]}:{preset}",
            {**(overrides or {}), **per_run.get(name, {})},
        )
        for name, preset in presets.items()
    )


def define(
    name: str,
    question: str,
    presets: Mapping[str, str],
    *,
    budgets: Mapping[str, Mapping[str, Any]],
    seeds: Mapping[str, tuple[int, ...]],
    cpu_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    variant_overrides: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    rows: Mapping[str, tuple[str, ...]] | None = None,
    published: Mapping[str, Mapping[str, Reference]] | None = None,
    orderings: tuple[Ordering, ...] = (),
) -> Callable[[str], Experiment]:
    """Returns an experiment file's `get_experiment(variant)`: the runs of `presets` with the
    variant's budget and seeds (default (0, 1, 2)); `cpu_overrides[row]` apply to the CPU
    variants (small, fashion_mnist), never to cifar10, which keeps the papers' models;
    `variant_overrides[variant][row]` apply to that variant only, after them. `rows[variant]`
    narrows a variant to those rows (e.g. fewer depths on a CPU); `published[variant]` and
    `orderings` (the papers' comparisons, for every variant) go into the report."""

    def get_experiment(variant: str = "small") -> Experiment:
        cpu = variant != "cifar10"
        per_run = {row: dict(o) for row, o in ((cpu_overrides or {}) if cpu else {}).items()}
        for row, o in (variant_overrides or {}).get(variant, {}).items():
            per_run[row] = {**per_run.get(row, {}), **o}
        chosen = (rows or {}).get(variant)
        if chosen is not None and set(chosen) - set(presets):
            raise ValueError(f"{name}: rows[{variant!r}] names unknown rows {chosen}")
        kept = {row: p for row, p in presets.items() if chosen is None or row in chosen}
        runs = preset_runs(variant, kept, budgets.get(variant), per_run)
        names = {run.name for run in runs}
        return Experiment(
            name,
            question,
            runs,
            seeds.get(variant, (0, 1, 2)),
            # Shifts up to 4 pixels on a CPU: each shift is one more pass over the test set.
            4 if cpu else 8,
            {row: ref for row, ref in (published or {}).get(variant, {}).items() if row in names},
            tuple(o for o in orderings if o.above in names and o.below in names),
        )

    return get_experiment


def with_seeds(experiment: Experiment, seeds) -> Experiment:
    """Returns `experiment` with other seeds (non-negative integers, no repeats)."""
    try:
        values = tuple(int(seed) for seed in seeds)
    except ValueError as e:
        raise UserError(f"--seeds takes integers, e.g. --seeds=3,4,5 ({e})") from e
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise UserError(f"--seeds={','.join(map(str, seeds))}: give distinct integers >= 0")
    return dataclasses.replace(experiment, seeds=values)


def epochs_budget(epochs: int, steps_per_epoch: int) -> dict[str, int]:
    """Returns the training overrides of `epochs` passes over the training split: evaluation
    and a checkpoint once per epoch (so the plateau check sees the last epochs), warm-up over
    the first epoch."""
    return {
        "training.num_steps": epochs * steps_per_epoch,
        "training.eval_every_steps": steps_per_epoch,
        "training.checkpoint_every_steps": steps_per_epoch,
        "schedule.warmup_steps": steps_per_epoch,
    }


def steps_budget(steps: int, evals: int = 10) -> dict[str, int]:
    """Returns the training overrides of `steps` steps with `evals` evaluations (so the plateau
    check sees the end of the curve) and a checkpoint every half."""
    return {
        "training.num_steps": steps,
        "training.eval_every_steps": steps // evals,
        "training.checkpoint_every_steps": steps // 2,
    }


def variants(name: str) -> tuple[str, ...]:
    """The variants experiment `name` defines: its file's VARIANTS, by default all."""
    return getattr(importlib.import_module(f"experiments.{name}"), "VARIANTS", VARIANTS)


def get(spec: str, runs=None) -> Experiment:
    """Returns the experiment named 'NAME[:VARIANT]' (variant defaults to 'small'). An
    experiment whose runs depend on other runs (detection's backbone classifiers) takes the
    runs folder `runs` to point at them."""
    name, _, variant = spec.partition(":")
    if name not in NAMES:
        raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(NAMES)}")
    module = importlib.import_module(f"experiments.{name}")
    known = variants(name)
    if (variant or "small") not in known:
        raise UserError(
            f"unknown experiment variant {variant or 'small'!r} ({name}:{variant or 'small'}); "
            f"{name} has {', '.join(known)}"
        )
    if runs is not None and hasattr(module, "prerequisite"):
        return module.get_experiment(variant or "small", runs=runs)
    return module.get_experiment(variant or "small")


def prerequisite(spec: str, seeds: tuple[int, ...]) -> Experiment | None:
    """The runs that experiment `spec`'s runs start from (detection's backbone classifiers,
    to be trained first in the same runs folder), or None."""
    name, _, variant = spec.partition(":")
    module = importlib.import_module(f"experiments.{name}")
    if not hasattr(module, "prerequisite"):
        return None
    return module.prerequisite(variant or "small", seeds)
