"""The Flax module of every family: a network built from its list of LayerSpecs.

A family (convnet.py, allconv.py, resnet.py) only writes down its layers as specs; this
module turns each spec into one layer and runs them in order, so the parameters, shapes and
summary of a model are those of its specs by construction. What a spec's layer is and how it
runs is its kind's (`models.kinds.KINDS[spec.kind]`: `module` and `apply`). Residual
connections are specs that read earlier layers by name (`LayerSpec.inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.kinds import KINDS
from models.shapes import INPUT, LayerSpec


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
                spec.name: module
                for spec in self.specs
                if (module := KINDS[spec.kind].module(spec, self.dtype, rngs)) is not None
            }
        )
        # The layer that computes the class scores starts at zero (big_vision's
        # head_zeroinit), so the first loss is exactly ln(num_classes). With a He-initialised
        # head, ReLU + max-pooling stacks without BatchNorm start at 2-3x that loss and plain
        # SGD stalls on them (measured: pooled_max on the built-in data stuck at chance).
        last = self.specs[-1]
        KINDS[last.kind].init_scores(self.layers.get(last.name))

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
            layer = self.layers.get(spec.name)
            y = KINDS[spec.kind].apply(spec, layer, inputs, train=train, rngs=rngs)
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
