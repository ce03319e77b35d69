"""CIFAR-10 through TFDS (or the official archive in `dataset.data_dir`): the papers' recipes.

    python train.py --config=configs/cifar10.py:resnet56 --workdir=runs/resnet56

Every model preset is listed in `RECIPE_OF` with the recipe it trains with; each recipe in
`RECIPES` names its source. A preset missing from the table is refused, never given a default
silently (`tests/test_configs.py` checks that the table covers every preset).
"""

import dataclasses

import ml_collections

from configs import base
from errors import UserError

TRAIN_IMAGES = 50_000
VALIDATION = 5_000
BATCH_SIZE = 128


def _epochs_to_steps(epochs: float, batch_size: int = BATCH_SIZE) -> int:
    return int(epochs * (TRAIN_IMAGES - VALIDATION) // batch_size)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimizer and schedule from a paper: SGD(momentum) or the fast AdamW default, the
    peak learning rate, L2 weight decay, the decay points as fractions of training, and the
    length of training and of the linear warm-up, in steps of BATCH_SIZE images."""

    source: str
    optimizer: str
    learning_rate: float
    weight_decay: float
    num_steps: int
    schedule: str = "step"
    decay_fractions: tuple[float, ...] = ()
    decay_factor: float = 0.1
    nesterov: bool = False
    warmup_steps: int = 0
    eval_every_steps: int = _epochs_to_steps(5)


RECIPES = {
    # He et al. 2015 (arXiv 1512.03385), section 4.2: SGD momentum 0.9, weight decay 1e-4,
    # batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k, 45k/5k
    # train/validation split, 4-pixel padding + random crop + horizontal flip.
    "he2015": Recipe(
        source="He et al. 2015, arXiv 1512.03385, section 4.2",
        optimizer="sgd",
        learning_rate=0.1,
        weight_decay=1e-4,
        num_steps=64_000,
        decay_fractions=(0.5, 0.75),  # 32k and 48k of 64k
        eval_every_steps=2_000,
    ),
    # The same, with the paper's warm-up for ResNet-110 (lr 0.01 for ~400 iterations): here a
    # 400-step linear warm-up.
    "he2015_warmup": Recipe(
        source="He et al. 2015, arXiv 1512.03385, section 4.2 (ResNet-110 warm-up)",
        optimizer="sgd",
        learning_rate=0.1,
        weight_decay=1e-4,
        num_steps=64_000,
        decay_fractions=(0.5, 0.75),
        warmup_steps=400,
        eval_every_steps=2_000,
    ),
    # Springenberg et al. 2014 (arXiv 1412.6806), section 3.2.1: SGD momentum 0.9, weight
    # decay 1e-3, 350 epochs, lr multiplied by 0.1 after epochs 200, 250 and 300; the paper
    # picks lr from {0.25, 0.1, 0.05, 0.01} on validation data: 0.01 is the value that trains
    # every variant without BatchNorm stably. Augmentation: translations and horizontal flips
    # (the paper's "with augmentation" rows).
    "springenberg2014": Recipe(
        source="Springenberg et al. 2014, arXiv 1412.6806, section 3.2.1",
        optimizer="sgd",
        learning_rate=0.01,
        weight_decay=1e-3,
        num_steps=_epochs_to_steps(350),
        decay_fractions=(200 / 350, 250 / 350, 300 / 350),
    ),
    # Zagoruyko & Komodakis 2016, "Wide Residual Networks" (arXiv 1605.07146), section 4:
    # SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 multiplied by 0.2
    # at epochs 60, 120 and 160 of 200.
    "zagoruyko2016": Recipe(
        source="Zagoruyko & Komodakis 2016, arXiv 1605.07146, section 4",
        optimizer="sgd",
        learning_rate=0.1,
        weight_decay=5e-4,
        num_steps=_epochs_to_steps(200),
        decay_fractions=(60 / 200, 120 / 200, 160 / 200),
        decay_factor=0.2,
        nesterov=True,
    ),
    # No paper recipe (the plain, pooled and locally connected ConvNets, the MLP): the fast
    # default of configs/base.py (AdamW, lr 1e-3, cosine) for 30 epochs with a short warm-up.
    "fast_default": Recipe(
        source="configs/base.py (AdamW, cosine), 30 epochs",
        optimizer="adamw",
        learning_rate=1e-3,
        weight_decay=1e-2,
        num_steps=_epochs_to_steps(30),
        schedule="cosine",
        nesterov=True,  # base.py's value; AdamW does not use it
        warmup_steps=200,
        eval_every_steps=_epochs_to_steps(2),
    ),
}

RECIPE_OF = {
    **dict.fromkeys(("resnet20", "resnet20_b", "resnet32", "resnet44", "resnet56"), "he2015"),
    "resnet110": "he2015_warmup",
    **dict.fromkeys(("model_c", "strided_c", "convpool_c", "allcnn_c"), "springenberg2014"),
    "wide_resnet": "zagoruyko2016",
    **dict.fromkeys(
        ("plain", "plain_local", "pooled_max", "pooled_avg", "pooled_l2", "pooled_depth", "mlp"),
        "fast_default",
    ),
}
DEFAULT_PRESET = "pooled_max"  # as configs/base.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the CIFAR-10 config and recipe for model preset `arg`."""
    c = base.get_config(arg)
    preset = arg or DEFAULT_PRESET
    if preset not in RECIPE_OF:
        raise UserError(
            f"configs/cifar10.py has no recipe for the preset {preset!r}; add it to RECIPE_OF."
        )
    recipe = RECIPES[RECIPE_OF[preset]]
    c.dataset.name = "cifar10"
    c.dataset.validation_size = VALIDATION
    c.dataset.eval_split = "validation"
    c.training.batch_size = BATCH_SIZE
    c.training.eval_batch_size = 1_000
    c.training.log_every_steps = 200
    c.optimizer.update(
        name=recipe.optimizer,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        momentum=0.9,
        nesterov=recipe.nesterov,
    )
    c.schedule.update(
        name=recipe.schedule,
        decay_fractions=recipe.decay_fractions or c.schedule.decay_fractions,
        decay_factor=recipe.decay_factor,
        warmup_steps=recipe.warmup_steps,
    )
    c.training.num_steps = recipe.num_steps
    c.training.eval_every_steps = recipe.eval_every_steps
    c.training.checkpoint_every_steps = recipe.eval_every_steps
    return c
