"""Layer arithmetic: output sizes, parameter counts, FLOPs and receptive fields.

This is the one source of truth for the formulas of the notes (F kernel size, S stride,
P padding, D1 input depth, K filters):

    W2 = floor((W1 + 2P - F) / S) + 1          (conv, locally connected, pooling)
    params = (F * F * D1) * K + K              (conv; a locally connected layer has one
                                                such filter bank per output position)

The architecture summary, the config validation (`models.architecture`) and the tests all use
these functions. Each layer kind (`models.kinds`) computes its `LayerSpec` with them, and
`models.builder.Builder` turns a family's layer list into specs with every number filled in,
so a family only says which layers it has; the real Flax modules are then built from the same
specs (`models.network`), and summary and model cannot disagree.

Shapes are per example, NHWC without the batch axis: (H, W, C) for feature maps, (D,) after
flattening. FLOPs count one multiply-accumulate as 2, for one example, forward, at inference.
"""

from __future__ import annotations

import dataclasses

from errors import UserError

Shape = tuple[int, ...]

INPUT = "input"  # the name under which layers refer to the network's input


class ShapeError(UserError):
    """A layer's output would be empty: the message names the layer and the formula's numbers."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of an architecture, with every derived number filled in.

    `kind` is one of: conv, local (locally connected: conv without weight sharing), dense,
    pool, global_pool, flatten, norm, act, dropout, shortcut (zero-padding identity, option A),
    add: a key of `models.kinds.KINDS`, whose class computes, builds, runs and summarises the
    layer. `function` names the variant of the kind: the pooling function (max|avg|l2|depth),
    the activation, the normalisation (batch|layer). `inputs` names the layers this one reads
    (default: the one listed before it; `INPUT` is the network's input).
    """

    name: str
    kind: str
    in_shape: Shape
    out_shape: Shape
    kernel_size: int = 0  # F
    stride: int = 0  # S
    padding: int = 0  # P (symmetric: P zeros on each side)
    function: str = ""
    rate: float = 0.0  # dropout probability
    use_bias: bool = False
    weights: int = 0
    biases: int = 0
    batch_stats: int = 0  # BatchNorm running mean and variance: state, not trained
    flops: int = 0
    receptive_field: int = 1  # side of the input region one output unit sees, in pixels
    jump: int = 1  # input pixels between neighbouring output units (product of strides)
    inputs: tuple[str, ...] = ()
    shared_params: int = 0  # local layers: the params of the same layer with sharing

    @property
    def params(self) -> int:
        """Trained parameters of this layer: weights + biases."""
        return self.weights + self.biases


# --- formulas -------------------------------------------------------------------------------


def conv_output_size(
    size: int, kernel_size: int, stride: int, padding: int, *, layer: str, axis: str = "W"
) -> int:
    """Returns floor((size + 2P - F)/S) + 1; raises ShapeError naming `layer` if it is <= 0."""
    out = (size + 2 * padding - kernel_size) // stride + 1
    if out <= 0:
        raise ShapeError(
            f"layer '{layer}': {axis}2 = floor(({size} + 2*{padding} - {kernel_size})/{stride})"
            f" + 1 = {out} <= 0; make the kernel smaller, add padding or remove a downsampling"
            " stage"
        )
    return out


def conv_params(
    kernel_size: int, in_channels: int, filters: int, use_bias: bool = True
) -> tuple[int, int]:
    """Returns (weights, biases) of a conv layer: ((F*F*D1)*K, K), biases 0 without bias."""
    return kernel_size * kernel_size * in_channels * filters, filters if use_bias else 0


def local_params(
    out_height: int,
    out_width: int,
    kernel_size: int,
    in_channels: int,
    filters: int,
    use_bias: bool = True,
) -> tuple[int, int]:
    """Returns (weights, biases) of a locally connected layer: one conv filter bank per output
    position, so `conv_params` times H2*W2."""
    weights, biases = conv_params(kernel_size, in_channels, filters, use_bias)
    positions = out_height * out_width
    return positions * weights, positions * biases


def dense_params(in_features: int, out_features: int, use_bias: bool = True) -> tuple[int, int]:
    """Returns (weights, biases) of a dense layer: (D1*K, K)."""
    return in_features * out_features, out_features if use_bias else 0


def receptive_field(previous: int, jump: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Returns (receptive field, jump) after a window layer: r + (F-1)*j and j*S."""
    return previous + (kernel_size - 1) * jump, jump * stride


def size(shape: Shape) -> int:
    """Returns the number of entries of an array of `shape` (1 for ())."""
    n = 1
    for d in shape:
        n *= d
    return n
