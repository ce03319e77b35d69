"""recipe: what each ingredient of the converged Fashion-MNIST recipe buys, measured once.

Question: the families experiment trains its nets with one recipe (AdamW at 1e-3 with weight
decay 0.01, a one-epoch linear warm-up then a cosine to zero, random 2-pixel crops and
horizontal flips, 15 epochs of batch 128; BatchNorm in the pooled ConvNet). Which of its parts
matter, and by how much? Each row changes one thing on the max-pooled ConvNet (the cheapest
family, about 7 CPU minutes a run): the warm-up removed, the cosine replaced by a constant
rate, the augmentation removed, label smoothing 0.1 added, weight averaging added (an
exponential moving average of the weights, decay 0.999: about the last 1,000 steps, 2.3
epochs, weigh most; evaluated instead of the last weights), BatchNorm removed (the row that
decided families' pooled_max: first measured as "BatchNorm added" on the BatchNorm-free net,
the same runs). Flip test-time augmentation needs no row: every
run's report line has it (the TTA column). Three seeds per row, so a change is an effect only
when it is larger than the seed-to-seed spread (the report's intervals say which).

The `pooled_max` row is the families experiment's own (same name, same config): given the same
`--runs` folder it is not trained again.
"""

from configs import fashion_mnist
from experiments import define, epochs_budget, families

QUESTION = (
    "What does each ingredient of the Fashion-MNIST recipe (warm-up, cosine schedule, crop "
    "and flip augmentation, BatchNorm; label smoothing and weight averaging added) change in "
    "the max-pooled ConvNet's accuracy, beyond the seed-to-seed spread?"
)
CHANGES = {
    "pooled_max": {},  # the recipe itself
    "no_warmup": {"schedule.warmup_steps": 0},
    "constant_lr": {"schedule.name": "constant"},
    "no_augmentation": {"dataset.augment_crop_padding": 0, "dataset.augment_flip": False},
    "label_smoothing": {"training.label_smoothing": 0.1},
    "weight_averaging": {"training.ema_decay": 0.999},
    "no_batchnorm": {"model.norm": "none"},
}
PRESETS = {row: "pooled_max" for row in CHANGES}
VARIANTS = ("fashion_mnist",)  # the recipe under study is the Fashion-MNIST one
BUDGETS = {
    "fashion_mnist": epochs_budget(families.FASHION_MNIST_EPOCHS, fashion_mnist.STEPS_PER_EPOCH)
}
# the warm-up row sets warmup_steps after the budget's one-epoch warm-up
VARIANT_OVERRIDES = {
    "fashion_mnist": {row: {**families.POOLED_BN, **o} for row, o in CHANGES.items()}
}

get_experiment = define(
    "recipe",
    QUESTION,
    PRESETS,
    budgets=BUDGETS,
    seeds={"fashion_mnist": (0, 1, 2)},
    variant_overrides=VARIANT_OVERRIDES,
)
