"""Prints the architecture summary of a config's model.

    python -m models --config=configs/cifar10.py:resnet20 [--json]

The input shape and number of classes come from the config's dataset (`data.dataset_info`,
nothing is loaded).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

import data
import models
from configs import schema
from errors import UserError
from models import summary

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and its argument: configs/X.py[:arg].", lock_config=True
)
_JSON = flags.DEFINE_bool("json", False, "Print the summary as JSON (with total_params).")


def main(argv: list[str]) -> None:
    """Prints the summary of `--config`'s model, or the error message of a bad config."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/base.py:resnet20")
    try:
        info = data.dataset_info(config.dataset)
        specs = models.architecture(config.model, info.image_shape, info.num_classes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        json.dumps(summary.to_json(specs), indent=1) if _JSON.value else summary.format_table(specs)
    )


if __name__ == "__main__":
    app.run(main, flags_parser=schema.parse_flags)
