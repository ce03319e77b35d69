"""CIFAR-10 through TFDS (or the official archive in `dataset.data_dir`): the papers' recipes.

    python train.py --config=configs/cifar10.py:resnet56 --workdir=runs/resnet56

- ResNet-20/32/44/56/110: He et al. 2015 (arXiv 1512.03385), section 4.2: SGD momentum 0.9,
  weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k,
  45k/5k train/validation split, 4-pixel padding + random crop + horizontal flip. For
  ResNet-110 the paper warms up at lr 0.01 for ~400 iterations; here a 400-step linear warm-up.
- Model C family: Springenberg et al. 2014 (arXiv 1412.6806), section 3.2.1: SGD momentum
  0.9, weight decay 1e-3, 350 epochs, lr multiplied by 0.1 after epochs 200, 250 and 300; the
  paper picks lr from {0.25, 0.1, 0.05, 0.01} on validation data: 0.01 is the value that trains
  every variant without BatchNorm stably. Augmentation: translations and horizontal flips (the
  paper's "with augmentation" rows).
- Every other preset: the fast default of configs/base.py (AdamW, lr 1e-3, cosine) for 30
  epochs.
"""

import ml_collections

from configs import base

TRAIN_IMAGES = 50_000
VALIDATION = 5_000


def _epochs_to_steps(epochs: float, batch_size: int) -> int:
    return int(epochs * (TRAIN_IMAGES - VALIDATION) // batch_size)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the CIFAR-10 config and recipe for model preset `arg`."""
    c = base.get_config(arg)
    c.dataset.name = "cifar10"
    c.dataset.validation_size = VALIDATION
    c.dataset.eval_split = "validation"
    c.training.batch_size = 128
    c.training.eval_batch_size = 1_000
    c.training.log_every_steps = 200
    name = arg or ""
    if name.startswith("resnet"):
        c.optimizer.update(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False)
        c.optimizer.weight_decay = 1e-4
        c.schedule.update(name="step", boundaries=(32_000, 48_000), decay_factor=0.1)
        c.schedule.warmup_steps = 400 if name == "resnet110" else 0
        c.training.num_steps = 64_000
        c.training.eval_every_steps = 2_000
        c.training.checkpoint_every_steps = 2_000
    elif name in ("model_c", "strided_c", "convpool_c", "allcnn_c"):
        c.optimizer.update(name="sgd", learning_rate=0.01, momentum=0.9, nesterov=False)
        c.optimizer.weight_decay = 1e-3
        steps = [_epochs_to_steps(e, c.training.batch_size) for e in (200, 250, 300, 350)]
        c.schedule.update(name="step", boundaries=tuple(steps[:3]), decay_factor=0.1)
        c.schedule.warmup_steps = 0
        c.training.num_steps = steps[3]
        c.training.eval_every_steps = _epochs_to_steps(5, c.training.batch_size)
        c.training.checkpoint_every_steps = c.training.eval_every_steps
    else:
        c.training.num_steps = _epochs_to_steps(30, c.training.batch_size)
        c.schedule.warmup_steps = 200
        c.training.eval_every_steps = _epochs_to_steps(2, c.training.batch_size)
        c.training.checkpoint_every_steps = c.training.eval_every_steps
    return c
