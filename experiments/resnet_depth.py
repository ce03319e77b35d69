"""resnet_depth: ResNet-20/32/44/56/110 (He et al. 2015, section 4.2, Table 6).

Question: with identity shortcuts, does accuracy keep improving with depth at a fixed
recipe, and what does each step of depth cost in time?
"""

from configs import fashion_mnist
from experiments import Ordering, Reference, define, epochs_budget, families, steps_budget

QUESTION = (
    "With identity shortcuts, does accuracy keep improving from 20 to 110 layers (He et al. "
    "2015, Table 6), and what does the depth cost?"
)
PRESETS = {f"resnet{d}": f"resnet{d}" for d in (20, 32, 44, 56, 110)}
# Narrowed on a CPU to the depths it can train to a plateau with 3 seeds: ResNet-20 and
# ResNet-32 (one Fashion-MNIST run of ResNet-32 costs about 40 minutes on the 2-core
# development machine; ResNet-44/56/110 would cost 1-2.5 hours each). cifar10 keeps all five.
CPU_ROWS = ("resnet20", "resnet32")
# The families experiment's converged protocols (its ResNet-20 runs are this experiment's
# when both are given the same --runs folder): on the built-in data its small recipe and
# ResNet-20's steps for every depth; on Fashion-MNIST 15 epochs of He et al.'s SGD recipe.
BUDGETS = {
    "small": families.SMALL,
    "fashion_mnist": epochs_budget(families.FASHION_MNIST_EPOCHS, fashion_mnist.STEPS_PER_EPOCH),
    "cifar10": {},
}
VARIANT_OVERRIDES = {
    "small": {row: steps_budget(families.SMALL_STEPS["resnet20"]) for row in CPU_ROWS},
    "fashion_mnist": {row: fashion_mnist.RESNET_RECIPE for row in CPU_ROWS},
}
# Zhong et al. 2017 (arXiv 1708.04896), baseline (crops and flips) test error on
# Fashion-MNIST, their repository's table; He et al. 2015 Table 6 for CIFAR-10.
ZHONG = "Zhong et al. 2017, arXiv 1708.04896, their repository's table"
PUBLISHED = {
    "fashion_mnist": {
        "resnet20": Reference(1 - 0.0439, f"{ZHONG}: ResNet-20 baseline, 4.39 % error"),
        "resnet32": Reference(1 - 0.0416, f"{ZHONG}: ResNet-32 baseline, 4.16 % error"),
    },
    "cifar10": {
        f"resnet{d}": Reference(1 - e / 100, f"He et al. 2015, Table 6: {e} % error")
        for d, e in ((20, 8.75), (32, 7.51), (44, 7.17), (56, 6.97), (110, 6.43))
    },
}
ORDERINGS = (
    Ordering(
        "resnet32",
        "resnet20",
        "ResNet-32 7.51 %, ResNet-20 8.75 % (CIFAR-10 error, He et al. Table 6); "
        "Fashion-MNIST 4.16 % and 4.39 % (Zhong et al.)",
    ),
)

get_experiment = define(
    "resnet_depth",
    QUESTION,
    PRESETS,
    budgets=BUDGETS,
    seeds={"small": (0, 1, 2), "fashion_mnist": (0, 1, 2)},
    variant_overrides=VARIANT_OVERRIDES,
    rows={"small": CPU_ROWS, "fashion_mnist": CPU_ROWS},
    published=PUBLISHED,
    orderings=ORDERINGS,
)
