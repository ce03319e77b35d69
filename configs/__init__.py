"""Config files (one `get_config(arg)` each) and the helpers that load them outside absl flags.

On the command line, absl's config flags load a config: `--config=configs/builtin.py:resnet20`
and `--config.optimizer.learning_rate=0.05`. Programs that build many configs (the experiment
runner, eval, tests) use `load` and `override`, which accept the same strings.
"""

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def load(spec: str) -> ml_collections.ConfigDict:
    """Returns the config named by `spec`, 'path/to/file.py[:arg]', relative to the project."""
    path, _, arg = spec.partition(":")
    file = Path(path) if Path(path).is_absolute() else ROOT / path
    if not file.is_file():
        raise UserError(f"config file {path!r} does not exist (from {spec!r}); see configs/.")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def override(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """Sets dotted fields (`{'training.num_steps': 10}`) in place, refusing unknown keys and
    wrong types like the command line does."""
    for field, value in values.items():
        *parents, key = field.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise UserError(f"unknown config field {field!r}: no section {part!r}.")
            node = node[part]
        if key not in node:
            raise UserError(
                f"unknown config field {field!r}: {'.'.join(parents) or 'config'} has "
                f"no field {key!r}."
            )
        if isinstance(node[key], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[key] = value
        except TypeError as e:
            raise UserError(f"config field {field!r}: {e}") from e


def from_json(text: str) -> ml_collections.ConfigDict:
    """Returns the ConfigDict saved as config.json in a workdir (lists become tuples).

    A field added to configs/base.py after the run was saved (or, for a detection run, to
    configs/detection.py's detection section) gets its default value, so runs of earlier
    versions can still be evaluated; the model section is taken as saved.
    """

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    def with_defaults(saved: dict, defaults: dict) -> dict:
        merged = dict(saved)
        for key, value in defaults.items():
            if key not in merged:
                merged[key] = value
            elif isinstance(value, dict) and isinstance(merged[key], dict):
                merged[key] = with_defaults(merged[key], value)
        return merged

    from configs import base  # deferred: base imports models

    saved = tuples(json.loads(text))
    if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    defaults = base.get_config().to_dict()
    defaults.pop("model")
    if "detection" in saved:
        from configs import detection

        defaults["detection"] = detection.get_config().detection.to_dict()
    return ml_collections.ConfigDict(with_defaults(saved, defaults))
