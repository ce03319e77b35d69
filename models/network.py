"""The Flax module of every family: a network built from its list of LayerSpecs.

A family (convnet.py, allconv.py, resnet.py) only writes down its layers as specs; this
module turns each spec into one layer and runs them in order, so the parameters, shapes and
summary of a model are those of its specs by construction. Residual connections are specs
that read earlier layers by name (`LayerSpec.inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from models.shapes import INPUT, LayerSpec

# Kinds whose layer holds parameters or state; the others are plain functions of the input.
_MODULE_KINDS = ("conv", "local", "dense", "norm", "dropout")


def _build(spec: LayerSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
    """Returns the module that computes `spec` (a kind listed in _MODULE_KINDS)."""
    if spec.kind == "conv":
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
    if spec.kind == "local":
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
    if spec.kind == "dense":
        return layers.dense(
            spec.in_shape[0], spec.out_shape[0], use_bias=spec.use_bias, dtype=dtype, rngs=rngs
        )
    if spec.kind == "norm":
        return layers.norm(spec.function, spec.out_shape[-1], dtype=dtype, rngs=rngs)
    if spec.kind == "dropout":
        return nnx.Dropout(spec.rate)
    raise ValueError(f"layer {spec.name!r}: kind {spec.kind!r} has no module")


class Network(nnx.Module):
    """A network whose layers are `specs`, in order.

    `__call__(x, *, train=False, rngs=None)` maps float images [B, H, W, C] (normalised) to
    float32 logits [B, num_classes], computing in `dtype` with float32 parameters. With
    `train=True`, dropout draws from `rngs` ('dropout' stream) and BatchNorm normalises with
    the batch's statistics and updates its running averages. Inside `nnx.capture(...,
    nnx.Intermediate)` every layer sows its output under its spec name (see
    `capture_activations`).
    """

    def __init__(self, specs: Sequence[LayerSpec], *, dtype: str = "float32", rngs: nnx.Rngs):
        self.specs = tuple(specs)
        self.dtype = jnp.dtype(dtype)
        self.layers = nnx.Dict(
            {
                spec.name: _build(spec, self.dtype, rngs)
                for spec in self.specs
                if spec.kind in _MODULE_KINDS
            }
        )
        # The layer that computes the class scores starts at zero (big_vision's
        # head_zeroinit), so the first loss is exactly ln(num_classes). With a He-initialised
        # head, ReLU + max-pooling stacks without BatchNorm start at 2-3x that loss and plain
        # SGD stalls on them (measured: pooled_max on the built-in data stuck at chance).
        last = self.specs[-1]
        if last.kind == "dense":
            kernel = self.layers[last.name].kernel
            kernel[...] = jnp.zeros_like(kernel[...])

    def _apply(
        self, spec: LayerSpec, inputs: list[jax.Array], train: bool, rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = inputs[0]
        match spec.kind:
            case "conv" | "local" | "dense":
                return self.layers[spec.name](x)
            case "norm" if spec.function == "batch":
                return self.layers[spec.name](x, use_running_average=not train)
            case "norm":
                return self.layers[spec.name](x)
            case "dropout":
                if train and rngs is None:
                    raise ValueError(
                        f"layer '{spec.name}' drops out in training: pass "
                        "rngs=nnx.Rngs(dropout=key)"
                    )
                return self.layers[spec.name](x, deterministic=not train, rngs=rngs)
            case "act":
                return layers.ACTIVATIONS[spec.function](x)
            case "pool":
                return layers.pool(x, spec.function, spec.kernel_size, spec.stride, spec.padding)
            case "global_pool":
                return layers.global_avg_pool(x)
            case "flatten":
                return x.reshape(x.shape[0], -1)
            case "shortcut":
                return layers.zero_pad_shortcut(x, spec.out_shape[-1], spec.stride)
            case "add":
                return inputs[0] + inputs[1]
        raise ValueError(f"layer {spec.name!r}: unknown kind {spec.kind!r}")

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        outputs = {INPUT: x.astype(self.dtype)}
        y = outputs[INPUT]
        # sow() outside nnx.capture would store every activation on the module (and warns):
        # record them only when someone is capturing.
        capturing = hasattr(self, "__captures__")
        for spec in self.specs:
            inputs = [outputs[name] for name in spec.inputs] if spec.inputs else [y]
            y = self._apply(spec, inputs, train, rngs)
            if capturing:
                self.sow(nnx.Intermediate, spec.name, y)
            outputs[spec.name] = y
        return y.astype(jnp.float32)


def capture_activations(
    model: Network, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs `model` on images [B, H, W, C] and returns (float32 logits [B, classes],
    {layer name: that layer's output [B, ...]}) for every layer in `model.specs`."""
    logits, sown = nnx.capture(model, nnx.Intermediate)(x, train=train, rngs=rngs)
    # sow() collects a tuple of values per name; each layer runs once per call.
    return logits, {spec.name: sown[spec.name].get_value()[0] for spec in model.specs}
