"""`Builder`: how a family writes down its layers.

    b = Builder((32, 32, 3))
    b.conv("conv1", 16, 3, 1, 1)
    b.act("relu1", "relu")
    b.pool("pool1", "max", 2, 2, 0)
    specs = b.specs  # LayerSpecs with every shape, parameter count, FLOP count, receptive field

Each method is one layer kind (`models.kinds`), which computes the layer's numbers from the
spec of its input.
"""

from __future__ import annotations

from typing import Any

from errors import UserError
from models.kinds import KINDS
from models.shapes import INPUT, LayerSpec, Shape


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

    def layer(
        self,
        kind: str,
        name: str,
        *,
        source: str | None = None,
        inputs: tuple[str, ...] | None = None,
        **arguments: Any,
    ) -> str:
        """Appends layer `name` of `kind` (a key of KINDS) reading `source`, with the kind's
        `arguments`; `inputs` overrides the names recorded (default: `source` unless it is the
        last layer). Returns its name, or `source` if the kind adds nothing."""
        layer_kind = KINDS[kind]
        src = self._source(name, source, layer_kind.input_rank)
        recorded = self._inputs(source) if inputs is None else inputs
        spec = layer_kind.spec(name, (src,), recorded, **arguments)
        return (source or self.last) if spec is None else self._add(spec)

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
        return self.layer(
            "conv" if weight_sharing else "local",
            name,
            source=source,
            filters=filters,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            use_bias=use_bias,
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
        return self.layer(
            "pool",
            name,
            source=source,
            function=function,
            window=window,
            stride=stride,
            padding=padding,
        )

    def global_avg_pool(self, name: str, *, source: str | None = None) -> str:
        """Averages each channel over H and W: (H, W, C) -> (C,)."""
        return self.layer("global_pool", name, source=source)

    def roi_pool(
        self,
        name: str,
        output_size: int | tuple[int, int],
        *,
        function: str = "max",
        source: str | None = None,
    ) -> str:
        """RoI pooling to an `output_size` grid (Fast R-CNN's max pooling, or 'align':
        RoIAlign): (H, W, C) -> (h, w, C) per region; in a Network the region is the whole
        map (see models.roi)."""
        return self.layer(
            "roi_pool", name, source=source, output_size=output_size, function=function
        )

    def flatten(self, name: str, *, source: str | None = None) -> str:
        """Flattens (H, W, C) to (H*W*C,); its receptive field is the region the vector sees."""
        return self.layer("flatten", name, source=source)

    def dense(
        self, name: str, features: int, *, use_bias: bool = True, source: str | None = None
    ) -> str:
        """A fully connected layer on a flat input (D1,) -> (K,)."""
        return self.layer("dense", name, source=source, features=features, use_bias=use_bias)

    def norm(self, name: str, function: str, *, source: str | None = None) -> str:
        """Normalisation over the channels: batch (scale, offset and running statistics per
        channel) or layer (scale and offset per channel); 'none' adds nothing."""
        return self.layer("norm", name, source=source, function=function)

    def act(self, name: str, function: str, *, source: str | None = None) -> str:
        """An elementwise activation function."""
        return self.layer("act", name, source=source, function=function)

    def dropout(self, name: str, rate: float, *, source: str | None = None) -> str:
        """Dropout with drop probability `rate` (identity at inference); rate 0 adds nothing."""
        return self.layer("dropout", name, source=source, rate=rate)

    def shortcut(self, name: str, filters: int, stride: int, *, source: str) -> str:
        """He et al. 2015 option A: identity subsampled by `stride`, channels zero-padded to
        `filters` (no parameters). Same output size as a 1x1 conv with stride S."""
        return self.layer(
            "shortcut", name, source=source, inputs=(source,), filters=filters, stride=stride
        )

    def add(self, name: str, first: str, second: str) -> str:
        """Elementwise sum of two layers' outputs of the same shape (a residual connection)."""
        sources = (self._by_name[first], self._by_name[second])
        return self._add(KINDS["add"].spec(name, sources, (first, second)))
