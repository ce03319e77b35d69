"""weight_sharing: the same ConvNet with and without weight sharing, and a dense network.

Question: the notes claim that parameter sharing saves parameters and gives translation
equivariance (and, with pooling, some invariance). The plain ConvNet, the same layers as
locally connected layers (same receptive fields, one filter per position), and a dense
network with about the plain ConvNet's parameter count, put the claims to a test:
parameters, accuracy, and shift consistency.
"""

from experiments import define

QUESTION = (
    "What does weight sharing buy? The plain ConvNet against the same layers locally "
    "connected (no sharing) and a dense network of similar size: parameters, accuracy, and "
    "how predictions survive shifts."
)
PRESETS = {
    "plain (shared)": "plain",
    "plain_local (not shared)": "plain_local",
    "mlp (dense)": "mlp",
}
BUDGETS = {
    "small": {"training.num_steps": 300, "training.eval_every_steps": 100},
    "fashion_mnist": {"training.num_steps": 300, "training.eval_every_steps": 100},
    "cifar10": {},
}


get_experiment = define(
    "weight_sharing",
    QUESTION,
    PRESETS,
    budgets=BUDGETS,
    seeds={"small": (0,), "fashion_mnist": (0, 1)},
)
