"""Dataset commands.

    python -m data prepare cifar10 [--data_dir=DIR]   # TFDS download + array_record (needs
                                                      # `pip install -e '.[tfds]'`)
    python -m data check fashion_mnist --data_dir=/usr/share/datasets/fashion-mnist
                                                      # load as training would; print the counts

`check` accepts --source (auto|builtin|tfds|files) and --validation_size like the config.
"""

import sys

from absl import app, flags

import data
from data import tfds_source
from errors import UserError

_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir, or the folder of the files.")
_SOURCE = flags.DEFINE_enum("source", "auto", list(data.SOURCES), "Where to read from (check).")
_VALIDATION = flags.DEFINE_integer("validation_size", 0, "Images held out of train (check).")
_USAGE = "usage: python -m data {prepare,check} NAME [--data_dir=DIR]"


def _dataset_config(name: str):
    from configs import base  # deferred: only `check` needs the config defaults

    ds_cfg = base.get_config().dataset
    ds_cfg.update(
        name=name,
        data_dir=_DATA_DIR.value,
        source=_SOURCE.value,
        validation_size=_VALIDATION.value,
    )
    return ds_cfg


def _floats(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _check(name: str) -> str:
    splits = data.load(_dataset_config(name), seed=0)
    parts = [
        f"{split}: {len(getattr(splits, split))} images"
        for split in ("train", "validation", "test")
        if getattr(splits, split) is not None
    ]
    return (
        f"{name} from {splits.source}: {', '.join(parts)}, each {splits.info.image_shape}, "
        f"{splits.info.num_classes} classes; train mean {_floats(splits.mean)}, "
        f"std {_floats(splits.std)}"
    )


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[1] not in ("prepare", "check"):
        sys.exit(_USAGE)
    command, name = argv[1], argv[2]
    try:
        if name not in data.NAMES:
            raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(data.NAMES)}.")
        if command == "prepare":
            if name == "builtin":
                raise UserError("the built-in dataset is generated on the fly: nothing to prepare.")
            print(f"prepared {name} in {tfds_source.prepare(name, _DATA_DIR.value)}")
        else:
            print(_check(name))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
