"""pooling_vs_strided: Springenberg et al.'s Model C family, and four pooling functions.

Question 1 (arXiv 1412.6806, Tables 2 and 3): can a stride-2 convolution replace max-pooling without
losing accuracy? Model C (max-pool), Strided-CNN-C (pool removed, previous conv strided),
ConvPool-CNN-C (an extra conv before each pool: the control for the added parameters) and
All-CNN-C (pool replaced by a 3x3 stride-2 conv).
Question 2: in the same pooled ConvNet, what do max, average, L2 and depth (channel) pooling
change?
"""

from configs import fashion_mnist
from experiments import Ordering, define, epochs_budget, families, steps_budget

QUESTION = (
    "Can a stride-2 convolution replace max-pooling (Springenberg et al. 2014's Model C "
    "family), and what do max, average, L2 and depth pooling change in the same network?"
)
PRESETS = {
    "model_c": "model_c",
    "strided_c": "strided_c",
    "convpool_c": "convpool_c",
    "allcnn_c": "allcnn_c",
    "pooled_max": "pooled_max",
    "pooled_avg": "pooled_avg",
    "pooled_l2": "pooled_l2",
    "pooled_depth": "pooled_depth",
}
MODEL_C = ("model_c", "strided_c", "convpool_c", "allcnn_c")
POOLED = ("pooled_max", "pooled_avg", "pooled_l2", "pooled_depth")
# On a CPU the whole Model C family gets the changes families.py makes to All-CNN-C (a third
# of the widths, BatchNorm, no dropout; see its comment for the measurements), every variant
# alike, so the comparison stays fair and families' All-CNN-C runs are this experiment's. The
# cifar10 version keeps the paper's exact layers.
CPU_MODEL_C = {name: families.CPU_ALLCNN["allcnn_c"] for name in MODEL_C}
# The families experiment's converged protocols: on the built-in data its small recipe with
# All-CNN-C's steps for the Model C family and pooled_max's for the pooled nets; on
# Fashion-MNIST 15 epochs for every row. Rows equal to a families row (allcnn_c, pooled_max)
# share its runs when both experiments are given the same --runs folder.
BUDGETS = {
    "small": families.SMALL,
    "fashion_mnist": epochs_budget(families.FASHION_MNIST_EPOCHS, fashion_mnist.STEPS_PER_EPOCH),
    "cifar10": {},
}
SMALL_STEPS = {
    **{row: families.SMALL_STEPS["allcnn_c"] for row in MODEL_C},
    **{row: families.SMALL_STEPS["pooled_max"] for row in POOLED},
}
VARIANT_OVERRIDES = {
    "small": {row: steps_budget(steps) for row, steps in SMALL_STEPS.items()},
    # the four pooling functions in families' pooled ConvNet, BatchNorm included
    "fashion_mnist": {row: families.POOLED_BN for row in POOLED},
}
# Springenberg et al. (arXiv 1412.6806), Table 3: CIFAR-10 test error without augmentation.
TABLE_3 = "CIFAR-10 error, Springenberg et al. Table 3"
ORDERINGS = (
    Ordering("model_c", "strided_c", f"Model C 9.74 %, Strided-CNN-C 10.19 % ({TABLE_3})"),
    Ordering("allcnn_c", "model_c", f"All-CNN-C 9.08 %, Model C 9.74 % ({TABLE_3})"),
    Ordering(
        "allcnn_c",
        "convpool_c",
        f"All-CNN-C 9.08 %, ConvPool-CNN-C 9.31 % ({TABLE_3}; the paper: on par)",
        tied=True,
    ),
)

get_experiment = define(
    "pooling_vs_strided",
    QUESTION,
    PRESETS,
    budgets=BUDGETS,
    seeds={"small": (0, 1, 2), "fashion_mnist": (0, 1, 2)},
    cpu_overrides=CPU_MODEL_C,
    variant_overrides=VARIANT_OVERRIDES,
    orderings=ORDERINGS,
)
