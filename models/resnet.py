"""CIFAR ResNets: He et al. 2015 (arXiv 1512.03385) sec. 4.2, and a wide pre-activation variant.

basic (He et al. 2015, sec. 4.2): a 3x3 conv with 16 filters, then 3 stages of n residual
blocks with widths 16/32/64 on 32x32/16x16/8x8 maps, each block two 3x3 convs
(conv-BN-ReLU-conv-BN, add, ReLU); the first conv of stages 2 and 3 has stride 2; global
average pooling and a 10-way FC layer. Depth 6n+2 counts the weighted layers: n = 3, 5, 7, 9,
18 give ResNet-20/32/44/56/110 (Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters).
Shortcuts are identities; where the shape changes, option A (sec. 3.3, used for CIFAR)
subsamples and zero-pads the channels (no parameters), option B projects with a strided 1x1
conv + BN.

preact (Zagoruyko & Komodakis 2016, "Wide Residual Networks", arXiv 1605.07146): blocks
BN-ReLU-conv-BN-ReLU-(dropout)-conv (He et al. 2016, arXiv 1603.05027), widths 16k/32k/64k,
final BN-ReLU before the pooling, 1x1 projection shortcuts; WRN-d-k has depth 6n+4.
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
    require_rate,
)
from models.shapes import LayerSpec

BLOCKS = ("basic", "preact")
# Weighted layers outside the residual blocks: the first conv and the FC layer (He et al.);
# WRN's depth also counts the two projection shortcuts (n = (d - 4) / 6 in its code).
_EXTRA_DEPTH = {"basic": 2, "preact": 4}

DEFAULTS = {
    "depth": 20,  # basic: 6n+2, preact: 6n+4 (with 3 stages)
    "block": "basic",  # basic (He et al. 2015) | preact (WRN)
    "stem_width": 16,  # K of the first conv
    "widths": (16, 32, 64),  # K of each stage; stages after the first halve H and W
    "shortcut": "A",  # A: zero-padding identity | B: 1x1 conv projection + norm
    "norm": "batch",  # batch | layer | none (convs get biases only without a norm)
    "activation": "relu",
    "dropout": 0.0,  # between the two convs of a block (WRN; 0 in He et al.)
}

PRESETS = {
    **{f"resnet{6 * n + 2}": {"depth": 6 * n + 2} for n in (3, 5, 7, 9, 18)},
    "resnet20_b": {"depth": 20, "shortcut": "B"},
    # WRN-16-4 (k = 4): ~2.7M parameters.
    "wide_resnet": {"depth": 16, "block": "preact", "widths": (64, 128, 256), "shortcut": "B"},
}


def blocks_per_stage(cfg: ml_collections.ConfigDict, num_stages: int) -> int:
    """Returns n, the residual blocks per stage, from `depth`; UserError if none fits."""
    depth = require_int(cfg, "depth", 1)
    extra = _EXTRA_DEPTH[cfg.block]
    n, remainder = divmod(depth - extra, 2 * num_stages)
    if remainder or n < 1:
        examples = ", ".join(str(2 * num_stages * k + extra) for k in (1, 2, 3, 5, 9))
        raise UserError(
            f"model.depth = {depth}: a '{cfg.block}' ResNet with {num_stages} stages has depth "
            f"{2 * num_stages}n+{extra}, e.g. {examples}"
        )
    return n


def _shortcut(
    b: Builder,
    cfg: ml_collections.ConfigDict,
    prefix: str,
    block_in: str,
    projection_in: str,
    width: int,
    stride: int,
) -> str:
    """Returns the name of the layer that carries the block input to the addition."""
    if stride == 1 and b.shape(block_in)[-1] == width:
        return block_in
    if cfg.shortcut == "A":
        if width < b.shape(block_in)[-1]:
            raise UserError(
                f"layer '{prefix}': shortcut option A can only add zero channels, but the "
                f"block narrows {b.shape(block_in)[-1]} -> {width}; use model.shortcut = 'B'"
            )
        return b.shortcut(f"{prefix}_shortcut", width, stride, source=block_in)
    b.conv(
        f"{prefix}_shortcut_conv",
        width,
        1,
        stride,
        0,
        use_bias=cfg.norm == "none",
        source=projection_in,
    )
    if cfg.block == "basic":
        b.norm(f"{prefix}_shortcut_norm", cfg.norm)
    return b.last


def _basic_block(
    b: Builder, cfg: ml_collections.ConfigDict, prefix: str, width: int, stride: int
) -> None:
    block_in = b.last
    bias = cfg.norm == "none"  # a norm's offset makes a conv bias redundant
    b.conv(f"{prefix}_conv1", width, 3, stride, 1, use_bias=bias)
    b.norm(f"{prefix}_norm1", cfg.norm)
    b.act(f"{prefix}_{cfg.activation}1", cfg.activation)
    b.dropout(f"{prefix}_dropout", cfg.dropout)
    b.conv(f"{prefix}_conv2", width, 3, 1, 1, use_bias=bias)
    residual = b.norm(f"{prefix}_norm2", cfg.norm)
    shortcut = _shortcut(b, cfg, prefix, block_in, block_in, width, stride)
    b.add(f"{prefix}_add", residual, shortcut)
    b.act(f"{prefix}_{cfg.activation}2", cfg.activation)


def _preact_block(
    b: Builder, cfg: ml_collections.ConfigDict, prefix: str, width: int, stride: int
) -> None:
    block_in = b.last
    bias = cfg.norm == "none"
    b.norm(f"{prefix}_norm1", cfg.norm)
    # WRN projects the pre-activated input where the shape changes.
    preactivated = b.act(f"{prefix}_{cfg.activation}1", cfg.activation)
    b.conv(f"{prefix}_conv1", width, 3, stride, 1, use_bias=bias)
    b.norm(f"{prefix}_norm2", cfg.norm)
    b.act(f"{prefix}_{cfg.activation}2", cfg.activation)
    b.dropout(f"{prefix}_dropout", cfg.dropout)
    residual = b.conv(f"{prefix}_conv2", width, 3, 1, 1, use_bias=bias)
    shortcut = _shortcut(b, cfg, prefix, block_in, preactivated, width, stride)
    b.add(f"{prefix}_add", residual, shortcut)


def architecture(
    cfg: ml_collections.ConfigDict, input_shape: Sequence[int], num_classes: int
) -> list[LayerSpec]:
    """Returns the layers of a CIFAR ResNet (see DEFAULTS for the fields)."""
    block = require_choice(cfg, "block", BLOCKS)
    widths = require_ints(cfg, "widths", 1, min_length=1)
    n = blocks_per_stage(cfg, len(widths))
    stem_width = require_int(cfg, "stem_width", 1)
    require_choice(cfg, "shortcut", ("A", "B"))
    require_choice(cfg, "norm", layers.NORMS)
    require_choice(cfg, "activation", layers.ACTIVATIONS)
    require_rate(cfg, "dropout")

    b = Builder(tuple(input_shape))
    b.conv("stem_conv", stem_width, 3, 1, 1, use_bias=cfg.norm == "none")
    if block == "basic":
        b.norm("stem_norm", cfg.norm)
        b.act(f"stem_{cfg.activation}", cfg.activation)
    add_block = _basic_block if block == "basic" else _preact_block
    for stage, width in enumerate(widths, start=1):
        for k in range(1, n + 1):
            stride = 2 if stage > 1 and k == 1 else 1
            add_block(b, cfg, f"stage{stage}_block{k}", width, stride)
    if block == "preact":
        b.norm("final_norm", cfg.norm)
        b.act(f"final_{cfg.activation}", cfg.activation)
    b.global_avg_pool("global_pool")
    b.dense("fc", num_classes)
    return b.specs
