"""Model families, chosen by name from the config, each shaped by its config fields.

    cfg = models.preset("resnet20")                     # the config's model section
    specs = models.architecture(cfg, (32, 32, 3), 10)   # layers, shapes, params (no JAX)
    model = models.create_model(cfg, (32, 32, 3), 10, rngs=nnx.Rngs(0))
    logits = model(images, train=True, rngs=nnx.Rngs(dropout=key))

Families: convnet (plain and pooled, convnet.py), mlp (convnet.py), allconv (Springenberg et
al. 2014, allconv.py), resnet (He et al. 2015 and wide, resnet.py). Every model section has
`name` (the family) and `dtype` (computation dtype: float32 | bfloat16; parameters stay
float32), plus its family's fields (each family's DEFAULTS documents them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from flax import nnx

from errors import UserError
from models import allconv, convnet, layers, resnet
from models.checks import require_choice
from models.network import Network, capture_activations
from models.shapes import LayerSpec, ShapeError

__all__ = [
    "FAMILIES",
    "PRESETS",
    "LayerSpec",
    "Network",
    "ShapeError",
    "architecture",
    "capture_activations",
    "create_model",
    "preset",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its fields with default values, its layer list, its named presets."""

    defaults: Mapping[str, Any]
    architecture: Callable[[ml_collections.ConfigDict, Sequence[int], int], list[LayerSpec]]
    presets: Mapping[str, Mapping[str, Any]]


FAMILIES: Mapping[str, Family] = {
    "convnet": Family(convnet.DEFAULTS, convnet.architecture, convnet.PRESETS),
    "mlp": Family(convnet.MLP_DEFAULTS, convnet.mlp_architecture, convnet.MLP_PRESETS),
    "allconv": Family(allconv.DEFAULTS, allconv.architecture, allconv.PRESETS),
    "resnet": Family(resnet.DEFAULTS, resnet.architecture, resnet.PRESETS),
}
_COMMON_FIELDS = {"name": "", "dtype": "float32"}

PRESETS: tuple[str, ...] = tuple(name for f in FAMILIES.values() for name in f.presets)


def preset(name: str) -> ml_collections.ConfigDict:
    """Returns the model section of a config for the preset `name` (one of PRESETS)."""
    for family_name, family in FAMILIES.items():
        if name in family.presets:
            return ml_collections.ConfigDict(
                {
                    **_COMMON_FIELDS,
                    "name": family_name,
                    **family.defaults,
                    **family.presets[name],
                }
            )
    raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")


def _family(model_cfg: ml_collections.ConfigDict) -> Family:
    """Returns the family named by `model_cfg`; UserError for unknown names or fields."""
    name = model_cfg.get("name")
    if name not in FAMILIES:
        raise UserError(
            f"model.name = {name!r}: unknown model; valid names: {', '.join(FAMILIES)} "
            f"(or start from a preset: {', '.join(PRESETS)})"
        )
    family = FAMILIES[name]
    fields = {*_COMMON_FIELDS, *family.defaults}
    unknown = sorted(set(model_cfg.keys()) - fields)
    if unknown:
        raise UserError(
            f"model.{unknown[0]}: not a field of the '{name}' model; its fields are "
            f"{', '.join(sorted(fields))}"
        )
    missing = sorted(fields - set(model_cfg.keys()))
    if missing:
        raise UserError(f"model.{missing[0]} is missing: start from models.preset(...)")
    return family


def architecture(
    model_cfg: ml_collections.ConfigDict, input_shape: Sequence[int], num_classes: int
) -> list[LayerSpec]:
    """Returns the layers of the model that `model_cfg` describes, for images of
    `input_shape` (H, W, C) and `num_classes` classes, with every shape, parameter count,
    FLOP count and receptive field. Pure Python: this is the model section's validation
    (UserError naming the field, ShapeError naming the layer when a map would be empty)."""
    family = _family(model_cfg)
    require_choice(model_cfg, "dtype", layers.DTYPES)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise UserError(f"input shape {shape}: must be (height, width, channels), all >= 1")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes = {num_classes!r}: must be an integer >= 1")
    return family.architecture(model_cfg, shape, num_classes)


def create_model(
    model_cfg: ml_collections.ConfigDict,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    rngs: nnx.Rngs,
) -> Network:
    """Returns the Flax module of `model_cfg` with parameters drawn from `rngs` ('params').

    The module maps images [B, H, W, C] (normalised floats) to float32 logits
    [B, num_classes]; see `Network` for `train` and `rngs` at call time.
    """
    specs = architecture(model_cfg, input_shape, num_classes)
    return Network(specs, dtype=model_cfg.dtype, rngs=rngs)
