"""Layer arithmetic: output sizes, parameter counts, FLOPs and receptive fields.

This is the one source of truth for the formulas of the notes (F kernel size, S stride,
P padding, D1 input depth, K filters):

    W2 = floor((W1 + 2P - F) / S) + 1          (conv, locally connected, pooling)
    params = (F * F * D1) * K + K              (conv; a locally connected layer has one
                                                such filter bank per output position)

The architecture summary, the config validation (`models.architecture`) and the tests all use
these functions. `Builder` turns a family's layer list into `LayerSpec`s with every number
filled in, so a family only says which layers it has; the real Flax modules are then built
from the same specs (`models.network`), and summary and model cannot disagree.

Shapes are per example, NHWC without the batch axis: (H, W, C) for feature maps, (D,) after
flattening. FLOPs count one multiply-accumulate as 2, for one example, forward, at inference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

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
    add. `function` names the variant of the kind: the pooling function (max|avg|l2|depth),
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


def _size(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- config checks --------------------------------------------------------------------------


def require_int(cfg: Mapping[str, Any], field: str, minimum: int) -> int:
    """Returns `cfg[field]`; raises UserError naming `model.<field>` unless an int >= minimum."""
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"model.{field} = {value!r}: must be an integer >= {minimum}")
    return value


def require_ints(
    cfg: Mapping[str, Any], field: str, minimum: int, min_length: int = 0
) -> tuple[int, ...]:
    """Returns `cfg[field]` as a tuple; raises UserError unless it holds at least `min_length`
    entries, each an int >= minimum."""
    values = cfg[field]
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, Iterable) or isinstance(values, str):
        raise UserError(f"model.{field} = {values!r}: must be a tuple of integers")
    values = tuple(values)
    if len(values) < min_length:
        raise UserError(f"model.{field} = {values!r}: must have at least {min_length} value(s)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise UserError(
                f"model.{field} = {values!r}: every entry must be an integer >= {minimum}"
            )
    return values


def require_choice(cfg: Mapping[str, Any], field: str, choices: Iterable[str]) -> str:
    """Returns `cfg[field]`; raises UserError listing the valid choices unless it is one."""
    value = cfg[field]
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"model.{field} = {value!r}: must be one of {', '.join(choices)}")
    return value


def require_rate(cfg: Mapping[str, Any], field: str) -> float:
    """Returns `cfg[field]`; raises UserError unless it is a probability in [0, 1)."""
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise UserError(f"model.{field} = {value!r}: must be a probability in [0, 1)")
    return float(value)


def require_pool_window(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """Returns (pool_window, pool_stride, pool_padding) from `cfg`; UserError unless they are
    integers F >= 1, S >= 1, 0 <= P <= F/2 (more padding leaves windows of padding only)."""
    window = require_int(cfg, "pool_window", 1)
    stride = require_int(cfg, "pool_stride", 1)
    padding = require_int(cfg, "pool_padding", 0)
    if 2 * padding > window:
        raise UserError(
            f"model.pool_padding = {padding}: at most half the window "
            f"(pool_window = {window}), or some windows would hold only padding"
        )
    return window, stride, padding


# --- building an architecture ----------------------------------------------------------------


class Builder:
    """Collects the LayerSpecs of one network, computing each layer's numbers from its input.

    Every method appends one layer reading `source` (default: the last layer added) and
    returns its name; layers that would do nothing (dropout 0, norm 'none') are not added
    and the method returns `source`.
    """

    def __init__(self, input_shape: Shape):
        self.specs: list[LayerSpec] = []
        self._by_name: dict[str, LayerSpec] = {
            INPUT: LayerSpec(INPUT, "input", tuple(input_shape), tuple(input_shape))
        }
        self.last = INPUT

    def shape(self, name: str | None = None) -> Shape:
        """Returns the output shape of layer `name` (default: the last layer added)."""
        return self._by_name[name or self.last].out_shape

    def _add(self, spec: LayerSpec) -> str:
        if spec.name in self._by_name:
            raise ValueError(f"duplicate layer name {spec.name!r}")
        self._by_name[spec.name] = spec
        self.specs.append(spec)
        self.last = spec.name
        return spec.name

    def _source(self, name: str, source: str | None, rank: int | None = 3) -> LayerSpec:
        src = self._by_name[source or self.last]
        if rank is not None and len(src.out_shape) != rank:
            raise UserError(
                f"layer '{name}' needs a {rank}-D input (H, W, C) but '{src.name}' gives "
                f"{src.out_shape}; move the layer before the flatten / dense layers"
            )
        return src

    def _inputs(self, source: str | None) -> tuple[str, ...]:
        # Only non-default sources are recorded, so a plain stack stays a plain list.
        return () if source is None or source == self.last else (source,)

    def _window(
        self, name: str, src: LayerSpec, kernel_size: int, stride: int, padding: int
    ) -> tuple[int, int]:
        h, w, _ = src.out_shape
        return (
            conv_output_size(h, kernel_size, stride, padding, layer=name, axis="H"),
            conv_output_size(w, kernel_size, stride, padding, layer=name, axis="W"),
        )

    def conv(
        self,
        name: str,
        filters: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        use_bias: bool = True,
        weight_sharing: bool = True,
        source: str | None = None,
    ) -> str:
        """A conv layer (or, without weight sharing, a locally connected one)."""
        src = self._source(name, source)
        h2, w2 = self._window(name, src, kernel_size, stride, padding)
        d1 = src.out_shape[2]
        shared = conv_params(kernel_size, d1, filters, use_bias)
        if weight_sharing:
            weights, biases = shared
        else:
            weights, biases = local_params(h2, w2, kernel_size, d1, filters, use_bias)
        out_shape = (h2, w2, filters)
        rf, jump = receptive_field(src.receptive_field, src.jump, kernel_size, stride)
        return self._add(
            LayerSpec(
                name,
                "conv" if weight_sharing else "local",
                src.out_shape,
                out_shape,
                kernel_size=kernel_size,
                stride=stride,
                padding=padding,
                use_bias=use_bias,
                weights=weights,
                biases=biases,
                flops=2 * kernel_size * kernel_size * d1 * _size(out_shape),
                receptive_field=rf,
                jump=jump,
                inputs=self._inputs(source),
                shared_params=0 if weight_sharing else sum(shared),
            )
        )

    def pool(
        self,
        name: str,
        function: str,
        window: int,
        stride: int,
        padding: int,
        *,
        source: str | None = None,
    ) -> str:
        """A pooling layer; `function` max|avg|l2 pools H and W, depth pools the channels."""
        src = self._source(name, source)
        h, w, c = src.out_shape
        if function == "depth":
            out_shape = (h, w, conv_output_size(c, window, stride, padding, layer=name, axis="D"))
            rf, jump = src.receptive_field, src.jump  # H and W untouched
            flops = window * _size(out_shape)
        else:
            out_shape = (*self._window(name, src, window, stride, padding), c)
            rf, jump = receptive_field(src.receptive_field, src.jump, window, stride)
            flops = window * window * _size(out_shape)
        return self._add(
            LayerSpec(
                name,
                "pool",
                src.out_shape,
                out_shape,
                kernel_size=window,
                stride=stride,
                padding=padding,
                function=function,
                flops=flops,
                receptive_field=rf,
                jump=jump,
                inputs=self._inputs(source),
            )
        )

    def _whole_map_rf(self, src: LayerSpec) -> int:
        # A unit that sees the whole map sees r + (extent - 1)*j input pixels.
        if len(src.out_shape) != 3:
            return src.receptive_field
        return src.receptive_field + (max(src.out_shape[:2]) - 1) * src.jump

    def global_avg_pool(self, name: str, *, source: str | None = None) -> str:
        """Averages each channel over H and W: (H, W, C) -> (C,)."""
        src = self._source(name, source)
        c = src.out_shape[2]
        return self._add(
            LayerSpec(
                name,
                "global_pool",
                src.out_shape,
                (c,),
                function="avg",
                flops=_size(src.out_shape),
                receptive_field=self._whole_map_rf(src),
                jump=src.jump,
                inputs=self._inputs(source),
            )
        )

    def flatten(self, name: str, *, source: str | None = None) -> str:
        """Flattens (H, W, C) to (H*W*C,); its receptive field is the region the vector sees."""
        src = self._source(name, source)
        return self._add(
            LayerSpec(
                name,
                "flatten",
                src.out_shape,
                (_size(src.out_shape),),
                receptive_field=self._whole_map_rf(src),
                jump=src.jump,
                inputs=self._inputs(source),
            )
        )

    def dense(
        self, name: str, features: int, *, use_bias: bool = True, source: str | None = None
    ) -> str:
        """A fully connected layer on a flat input (D1,) -> (K,)."""
        src = self._source(name, source, rank=1)
        weights, biases = dense_params(src.out_shape[0], features, use_bias)
        return self._add(
            LayerSpec(
                name,
                "dense",
                src.out_shape,
                (features,),
                use_bias=use_bias,
                weights=weights,
                biases=biases,
                flops=2 * weights,
                receptive_field=src.receptive_field,
                jump=src.jump,
                inputs=self._inputs(source),
            )
        )

    def _elementwise(
        self,
        name: str,
        kind: str,
        source: str | None,
        *,
        function: str = "",
        rate: float = 0.0,
        weights: int = 0,
        biases: int = 0,
        batch_stats: int = 0,
        flops_per_element: int = 0,
    ) -> str:
        src = self._source(name, source, rank=None)
        return self._add(
            LayerSpec(
                name,
                kind,
                src.out_shape,
                src.out_shape,
                function=function,
                rate=rate,
                weights=weights,
                biases=biases,
                batch_stats=batch_stats,
                flops=flops_per_element * _size(src.out_shape),
                receptive_field=src.receptive_field,
                jump=src.jump,
                inputs=self._inputs(source),
            )
        )

    def norm(self, name: str, function: str, *, source: str | None = None) -> str:
        """Normalisation over the channels: batch (scale, offset and running statistics per
        channel) or layer (scale and offset per channel); 'none' adds nothing."""
        if function == "none":
            return source or self.last
        channels = self._source(name, source, rank=None).out_shape[-1]
        return self._elementwise(
            name,
            "norm",
            source,
            function=function,
            weights=channels,
            biases=channels,
            batch_stats=2 * channels if function == "batch" else 0,
            flops_per_element=2,
        )

    def act(self, name: str, function: str, *, source: str | None = None) -> str:
        """An elementwise activation function."""
        return self._elementwise(name, "act", source, function=function, flops_per_element=1)

    def dropout(self, name: str, rate: float, *, source: str | None = None) -> str:
        """Dropout with drop probability `rate` (identity at inference); rate 0 adds nothing."""
        if rate == 0:
            return source or self.last
        return self._elementwise(name, "dropout", source, rate=rate)

    def shortcut(self, name: str, filters: int, stride: int, *, source: str) -> str:
        """He et al. 2015 option A: identity subsampled by `stride`, channels zero-padded to
        `filters` (no parameters). Same output size as a 1x1 conv with stride S."""
        src = self._source(name, source)
        h2, w2 = self._window(name, src, 1, stride, 0)
        rf, jump = receptive_field(src.receptive_field, src.jump, 1, stride)
        return self._add(
            LayerSpec(
                name,
                "shortcut",
                src.out_shape,
                (h2, w2, filters),
                kernel_size=1,
                stride=stride,
                function="A",
                receptive_field=rf,
                jump=jump,
                inputs=(source,),
            )
        )

    def add(self, name: str, first: str, second: str) -> str:
        """Elementwise sum of two layers' outputs of the same shape (a residual connection)."""
        a, b = self._by_name[first], self._by_name[second]
        if a.out_shape != b.out_shape:
            raise UserError(
                f"layer '{name}' adds '{first}' {a.out_shape} and '{second}' {b.out_shape}: "
                "the shapes must be equal"
            )
        return self._add(
            LayerSpec(
                name,
                "add",
                a.out_shape,
                a.out_shape,
                flops=_size(a.out_shape),
                receptive_field=max(a.receptive_field, b.receptive_field),
                jump=a.jump,
                inputs=(first, second),
            )
        )
