"""Config files load, every preset validates, and config mistakes fail early with one line."""

import subprocess
import sys
from pathlib import Path

import pytest

import models
from configs import base, builtin, cifar10, fashion_mnist, schema
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIG_MODULES = {"builtin": builtin, "cifar10": cifar10, "fashion_mnist": fashion_mnist}


@pytest.mark.parametrize("preset", models.PRESETS)
@pytest.mark.parametrize("module", sorted(CONFIG_MODULES))
def test_every_config_and_preset_validates(module, preset):
    config = CONFIG_MODULES[module].get_config(preset)
    info, specs = schema.validate(config)
    assert config.model.name in models.FAMILIES
    assert specs[-1].out_shape[-1] == info.num_classes


def test_config_files_change_only_what_differs():
    # Every field of every config file exists in the base config: one schema, one set of docs.
    def keys(c, prefix=""):
        out = set()
        for k, v in c.items():
            out |= keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
        return out

    reference = {k for k in keys(base.get_config()) if not k.startswith("model.")}
    for module in CONFIG_MODULES.values():
        assert {k for k in keys(module.get_config()) if not k.startswith("model.")} == reference


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optimizer.name", "rmsprop", "config.optimizer.name: 'rmsprop' is not one of"),
        ("optimizer.learning_rate", -0.1, "config.optimizer.learning_rate"),
        ("schedule.name", "exp", "config.schedule.name"),
        ("schedule.boundaries", (0.75, 0.5), "config.schedule.boundaries"),
        ("schedule.warmup_steps", 10**9, "config.schedule.warmup_steps"),
        ("training.batch_size", 0, "config.training.batch_size"),
        ("training.on_nonfinite_loss", "ignore", "config.training.on_nonfinite_loss"),
        ("dataset.eval_split", "validation", "needs dataset.validation_size > 0"),
        ("dataset.name", "imagenet", "imagenet"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    config = base.get_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        schema.validate(config)


def test_config_differences_lists_fields():
    from train import config_differences

    old = base.get_config().to_dict()
    new = base.get_config().to_dict()
    new["optimizer"]["learning_rate"] = 0.5
    new["seed"] = 3
    assert config_differences(old, new) == ["optimizer.learning_rate: 0.001 -> 0.5", "seed: 0 -> 3"]


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_helpfull_documents_the_flags():
    out = _train_cli("--helpfull")  # absl exits 1 after printing help
    assert "--workdir: Where checkpoints, metrics and results go." in out.stdout
    assert "--config: Config file" in out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--config=configs/builtin.py", "--config.nonexistent=1"],
            "unknown config field 'nonexistent'",
        ),
        (["--config=configs/builtin.py", "--config.training.bach_size=1"], "'bach_size'"),
        (
            ["--config=configs/builtin.py", "--config.training.batch_size=abc"],
            "config.training.batch_size",
        ),
        (["--config=configs/nope.py"], "nope.py"),
        (["--config=configs/builtin.py:no_such_model"], "no_such_model"),
        (
            ["--config=configs/builtin.py", "--config.optimizer.name=rmsprop"],
            "config.optimizer.name",
        ),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, args, expected):
    out = _train_cli(*args, f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
