"""families: the four model families on one dataset at the same training budget.

Question: at the same number of steps and batch size, how do a plain ConvNet (no
downsampling), a max-pooled ConvNet, an all-convolutional net (All-CNN-C) and a residual net
(ResNet-20) compare in accuracy, parameters, compute and shift consistency?
"""

from experiments import define

QUESTION = (
    "At the same training budget, how do a plain ConvNet, a max-pooled ConvNet, an "
    "all-convolutional net (All-CNN-C) and a ResNet-20 compare in accuracy, size, cost and "
    "translation invariance?"
)
PRESETS = {
    "plain": "plain",
    "pooled_max": "pooled_max",
    "allcnn_c": "allcnn_c",
    "resnet20": "resnet20",
}

# The CPU versions halve All-CNN-C's widths (96/192 -> 48/96): at full width one step costs
# as much as the other three families together on a 2-core CPU. They also add BatchNorm:
# without it All-CNN-C sits on its initial plateau (loss ln 10, chance accuracy) for longer
# than the whole CPU budget (measured: 300 steps on the built-in data, AdamW 1e-3 or 3e-4,
# with or without dropout). The cifar10 version keeps the paper's exact layers.
SMALL_ALLCNN = {"allcnn_c": {"model.widths": (48, 96), "model.norm": "batch"}}
BUDGETS = {
    "small": {"training.num_steps": 300, "training.eval_every_steps": 100},
    "fashion_mnist": {"training.num_steps": 400, "training.eval_every_steps": 100},
    "cifar10": {},
}


get_experiment = define(
    "families",
    QUESTION,
    PRESETS,
    budgets=BUDGETS,
    seeds={"small": (0,), "fashion_mnist": (0, 1)},
    cpu_overrides=SMALL_ALLCNN,
)
