"""Springenberg et al. 2014, "Striving for Simplicity: The All Convolutional Net" (arXiv
1412.6806): base Model C (Table 1) and the three networks derived from it (Table 2).

Model C, on a 32x32 input:
    dropout 0.2 on the input
    3x3 conv 96, ReLU; 3x3 conv 96, ReLU; 3x3 max-pool stride 2 (32 -> 16); dropout 0.5
    3x3 conv 192, ReLU; 3x3 conv 192, ReLU; 3x3 max-pool stride 2 (16 -> 8); dropout 0.5
    3x3 conv 192 unpadded (8 -> 6), ReLU; 1x1 conv 192, ReLU; 1x1 conv 10, ReLU
    global average over 6x6; softmax (in the loss)
Strided-CNN-C drops each max-pool and gives the conv before it stride 2; ConvPool-CNN-C adds
a 3x3 conv before each max-pool; All-CNN-C replaces each max-pool by a 3x3 conv with
stride 2. Dropout (sec. 3.2.1: 20% on the input, 50% after each pooling layer or the layer
that replaces it). No BatchNorm in the paper (`norm` adds it, for experiments).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from errors import UserError
from models import layers
from models.builder import Builder
from models.checks import (
    require_choice,
    require_int,
    require_ints,
    require_pool_window,
    require_rate,
)
from models.shapes import LayerSpec

VARIANTS = ("base", "strided", "convpool", "allcnn")

DEFAULTS = {
    "variant": "base",  # base (Model C) | strided | convpool | allcnn (Table 2)
    "widths": (96, 192),  # K of the convs of each stage; the head uses the last width
    "kernel_size": 3,  # F of the stage convs (P = F // 2 keeps the size)
    "pool": "max",  # the pooling function of base and convpool (paper: max)
    "pool_window": 3,  # "3x3 max-pooling stride 2" (Table 1)
    "pool_stride": 2,
    "pool_padding": 1,  # 32 -> 16 -> 8, as in the paper's 6x6 final map
    "input_dropout": 0.2,  # sec. 3.2.1
    "dropout": 0.5,  # after each pooling layer or the layer that replaces it
    "activation": "relu",
    "norm": "none",  # the paper has none
    "scores_activation": True,  # Table 1 lists "1x1 conv. 10 ReLU" before the averaging
}

PRESETS = {
    "model_c": {"variant": "base"},
    "strided_c": {"variant": "strided"},
    "convpool_c": {"variant": "convpool"},
    "allcnn_c": {"variant": "allcnn"},
}


def _conv(
    b: Builder,
    cfg: ml_collections.ConfigDict,
    index: int,
    width: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
) -> None:
    padding = kernel_size // 2 if padding is None else padding
    b.conv(f"conv{index}", width, kernel_size, stride, padding)
    b.norm(f"norm{index}", cfg.norm)
    b.act(f"{cfg.activation}{index}", cfg.activation)


def architecture(
    cfg: ml_collections.ConfigDict, input_shape: Sequence[int], num_classes: int
) -> list[LayerSpec]:
    """Returns the layers of Model C or one of its derived networks (see DEFAULTS)."""
    variant = require_choice(cfg, "variant", VARIANTS)
    widths = require_ints(cfg, "widths", 1, min_length=1)
    kernel_size = require_int(cfg, "kernel_size", 1)
    if kernel_size % 2 == 0:
        raise UserError(
            f"model.kernel_size = {kernel_size}: must be odd, so that P = F // 2 keeps H and W "
            "(as the paper's 3x3 convs do)"
        )
    require_choice(cfg, "activation", layers.ACTIVATIONS)
    require_choice(cfg, "norm", layers.NORMS)
    dropout = require_rate(cfg, "dropout")
    # Checked for every variant (strided and allcnn leave them unused), so a typo never waits.
    require_choice(cfg, "pool", layers.POOL_FUNCTIONS)
    require_pool_window(cfg)

    b = Builder(tuple(input_shape))
    b.dropout("input_dropout", require_rate(cfg, "input_dropout"))
    conv_index = 0
    for stage, width in enumerate(widths, start=1):
        convs = 3 if variant == "convpool" else 2
        for i in range(convs):
            conv_index += 1
            last = i == convs - 1
            _conv(
                b,
                cfg,
                conv_index,
                width,
                kernel_size,
                stride=2 if variant == "strided" and last else 1,
            )
        if variant == "allcnn":
            conv_index += 1
            _conv(b, cfg, conv_index, width, 3, stride=2, padding=1)
        elif variant in ("base", "convpool"):
            b.pool(f"pool{stage}", cfg.pool, cfg.pool_window, cfg.pool_stride, cfg.pool_padding)
        b.dropout(f"dropout{stage}", dropout)

    # The head of Table 1: an unpadded 3x3 conv, a 1x1 conv, and a 1x1 conv to the classes.
    _conv(b, cfg, conv_index + 1, widths[-1], 3, padding=0)
    _conv(b, cfg, conv_index + 2, widths[-1], 1)
    b.conv(f"conv{conv_index + 3}", num_classes, 1)
    if cfg.scores_activation:
        b.act(f"{cfg.activation}{conv_index + 3}", cfg.activation)
    b.global_avg_pool("global_pool")
    return b.specs
