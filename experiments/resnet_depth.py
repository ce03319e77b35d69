"""resnet_depth: ResNet-20/32/44/56/110 (He et al. 2015, section 4.2, Table 6).

Question: with identity shortcuts, does accuracy keep improving with depth at a fixed
recipe, and what does each step of depth cost in time?
"""

from experiments import define

QUESTION = (
    "With identity shortcuts, does accuracy keep improving from 20 to 110 layers (He et al. "
    "2015, Table 6), and what does the depth cost?"
)
PRESETS = {f"resnet{d}": f"resnet{d}" for d in (20, 32, 44, 56, 110)}
BUDGETS = {
    "small": {"training.num_steps": 200, "training.eval_every_steps": 100},
    "fashion_mnist": {"training.num_steps": 200, "training.eval_every_steps": 100},
    "cifar10": {},
}


get_experiment = define(
    "resnet_depth",
    QUESTION,
    PRESETS,
    budgets=BUDGETS,
    seeds={"small": (0,), "fashion_mnist": (0, 1)},
)
