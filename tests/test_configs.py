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
        ("schedule.decay_fractions", (0.75, 0.5), "config.schedule.decay_fractions"),
        ("schedule.warmup_steps", -1, "config.schedule.warmup_steps"),
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
    from training.workdir import config_differences

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


def test_cifar10_recipe_table_covers_every_preset_and_names_its_source():
    assert set(cifar10.RECIPE_OF) == set(models.PRESETS)
    assert set(cifar10.RECIPE_OF.values()) == set(cifar10.RECIPES)
    assert all(recipe.source for recipe in cifar10.RECIPES.values())
    assert cifar10.get_config("wide_resnet").optimizer.name == "sgd"  # not the AdamW default


@pytest.mark.parametrize(
    ("preset", "decay_steps"),
    [
        ("resnet20", (32_000, 48_000)),  # He et al.: 32k and 48k iterations
        # Springenberg et al.: after epochs 200, 250, 300 of 45k images in batches of 128
        ("allcnn_c", tuple(int(e * 45_000 // 128) for e in (200, 250, 300))),
    ],
)
def test_step_schedules_decay_where_the_papers_do(preset, decay_steps):
    from training import optim

    config = cifar10.get_config(preset)
    schedule = optim.make_schedule(config)
    peak = config.optimizer.learning_rate
    for i, step in enumerate(decay_steps):
        before, after = float(schedule(step - 1)), float(schedule(step))
        assert before == pytest.approx(peak * 0.1**i) and after == pytest.approx(
            peak * 0.1 ** (i + 1)
        )
