"""The fast default: the built-in procedural dataset (no download), a few minutes on a CPU.

    python train.py --config=configs/builtin.py:resnet20 --workdir=/tmp/run

The argument names a model preset (`models.PRESETS`); the default is the max-pooled ConvNet.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the built-in-dataset config for model preset `arg`."""
    c = base.get_config(arg)
    c.dataset.name = "builtin"
    c.training.batch_size = 64
    c.training.num_steps = 600
    c.training.eval_every_steps = 200
    c.training.checkpoint_every_steps = 200
    c.training.log_every_steps = 50
    c.schedule.warmup_steps = 30
    return c
