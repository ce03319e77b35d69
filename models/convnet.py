"""Plain and pooled ConvNets, and the dense network they are compared with.

Plain: conv layers (stride 1) with activations, then the FC layer that computes the class
scores; nothing downsamples unless the config names it. `weight_sharing=False` makes every
conv locally connected (same receptive fields, one filter bank per output position), to
measure what sharing does to parameter count, accuracy and shift behaviour.
Pooled: the same stack with a pooling layer after the conv layers named in `pool_after`.
MLP: flatten, hidden dense layers, class scores (no conv layer at all).
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

DEFAULTS = {
    "widths": (16, 32, 32),  # K of each conv layer, in order (conv1, conv2, ...)
    "kernel_size": 3,  # F of every conv
    "stride": 1,  # S of every conv
    "padding": 1,  # P of every conv (zeros on each side); F=3, P=1 keeps H and W
    "weight_sharing": True,  # False: locally connected layers instead of convs
    "use_bias": True,
    "activation": "relu",
    "norm": "none",  # none | batch | layer, after each conv, before the activation
    "pool": "none",  # none | max | avg | l2 | depth
    "pool_after": (),  # conv layers (1 = conv1) followed by a pooling layer; () with "none"
    "pool_window": 2,  # F of the pooling window (channels for depth pooling)
    "pool_stride": 2,  # S of the pooling
    "pool_padding": 0,  # P of the pooling
    # hidden FC layers between the conv stack and the class scores; () for none (plain)
    "dense_widths": (),
    "dropout": 0.0,  # after each pooling layer and each hidden FC layer
}

MLP_DEFAULTS = {
    # Two hidden layers sized so that the parameter count (~345k at 32x32x3) matches the
    # plain ConvNet's (~342k): the weight-sharing comparison holds the budget fixed.
    "dense_widths": (108, 108),
    "use_bias": True,
    "activation": "relu",
    "norm": "none",
    "dropout": 0.0,
}

PRESETS = {
    # 3 conv layers at full resolution then the class scores: ~342k params at 32x32x3, most
    # of them in the FC layer (32*32*32 inputs).
    "plain": {},
    # The same layers without weight sharing: ~15M params at 32x32x3.
    "plain_local": {"weight_sharing": False},
    # Pooling after each of 3 stages halves H and W: 32 -> 16 -> 8 -> 4 (~114k params).
    **{
        f"pooled_{function}": {
            "widths": (32, 64, 128),
            "pool": function,
            "pool_after": (1, 2, 3),
        }
        for function in ("max", "avg", "l2")
    },
    # Depth pooling halves the channels instead (H, W stay 32): widths 16/32/64 pool to
    # 8/16/32, keeping the cost close to the plain net's.
    "pooled_depth": {"widths": (16, 32, 64), "pool": "depth", "pool_after": (1, 2, 3)},
}
MLP_PRESETS = {"mlp": {}}


def _check_pooling(cfg: ml_collections.ConfigDict, num_convs: int) -> tuple[int, ...]:
    """Returns the validated `pool_after` (empty when pool is 'none')."""
    function = require_choice(cfg, "pool", ("none", *layers.POOL_FUNCTIONS))
    pool_after = require_ints(cfg, "pool_after", 1)
    require_pool_window(cfg)  # checked even when unused, so a typo never waits for later
    if function == "none":
        if pool_after:
            raise UserError(
                f"model.pool_after = {pool_after} but model.pool = 'none': set model.pool "
                f"to one of {', '.join(layers.POOL_FUNCTIONS)}, or pool_after to ()"
            )
        return ()
    if not pool_after:
        raise UserError(
            f"model.pool = {function!r} but model.pool_after is empty: name the conv layers "
            "followed by a pooling layer, e.g. (1, 2, 3), or set model.pool = 'none'"
        )
    if max(pool_after) > num_convs:
        raise UserError(
            f"model.pool_after = {pool_after}: there are only {num_convs} conv layers "
            "(model.widths)"
        )
    return pool_after


def _dense_head(b: Builder, cfg: ml_collections.ConfigDict, num_classes: int) -> None:
    """Appends flatten, the hidden FC layers (each with activation and dropout) and the FC
    layer that computes the class scores."""
    b.flatten("flatten")
    for i, width in enumerate(require_ints(cfg, "dense_widths", 1), start=1):
        b.dense(f"hidden{i}", width, use_bias=cfg.use_bias)
        b.norm(f"hidden{i}_norm", cfg.norm)
        b.act(f"hidden{i}_{cfg.activation}", cfg.activation)
        b.dropout(f"hidden{i}_dropout", cfg.dropout)
    b.dense("fc", num_classes)


def _check_common(cfg: ml_collections.ConfigDict) -> None:
    require_choice(cfg, "activation", layers.ACTIVATIONS)
    require_choice(cfg, "norm", layers.NORMS)
    require_rate(cfg, "dropout")


def architecture(
    cfg: ml_collections.ConfigDict, input_shape: Sequence[int], num_classes: int
) -> list[LayerSpec]:
    """Returns the layers of a plain or pooled ConvNet (see DEFAULTS for the fields)."""
    _check_common(cfg)
    widths = require_ints(cfg, "widths", 1, min_length=1)
    kernel_size = require_int(cfg, "kernel_size", 1)
    stride = require_int(cfg, "stride", 1)
    padding = require_int(cfg, "padding", 0)
    pool_after = _check_pooling(cfg, len(widths))

    b = Builder(tuple(input_shape))
    for i, width in enumerate(widths, start=1):
        b.conv(
            f"conv{i}",
            width,
            kernel_size,
            stride,
            padding,
            use_bias=cfg.use_bias,
            weight_sharing=cfg.weight_sharing,
        )
        b.norm(f"norm{i}", cfg.norm)
        b.act(f"{cfg.activation}{i}", cfg.activation)
        if i in pool_after:
            b.pool(f"pool{i}", cfg.pool, cfg.pool_window, cfg.pool_stride, cfg.pool_padding)
            b.dropout(f"dropout{i}", cfg.dropout)
    _dense_head(b, cfg, num_classes)
    return b.specs


def mlp_architecture(
    cfg: ml_collections.ConfigDict, input_shape: Sequence[int], num_classes: int
) -> list[LayerSpec]:
    """Returns the layers of a dense network: flatten, hidden FC layers, class scores."""
    _check_common(cfg)
    b = Builder(tuple(input_shape))
    _dense_head(b, cfg, num_classes)
    return b.specs
