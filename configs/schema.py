"""Checks a config before anything is built or compiled, and parses config flags cleanly.

Every check names the field it refuses and says what is allowed, so a typo in a sweep fails in
the first second with one line rather than deep inside a jit trace.
"""

import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

from errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
EVAL_SPLITS = ("validation", "test")
NONFINITE_POLICIES = ("stop", "skip")
PROGRESS = ("auto", "bar", "none")
DISTRIBUTED = ("auto", "on", "off")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise UserError(f"config.{field}: {message}")


def _choice(config: ml_collections.ConfigDict, field: str, allowed: Sequence[str]) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    _require(value in allowed, field, f"{value!r} is not one of {', '.join(allowed)}")


def validate(config: ml_collections.ConfigDict):
    """Checks every section of `config`; raises UserError naming the first bad field.

    Returns (dataset_info, layer_specs): what the checks computed, so callers need not
    compute it again.
    """
    import data  # deferred: keeps `--helpfull` fast
    import models

    d, o, s, t = config.dataset, config.optimizer, config.schedule, config.training
    _require(config.seed >= 0, "seed", "must be >= 0")
    _require(d.validation_size >= 0, "dataset.validation_size", "must be >= 0")
    for field in ("builtin_train_size", "builtin_test_size"):
        _require(d[field] > 0, f"dataset.{field}", "must be > 0")
    _choice(config, "dataset.eval_split", EVAL_SPLITS)
    _require(
        d.eval_split != "validation" or d.validation_size > 0,
        "dataset.eval_split",
        "'validation' needs dataset.validation_size > 0 (images held out of the training split)",
    )
    _require(d.augment_crop_padding >= 0, "dataset.augment_crop_padding", "must be >= 0")
    _choice(config, "dataset.on_device", ("auto", "on", "off"))
    info = data.dataset_info(d)
    specs = models.architecture(config.model, info.image_shape, info.num_classes)

    _choice(config, "optimizer.name", OPTIMIZERS)
    _require(o.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
    _require(0 <= o.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
    for field in ("b1", "b2"):
        _require(0 <= o[field] < 1, f"optimizer.{field}", "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _require(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0 (0 turns it off)")

    _choice(config, "schedule.name", SCHEDULES)
    cap_warmup(config)
    _require(
        0 <= s.warmup_steps < t.num_steps,
        "schedule.warmup_steps",
        f"must be in [0, training.num_steps={t.num_steps})",
    )
    _require(0 < s.decay_factor <= 1, "schedule.decay_factor", "must be in (0, 1]")
    fractions = list(s.decay_fractions)
    _require(
        all(isinstance(f, int | float) and 0 < f < 1 for f in fractions)
        and fractions == sorted(fractions),
        "schedule.decay_fractions",
        f"{tuple(fractions)} must be increasing fractions of training.num_steps in (0, 1)",
    )

    for field in ("batch_size", "num_steps", "eval_every_steps", "eval_batch_size"):
        _require(t[field] > 0, f"training.{field}", "must be > 0")
    for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _require(t[field] > 0, f"training.{field}", "must be > 0")
    _require(0 <= t.label_smoothing < 1, "training.label_smoothing", "must be in [0, 1)")
    _require(0 <= t.ema_decay < 1, "training.ema_decay", "must be in [0, 1) (0: off)")
    _choice(config, "training.on_nonfinite_loss", NONFINITE_POLICIES)
    _choice(config, "training.progress", PROGRESS)
    _choice(config, "distributed.initialize", DISTRIBUTED)
    from training import runtime  # deferred: keeps `--helpfull` fast

    runtime.check_distributed(config.distributed)
    return info, specs


def cap_warmup(config: ml_collections.ConfigDict, *, quiet: bool = False) -> None:
    """A warm-up that would not end before training does (e.g. `training.num_steps=30` on a
    config with 30 warm-up steps) is capped at half the run, with one warning line: the config
    saved in the workdir holds the capped value."""
    s, t = config.schedule, config.training
    if t.num_steps > 1 and s.warmup_steps >= t.num_steps:
        capped = t.num_steps // 2
        from absl import logging

        (logging.info if quiet else logging.warning)(
            "schedule.warmup_steps=%d is not shorter than training.num_steps=%d: warm-up "
            "capped at %d steps (half the run)",
            s.warmup_steps,
            t.num_steps,
            capped,
        )
        s.warmup_steps = capped


def _unknown_override(argv: Sequence[str]) -> str:
    """Returns a message naming the first `--config.a.b=...` whose field does not exist."""
    import difflib

    import configs

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = configs.load(spec)
    except Exception:
        return ""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if not name.startswith("--config."):
            continue
        node, path = config, name[len("--config.") :].split(".")
        for depth, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(["config", *path[:depth]])
                keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                return f"unknown config field {key!r} in {arg}: {where} has no field {key!r}.{hint}"
            node = node[key]
    return ""


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for entry points: config mistakes end in one line, not a traceback.

    Use as `app.run(main, flags_parser=configs.schema.parse_flags)`.
    """
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            config = flags.FLAGS.config
            if config is None:  # not given: the program says what it needs
                return rest
            if not isinstance(config, ml_collections.ConfigDict):
                config.a  # noqa: B018 -- an unloadable file raises with its reason here
        return rest
    except (AttributeError, KeyError) as e:
        message = _unknown_override(argv) or f"unknown config field: {e}"
        sys.exit(f"error: {message} The fields and their meaning are in configs/base.py.")
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" in text:  # get_config raised: keep its last line
            sys.exit(f"error: {_last_line(text).removeprefix('errors.UserError: ')}")
        sys.exit(f"error: {text}\nPass --helpfull to see every flag.")
    except Exception as e:  # config file missing or raising while it is built
        sys.exit(f"error: could not load the config: {_last_line(str(e))}")


def _last_line(text: str) -> str:
    lines = [line.strip().removeprefix('"').removesuffix('"').strip() for line in text.splitlines()]
    return next((line for line in reversed(lines) if line), text)
