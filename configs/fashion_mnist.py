"""Fashion-MNIST (28x28x1, 10 classes) from the official idx files, offline.

On Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in
/usr/share/datasets/fashion-mnist (the default below); elsewhere set
`--config.dataset.data_dir` to the folder holding `train-images-idx3-ubyte.gz` and friends.
5,000 training images are held out for model selection; the final test accuracy is reported
separately in results.json.
"""

import ml_collections

from configs import base

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# Steps of one pass over the 55,000 training images at batch 128 (429.7, rounded up).
STEPS_PER_EPOCH = 430
# ResNets here train with He et al.'s optimizer (arXiv 1512.03385, section 4.2: SGD, momentum
# 0.9, lr 0.1, batch 128; Nesterov momentum as configs/base.py's default), decayed by a cosine
# after a warm-up instead of the paper's steps at 32k/48k of 64k iterations (too long for a
# CPU), with L2 weight decay 5e-4, the usual value for short CIFAR schedules (1e-4 is the
# paper's for 64k iterations). AdamW, the default, suits the nets without BatchNorm.
RESNET_RECIPE = {
    "optimizer.name": "sgd",
    "optimizer.learning_rate": 0.1,
    "optimizer.momentum": 0.9,
    "optimizer.nesterov": True,
    "optimizer.weight_decay": 5e-4,
    "schedule.name": "cosine",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST config for model preset `arg`."""
    c = base.get_config(arg)
    c.dataset.name = "fashion_mnist"
    c.dataset.source = "files"
    c.dataset.data_dir = DEBIAN_DIR
    c.dataset.validation_size = 5_000
    c.dataset.eval_split = "validation"
    c.dataset.augment_crop_padding = 2
    c.dataset.augment_flip = True  # clothes are left-right symmetric
    c.training.batch_size = 128
    c.training.num_steps = 2_000
    c.training.eval_every_steps = 500
    c.training.checkpoint_every_steps = 500
    c.schedule.warmup_steps = 100
    return c
