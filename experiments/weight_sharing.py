"""weight_sharing: the same ConvNet with and without weight sharing, and a dense network.

Question: the notes claim that parameter sharing saves parameters and gives translation
equivariance (and, with pooling, some invariance). The plain ConvNet, the same layers as
locally connected layers (same receptive fields, one filter per position), and a dense
network with about the plain ConvNet's parameter count, put the claims to a test:
parameters, accuracy, and shift consistency.
"""

from configs import fashion_mnist
from experiments import define, epochs_budget, families

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
# The families experiment's converged protocols, every row at the plain ConvNet's budget
# (the slowest of its family to plateau): on the built-in data 16x16 without clutter, 2,400
# steps of batch 64; on Fashion-MNIST 15 epochs.
PLAIN_STEPS = families.SMALL_STEPS["plain"]
BUDGETS = {
    "small": {
        **families.SMALL,
        "training.num_steps": PLAIN_STEPS,
        "training.eval_every_steps": PLAIN_STEPS // 10,
        "training.checkpoint_every_steps": PLAIN_STEPS // 2,
    },
    "fashion_mnist": epochs_budget(families.FASHION_MNIST_EPOCHS, fashion_mnist.STEPS_PER_EPOCH),
    "cifar10": {},
}


get_experiment = define(
    "weight_sharing",
    QUESTION,
    PRESETS,
    budgets=BUDGETS,
    seeds={"small": (0, 1, 2), "fashion_mnist": (0, 1, 2)},
)
