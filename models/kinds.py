"""The layer kinds: everything about one kind of layer, in one class.

A `LayerSpec` names its kind (`spec.kind`, e.g. "conv"); `KINDS[spec.kind]` is the
`LayerKind` that knows, for that kind:

- its arithmetic: `spec(name, sources, inputs, **arguments)` computes the layer's LayerSpec
  (output shape, weights, biases, FLOPs, receptive field, jump) from the specs of the layers
  it reads and the arguments a family gave `Builder.<kind>`, with the formulas of
  `models.shapes`;
- its Flax layer: `module(spec, dtype, rngs)` (None for a plain function of the input) and
  `apply(spec, layer, inputs, train=, rngs=)`, how `Network.__call__` runs it;
- its row of the summary (`models.summary`): `label(spec)`, `has_window` (F, S, P shown) and
  `note(spec)`;
- its PyTorch translation for the benchmark's reference network
  (benchmarks/torch_reference.py): `torch_module(spec)`, `torch_apply(spec, layer, inputs)`
  and `copy_to_torch(...)`, which copies our parameters into the torch module. torch is the
  optional `bench` extra: only these methods import it (and `models.torch_ops`).

Adding a layer kind: write its class here, register it in KINDS, and give `Builder` a method
that calls it (models/builder.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError
from models import layers, roi
from models.shapes import (
    LayerSpec,
    conv_output_size,
    conv_params,
    dense_params,
    local_params,
    receptive_field,
    size,
)

if TYPE_CHECKING:
    import torch

# {variable name: array} of one layer, as in `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
Variables = Mapping[str, Any]


class LayerKind:
    """One kind of layer: its arithmetic, its Flax layer, its summary row, its torch twin.

    The defaults suit a layer with a module that maps its one input to its output.
    """

    kind: ClassVar[str]  # the LayerSpec.kind it handles
    input_rank: ClassVar[int | None] = 3  # the rank its input must have (None: any)
    has_window: ClassVar[bool] = False  # F, S, P describe it (shown in the summary)

    # --- arithmetic

    def spec(
        self, name: str, sources: Sequence[LayerSpec], inputs: tuple[str, ...], **arguments: Any
    ) -> LayerSpec | None:
        """Returns the spec of layer `name` that reads the outputs of `sources` (recorded as
        `inputs`, empty for the layer listed before it), or None if the layer would do nothing
        (e.g. dropout 0) and is left out."""
        raise NotImplementedError

    # --- Flax

    def module(self, spec: LayerSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module | None:
        """Returns the module that holds the layer's parameters or state (drawn from `rngs`),
        or None when the layer is a plain function of its inputs."""
        return None

    def apply(
        self,
        spec: LayerSpec,
        layer: nnx.Module | None,
        inputs: Sequence[jax.Array],
        *,
        train: bool,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """Returns the layer's output [B, ...] for its inputs; `layer` is `module`'s."""
        return layer(inputs[0])

    def init_scores(self, layer: nnx.Module | None) -> None:
        """Called when this layer computes the class scores (the network's last layer): its
        scores start at zero if it has the parameters for that (see `Network`)."""

    # --- summary

    def label(self, spec: LayerSpec) -> str:
        """The summary's `kind` column."""
        return f"{spec.kind} {spec.function}" if spec.function else spec.kind

    def note(self, spec: LayerSpec) -> str:
        """The summary's `note` column."""
        if spec.batch_stats:
            return f"+{spec.batch_stats:,} running stats"
        if spec.inputs:
            return "from " + " + ".join(spec.inputs)
        return ""

    # --- PyTorch (benchmarks/torch_reference.py; tensors NCHW)

    def torch_module(self, spec: LayerSpec) -> torch.nn.Module | None:
        """Returns the torch module that holds the layer's parameters or state, or None."""
        return None

    def torch_apply(
        self, spec: LayerSpec, layer: torch.nn.Module | None, inputs: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Returns what `apply` computes, in torch, for NCHW inputs."""
        return layer(inputs[0])

    def copy_to_torch(
        self, spec: LayerSpec, layer: torch.nn.Module, params: Variables, batch_stats: Variables
    ) -> None:
        """Copies this layer's NNX parameters and batch statistics into `layer` (its
        `torch_module`), under `torch.no_grad()`."""


# --- helpers of the arithmetic --------------------------------------------------------------


def _window_size(
    name: str, src: LayerSpec, kernel_size: int, stride: int, padding: int
) -> tuple[int, int]:
    h, w, _ = src.out_shape
    return (
        conv_output_size(h, kernel_size, stride, padding, layer=name, axis="H"),
        conv_output_size(w, kernel_size, stride, padding, layer=name, axis="W"),
    )


def _whole_map_rf(src: LayerSpec) -> int:
    # A unit that sees the whole map sees r + (extent - 1)*j input pixels.
    if len(src.out_shape) != 3:
        return src.receptive_field
    return src.receptive_field + (max(src.out_shape[:2]) - 1) * src.jump


def _same_shape(
    name: str,
    kind: str,
    src: LayerSpec,
    inputs: tuple[str, ...],
    *,
    flops_per_element: int = 0,
    **fields: Any,
) -> LayerSpec:
    """The spec of an elementwise layer: output shape and receptive field those of `src`."""
    return LayerSpec(
        name,
        kind,
        src.out_shape,
        src.out_shape,
        flops=flops_per_element * size(src.out_shape),
        receptive_field=src.receptive_field,
        jump=src.jump,
        inputs=inputs,
        **fields,
    )


# --- the kinds --------------------------------------------------------------------------------


class Conv(LayerKind):
    """A conv layer F x F, stride S, P zeros on each side: (H, W, D1) -> (H2, W2, K)."""

    kind = "conv"
    has_window = True
    weight_sharing: ClassVar[bool] = True

    def spec(self, name, sources, inputs, *, filters, kernel_size, stride, padding, use_bias):
        (src,) = sources
        h2, w2 = _window_size(name, src, kernel_size, stride, padding)
        d1 = src.out_shape[2]
        shared = conv_params(kernel_size, d1, filters, use_bias)
        if self.weight_sharing:
            weights, biases = shared
        else:
            weights, biases = local_params(h2, w2, kernel_size, d1, filters, use_bias)
        out_shape = (h2, w2, filters)
        rf, jump = receptive_field(src.receptive_field, src.jump, kernel_size, stride)
        return LayerSpec(
            name,
            self.kind,
            src.out_shape,
            out_shape,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            use_bias=use_bias,
            weights=weights,
            biases=biases,
            flops=2 * kernel_size * kernel_size * d1 * size(out_shape),
            receptive_field=rf,
            jump=jump,
            inputs=inputs,
            shared_params=0 if self.weight_sharing else sum(shared),
        )

    def module(self, spec, dtype, rngs):
        return layers.conv(
            spec.in_shape[-1],
            spec.out_shape[-1],
            spec.kernel_size,
            spec.stride,
            spec.padding,
            use_bias=spec.use_bias,
            dtype=dtype,
            rngs=rngs,
        )

    def torch_module(self, spec):
        from torch import nn

        d1, k = spec.in_shape[2], spec.out_shape[2]
        f, s, p = spec.kernel_size, spec.stride, spec.padding
        return nn.Conv2d(d1, k, f, s, p, bias=spec.use_bias)

    def copy_to_torch(self, spec, layer, params, batch_stats):
        from models import torch_ops

        torch_ops.copy_(layer.weight, params["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
        if spec.use_bias:
            torch_ops.copy_(layer.bias, params["bias"])


class Local(Conv):
    """A locally connected layer: a conv without weight sharing (one filter bank per output
    position), same arguments and output shape."""

    kind = "local"
    weight_sharing = False

    def module(self, spec, dtype, rngs):
        return layers.LocallyConnected(
            spec.in_shape,
            spec.out_shape,
            spec.kernel_size,
            spec.stride,
            spec.padding,
            use_bias=spec.use_bias,
            dtype=dtype,
            rngs=rngs,
        )

    def note(self, spec):
        saving = f"{spec.params - spec.shared_params:,}, {spec.params / spec.shared_params:,.0f}x"
        return f"shared conv: {spec.shared_params:,} params (sharing saves {saving})"

    def torch_module(self, spec):
        from models import torch_ops

        return torch_ops.LocallyConnected(spec)

    def copy_to_torch(self, spec, layer, params, batch_stats):
        from models import torch_ops

        kernel = params["kernel"]
        h2, w2, fan_in, k = kernel.shape
        f, d1 = spec.kernel_size, spec.in_shape[2]
        # ours unfolds (row, column, channel), torch (channel, row, column)
        kernel = kernel.reshape(h2 * w2, f, f, d1, k).transpose(0, 3, 1, 2, 4)
        torch_ops.copy_(layer.weight, kernel.reshape(h2 * w2, fan_in, k))
        if spec.use_bias:
            torch_ops.copy_(layer.bias, params["bias"].reshape(h2 * w2, k))


class Dense(LayerKind):
    """A fully connected layer on a flat input: (D1,) -> (K,)."""

    kind = "dense"
    input_rank = 1

    def spec(self, name, sources, inputs, *, features, use_bias):
        (src,) = sources
        weights, biases = dense_params(src.out_shape[0], features, use_bias)
        return LayerSpec(
            name,
            self.kind,
            src.out_shape,
            (features,),
            use_bias=use_bias,
            weights=weights,
            biases=biases,
            flops=2 * weights,
            receptive_field=src.receptive_field,
            jump=src.jump,
            inputs=inputs,
        )

    def module(self, spec, dtype, rngs):
        return layers.dense(
            spec.in_shape[0], spec.out_shape[0], use_bias=spec.use_bias, dtype=dtype, rngs=rngs
        )

    def init_scores(self, layer):
        # big_vision's head_zeroinit: the first loss is exactly ln(num_classes).
        layer.kernel[...] = jnp.zeros_like(layer.kernel[...])

    def torch_module(self, spec):
        from torch import nn

        return nn.Linear(spec.in_shape[0], spec.out_shape[0], bias=spec.use_bias)

    def copy_to_torch(self, spec, layer, params, batch_stats):
        from models import torch_ops

        torch_ops.copy_(layer.weight, params["kernel"].T)
        if spec.use_bias:
            torch_ops.copy_(layer.bias, params["bias"])


class Pool(LayerKind):
    """Pooling: `function` max|avg|l2 over F x F windows of H and W, depth over windows of F
    channels (H and W untouched)."""

    kind = "pool"
    has_window = True

    def spec(self, name, sources, inputs, *, function, window, stride, padding):
        (src,) = sources
        h, w, c = src.out_shape
        if function == "depth":
            out_shape = (h, w, conv_output_size(c, window, stride, padding, layer=name, axis="D"))
            rf, jump = src.receptive_field, src.jump  # H and W untouched
            flops = window * size(out_shape)
        else:
            out_shape = (*_window_size(name, src, window, stride, padding), c)
            rf, jump = receptive_field(src.receptive_field, src.jump, window, stride)
            flops = window * window * size(out_shape)
        return LayerSpec(
            name,
            self.kind,
            src.out_shape,
            out_shape,
            kernel_size=window,
            stride=stride,
            padding=padding,
            function=function,
            flops=flops,
            receptive_field=rf,
            jump=jump,
            inputs=inputs,
        )

    def apply(self, spec, layer, inputs, *, train, rngs):
        return layers.pool(inputs[0], spec.function, spec.kernel_size, spec.stride, spec.padding)

    def torch_apply(self, spec, layer, inputs):
        from models import torch_ops

        f, s, p = spec.kernel_size, spec.stride, spec.padding
        return torch_ops.pool(inputs[0], spec.function, f, s, p)


class GlobalPool(LayerKind):
    """Averages each channel over H and W: (H, W, C) -> (C,)."""

    kind = "global_pool"

    def spec(self, name, sources, inputs):
        (src,) = sources
        return LayerSpec(
            name,
            self.kind,
            src.out_shape,
            (src.out_shape[2],),
            function="avg",
            flops=size(src.out_shape),
            receptive_field=_whole_map_rf(src),
            jump=src.jump,
            inputs=inputs,
        )

    def apply(self, spec, layer, inputs, *, train, rngs):
        return layers.global_avg_pool(inputs[0])

    def torch_apply(self, spec, layer, inputs):
        return inputs[0].mean((2, 3))


class Flatten(LayerKind):
    """(H, W, C) -> (H*W*C,) in (row, column, channel) order; its receptive field is the
    region the vector sees."""

    kind = "flatten"

    def spec(self, name, sources, inputs):
        (src,) = sources
        return LayerSpec(
            name,
            self.kind,
            src.out_shape,
            (size(src.out_shape),),
            receptive_field=_whole_map_rf(src),
            jump=src.jump,
            inputs=inputs,
        )

    def apply(self, spec, layer, inputs, *, train, rngs):
        x = inputs[0]
        return x.reshape(x.shape[0], -1)

    def torch_apply(self, spec, layer, inputs):
        # Ours flattens NHWC (row, column, channel): the same order here keeps the dense
        # weights interchangeable.
        x = inputs[0]
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class Norm(LayerKind):
    """Normalisation over the channels: batch (scale, offset and running statistics per
    channel) or layer (scale and offset per channel); 'none' adds no layer."""

    kind = "norm"
    input_rank = None

    def spec(self, name, sources, inputs, *, function):
        if function == "none":
            return None
        (src,) = sources
        channels = src.out_shape[-1]
        return _same_shape(
            name,
            self.kind,
            src,
            inputs,
            function=function,
            weights=channels,
            biases=channels,
            batch_stats=2 * channels if function == "batch" else 0,
            flops_per_element=2,
        )

    def module(self, spec, dtype, rngs):
        return layers.norm(spec.function, spec.out_shape[-1], dtype=dtype, rngs=rngs)

    def apply(self, spec, layer, inputs, *, train, rngs):
        if spec.function == "batch":
            return layer(inputs[0], use_running_average=not train)
        return layer(inputs[0])

    def torch_module(self, spec):
        from models import torch_ops

        if spec.function == "batch":
            return torch_ops.batch_norm(spec.out_shape[-1], len(spec.out_shape))
        return torch_ops.ChannelLayerNorm(spec.out_shape[-1])

    def copy_to_torch(self, spec, layer, params, batch_stats):
        from models import torch_ops

        target = layer.norm if spec.function == "layer" else layer
        torch_ops.copy_(target.weight, params["scale"])
        torch_ops.copy_(target.bias, params["bias"])
        if spec.function == "batch":
            torch_ops.copy_(layer.running_mean, batch_stats["mean"])
            torch_ops.copy_(layer.running_var, batch_stats["var"])


class Act(LayerKind):
    """An elementwise activation function (`layers.ACTIVATIONS`)."""

    kind = "act"
    input_rank = None

    def spec(self, name, sources, inputs, *, function):
        (src,) = sources
        return _same_shape(name, self.kind, src, inputs, function=function, flops_per_element=1)

    def apply(self, spec, layer, inputs, *, train, rngs):
        return layers.ACTIVATIONS[spec.function](inputs[0])

    def torch_apply(self, spec, layer, inputs):
        from models import torch_ops

        return torch_ops.ACTIVATIONS[spec.function](inputs[0])


class Dropout(LayerKind):
    """Dropout with drop probability `rate` in training, the identity at inference; rate 0
    adds no layer."""

    kind = "dropout"
    input_rank = None

    def spec(self, name, sources, inputs, *, rate):
        if rate == 0:
            return None
        (src,) = sources
        return _same_shape(name, self.kind, src, inputs, rate=rate)

    def module(self, spec, dtype, rngs):
        return nnx.Dropout(spec.rate)

    def apply(self, spec, layer, inputs, *, train, rngs):
        if train and rngs is None:
            raise ValueError(
                f"layer '{spec.name}' drops out in training: pass rngs=nnx.Rngs(dropout=key)"
            )
        return layer(inputs[0], deterministic=not train, rngs=rngs)

    def label(self, spec):
        return f"dropout {spec.rate:g}"

    def torch_module(self, spec):
        from torch import nn

        return nn.Dropout(spec.rate)


class Shortcut(LayerKind):
    """He et al. 2015 (arXiv 1512.03385) option A: the identity subsampled by `stride`, with
    zero channels appended up to `filters` (no parameters); the output size of a 1x1 conv with
    stride S."""

    kind = "shortcut"
    has_window = True

    def spec(self, name, sources, inputs, *, filters, stride):
        (src,) = sources
        h2, w2 = _window_size(name, src, 1, stride, 0)
        rf, jump = receptive_field(src.receptive_field, src.jump, 1, stride)
        return LayerSpec(
            name,
            self.kind,
            src.out_shape,
            (h2, w2, filters),
            kernel_size=1,
            stride=stride,
            function="A",
            receptive_field=rf,
            jump=jump,
            inputs=inputs,
        )

    def apply(self, spec, layer, inputs, *, train, rngs):
        return layers.zero_pad_shortcut(inputs[0], spec.out_shape[-1], spec.stride)

    def torch_apply(self, spec, layer, inputs):
        import torch.nn.functional as F

        x = inputs[0][:, :, :: spec.stride, :: spec.stride]
        return F.pad(x, (0, 0, 0, 0, 0, spec.out_shape[2] - x.shape[1]))


class Add(LayerKind):
    """The elementwise sum of two layers' outputs of the same shape (a residual connection)."""

    kind = "add"
    input_rank = None

    def spec(self, name, sources, inputs):
        a, b = sources
        if a.out_shape != b.out_shape:
            raise UserError(
                f"layer '{name}' adds '{inputs[0]}' {a.out_shape} and '{inputs[1]}' "
                f"{b.out_shape}: the shapes must be equal"
            )
        return LayerSpec(
            name,
            self.kind,
            a.out_shape,
            a.out_shape,
            flops=size(a.out_shape),
            receptive_field=max(a.receptive_field, b.receptive_field),
            jump=a.jump,
            inputs=inputs,
        )

    def apply(self, spec, layer, inputs, *, train, rngs):
        return inputs[0] + inputs[1]

    def torch_apply(self, spec, layer, inputs):
        return inputs[0] + inputs[1]


class RoiPool(LayerKind):
    """RoI pooling (Fast R-CNN): each region of the feature map pooled to a fixed H_out x
    W_out grid of bins, (H, W, C) -> (H_out, W_out, C) per region. `function` 'max': RoI max
    pooling (Girshick 2015: the region's edges rounded to cells, each bin the max of its
    cells, `models.roi.roi_max_pool`); 'align': RoIAlign (He et al. 2017: no rounding, each
    bin the max of bilinear samples, `models.roi.roi_align`).

    Inside a `Network` the one region is the whole map (for 'max', adaptive max pooling, one
    output per image); a detector calls `models.roi.ROI_FUNCTIONS[function]` on the same
    feature map with its proposals (boxes in image pixels, `spatial_scale` = 1 / the layer's
    input jump). The numbers here are per region."""

    kind = "roi_pool"

    def spec(self, name, sources, inputs, *, output_size, function="max"):
        (src,) = sources
        out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
        if out_h < 1 or out_w < 1:
            raise UserError(f"layer '{name}': RoI pooling grid {output_size} must be >= 1x1")
        if function not in roi.ROI_FUNCTIONS:
            raise UserError(
                f"layer '{name}': RoI pooling {function!r}: choose {' or '.join(roi.ROI_FUNCTIONS)}"
            )
        out_shape = (out_h, out_w, src.out_shape[2])
        # max: about one comparison per cell of the region (the whole map here); align: per
        # sample point, four products and three sums for its interpolation and one comparison
        flops = max(size(src.out_shape), size(out_shape))
        if function == "align":
            flops = 8 * roi.ALIGN_SAMPLES**2 * size(out_shape)
        return LayerSpec(
            name,
            self.kind,
            src.out_shape,
            out_shape,
            function=function,
            flops=flops,
            receptive_field=_whole_map_rf(src),
            jump=src.jump,
            inputs=inputs,
        )

    def apply(self, spec, layer, inputs, *, train, rngs):
        return roi.whole_map_pool(inputs[0], spec.out_shape[:2], spec.function)

    def label(self, spec):
        word = "roi_align" if spec.function == "align" else "roi_pool"
        return f"{word} {spec.out_shape[0]}x{spec.out_shape[1]}"

    def note(self, spec):
        scale = f"spatial scale 1/{spec.jump}"
        if spec.function == "align":
            scale += f", {roi.ALIGN_SAMPLES}x{roi.ALIGN_SAMPLES} bilinear samples a bin"
        return f"per region, {scale}" + (f", from {' + '.join(spec.inputs)}" if spec.inputs else "")

    def torch_apply(self, spec, layer, inputs):
        # The whole-map region of RoI max pooling is torch's adaptive max pooling (same bins).
        # RoI pooling over proposals, and RoIAlign, need torchvision.ops, which the bench
        # extra does not install.
        if spec.function == "align":
            raise NotImplementedError("RoIAlign has no reference in torch without torchvision")
        import torch.nn.functional as F

        return F.adaptive_max_pool2d(inputs[0], spec.out_shape[:2])


KINDS: dict[str, LayerKind] = {
    kind.kind: kind()
    for kind in (
        Conv,
        Local,
        Dense,
        Pool,
        GlobalPool,
        Flatten,
        Norm,
        Act,
        Dropout,
        Shortcut,
        Add,
        RoiPool,
    )
}
