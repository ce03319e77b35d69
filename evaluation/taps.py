"""Reading a model's layers: which layer outputs the per-layer measures read (the probe
points), where in the input image each output unit looks (its receptive-field window), and the
layer outputs pooled into feature vectors, batched and jit-compiled.

A `Tap` is what the layer measures (`evaluation.probes`) see of a model: its probe points and
a `capture(variables, uint8 images) -> (logits, {point name: output [B, ...]})`. For a trained
run it captures the outputs with the library's own mechanism (`models.capture_activations`:
every layer `sow`s an `nnx.Intermediate` under its spec name); for a hand-built module (the
tests') it is any function with that signature.

Probe points (`probe_points`), from the spec list: the input (depth 0), every activation that
closes a conv, locally connected or dense layer (after its norm, if any) or a residual block
(the activation after the `add`), every pooling layer (max, avg, L2, depth), the global
pooling, and the class scores (the last layer). Pre-activation outputs, norms, dropout,
shortcuts and flatten (a copy of the map before it) are left out: they repeat a point's
information.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import data
import models
from models.shapes import INPUT, LayerSpec

# What an activation closes, by the kind of the layer it reads (through norms and dropout).
CLOSES = {"conv": "conv", "local": "conv", "dense": "dense", "add": "block"}
PASS_THROUGH = ("norm", "dropout")
# Kinds that move the sampling grid: F x F windows, stride S, P zeros on each side.
WINDOW_KINDS = ("conv", "local", "shortcut", "pool")
# Kinds whose one output unit sees the whole map they read.
WHOLE_MAP_KINDS = ("global_pool", "flatten", "dense")

Capture = Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Point:
    """One layer output the per-layer measures read.

    kind: input | conv | dense | block | pool | global_pool | output (what the layer closes);
    depth: its index among the points (input 0); weight_layers: conv, locally connected and
    dense layers listed up to it; receptive_field and jump: the spec's (input pixels one unit
    sees, input pixels between neighbouring units); shape: its output per example.
    """

    name: str
    kind: str
    depth: int
    weight_layers: int
    receptive_field: int
    jump: int
    shape: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        """The point's fields for eval.json, named as there."""
        return {
            "layer": self.name,
            "kind": self.kind,
            "depth": self.depth,
            "weight_layers": self.weight_layers,
            "receptive_field": self.receptive_field,
            "jump": self.jump,
            "shape": list(self.shape),
        }


def source_of(spec: LayerSpec, specs: Sequence[LayerSpec]) -> str:
    """Returns the name of the (first) layer `spec` reads (INPUT for the first layer)."""
    if spec.inputs:
        return spec.inputs[0]
    index = list(specs).index(spec)
    return specs[index - 1].name if index else INPUT


def _closes(spec: LayerSpec, specs: Sequence[LayerSpec]) -> str | None:
    """What the output of `spec` closes (a Point kind), or None when it is no probe point."""
    if spec.kind in ("pool", "global_pool"):
        return spec.kind
    if spec.kind != "act":
        return None
    by_name = {s.name: s for s in specs}
    source = by_name.get(source_of(spec, specs))
    while source is not None and source.kind in PASS_THROUGH:
        source = by_name.get(source_of(source, specs))
    return CLOSES.get(source.kind, "act") if source is not None else None


def probe_points(specs: Sequence[LayerSpec]) -> tuple[Point, ...]:
    """Returns the probe points of a model's `specs`, in order (see the module docstring)."""
    points = [Point(INPUT, "input", 0, 0, 1, 1, tuple(specs[0].in_shape))]
    weight_layers = 0
    for spec in specs:
        weight_layers += spec.kind in ("conv", "local", "dense")
        kind = "output" if spec is specs[-1] else _closes(spec, specs)
        if kind is not None:
            points.append(
                Point(
                    spec.name,
                    kind,
                    len(points),
                    weight_layers,
                    spec.receptive_field,
                    spec.jump,
                    tuple(spec.out_shape),
                )
            )
    return tuple(points)


def thin(points: Sequence[Point], limit: int) -> list[Point]:
    """At most `limit` of `points`, evenly spaced, the first and the last always among them
    (all of them when there are no more)."""
    if len(points) <= limit:
        return list(points)
    index = np.unique(np.round(np.linspace(0, len(points) - 1, limit)).astype(int))
    return [points[i] for i in index]


# --- receptive-field windows -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the units of one layer look, along one image axis (rows and columns alike: the
    windows are square and the padding symmetric): output index i sees input pixels
    i * jump - offset ... i * jump - offset + size - 1 (before clipping to the image)."""

    offset: int
    jump: int
    size: int


def geometries(specs: Sequence[LayerSpec]) -> dict[str, Geometry]:
    """Returns {layer name: Geometry} for INPUT and every layer of `specs`.

    A window layer (F, S, P) reading a layer of geometry (o, j, r) has (o + P*j, j*S,
    r + (F-1)*j): the notes' receptive-field recursion plus the offset the paddings add. A
    layer that reads two (a residual `add`) sees the union of their windows; depth pooling
    and elementwise layers keep their input's; a unit of a global pool, flatten or dense layer
    sees its whole input map.
    """
    geometry = {INPUT: Geometry(0, 1, 1)}
    for spec in specs:
        sources = [geometry[n] for n in (spec.inputs or (source_of(spec, specs),))]
        first = sources[0]
        if spec.kind in WINDOW_KINDS and spec.function != "depth":
            f, s, p, j = spec.kernel_size, spec.stride, spec.padding, first.jump
            g = Geometry(first.offset + p * j, j * s, first.size + (f - 1) * j)
        elif spec.kind in WHOLE_MAP_KINDS and len(spec.in_shape) == 3:
            extent = max(spec.in_shape[:2])
            g = Geometry(first.offset, first.jump, first.size + (extent - 1) * first.jump)
        elif len(sources) > 1:
            offset = max(s.offset for s in sources)
            end = max(s.size - s.offset for s in sources)
            g = Geometry(offset, first.jump, end + offset)
        else:
            g = first
        geometry[spec.name] = g
    return geometry


def input_window(
    geometry: Geometry, position: Sequence[int], image_shape: Sequence[int]
) -> tuple[int, int, int, int]:
    """Returns (top, left, bottom, right), half-open, of the input pixels that output unit
    `position` (row, col) of a layer with `geometry` sees, clipped to the image (H, W, ...)."""
    row, col = position
    height, width = image_shape[:2]
    top, left = row * geometry.jump - geometry.offset, col * geometry.jump - geometry.offset
    return (
        max(top, 0),
        max(left, 0),
        min(top + geometry.size, height),
        min(left + geometry.size, width),
    )


# --- pooled features ---------------------------------------------------------------------------


def _cells(extent: int, grid: int) -> list[tuple[int, int]]:
    """The `grid` cells [start, end) of an axis of `extent` (adaptive average pooling's:
    floor(i * n / g) to ceil((i + 1) * n / g), so a 1-pixel axis gives every cell that pixel)."""
    return [(i * extent // grid, -(-(i + 1) * extent // grid)) for i in range(grid)]


def pooled(x: jax.Array, grid: int = 1) -> jax.Array:
    """Returns float32 features [B, D] of a layer output x: a map [B, H, W, C] averaged over a
    `grid` x `grid` of cells (grid 1: global average pooling, D = C; grid 2: D = 4C, cell
    by cell); a vector [B, D] as it is."""
    x = x.astype(jnp.float32)
    if x.ndim == 2:
        return x
    if grid == 1:
        return jnp.mean(x, axis=(1, 2))
    _, height, width, _ = x.shape
    return jnp.concatenate(
        [
            jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2))
            for r0, r1 in _cells(height, grid)
            for c0, c1 in _cells(width, grid)
        ],
        axis=-1,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Tap:
    """A model's probe points and the function that reads them (see the module docstring).

    `capture(variables, uint8 images [B, H, W, C]) -> (float32 logits [B, classes], {name:
    output [B, ...]})` for at least every point's name; `specs`: the model's spec list (for
    the receptive-field windows; empty for a hand-built module).
    """

    points: tuple[Point, ...]
    capture: Capture
    specs: tuple[LayerSpec, ...] = ()

    @classmethod
    def of_run(cls, run) -> Tap:
        """The tap of a restored run (`evaluation.run.Run`): its model's own intermediates."""
        from training import state as state_lib

        norm = run.normalization()
        dtype = jnp.dtype(run.config.model.dtype)

        def capture(state, images):
            x = data.normalize(images, norm["mean"], norm["std"], dtype)
            model = state_lib.merge_model(run.graphdef, state)
            logits, outputs = models.capture_activations(model, x)
            return logits, {INPUT: x, **outputs}

        return cls(probe_points(run.specs), capture, tuple(run.specs))

    @classmethod
    def of_module(cls, graphdef, points: Sequence[Point], normalize: Callable) -> Tap:
        """The tap of a hand-built NNX module (split into `graphdef` and variables) that
        `sow`s an `nnx.Intermediate` under each point's name; `normalize(uint8 images)` gives
        its input, which is the INPUT point."""

        def capture(variables, images):
            x = normalize(images)
            logits, sown = nnx.capture(nnx.merge(graphdef, variables), nnx.Intermediate)(x)
            outputs = {name: sown[name].get_value()[0] for name in sown}
            return logits, {INPUT: x, **outputs}

        return cls(tuple(points), capture)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def split_features(
        self,
        variables,
        split: data.Split,
        *,
        batch_size: int,
        mesh: Mesh,
        grids: Sequence[int] = (1,),
    ) -> dict[int, dict[str, np.ndarray]]:
        """Returns {grid: {point name: float32 features [N, D]}} of every example of `split`,
        in order: one jit-compiled pass in batches of `batch_size` over the mesh's devices."""
        step = jax.jit(functools.partial(_grid_features, self, tuple(grids)))
        parts: list[Mapping] = []
        batches = data.eval_batches(
            split, global_batch_size=batch_size, sharding=NamedSharding(mesh, P("data"))
        )
        for batch in batches:
            real = np.asarray(batch["mask"]) > 0
            features = jax.device_get(step(variables, batch["image"]))
            parts.append(jax.tree.map(lambda f, real=real: f[real], features))
        return jax.tree.map(lambda *fs: np.concatenate(fs), *parts)


def _grid_features(tap: Tap, grids, variables, images):
    """{grid: {name: pooled features}} of one batch: one capture serves every grid."""
    _, outputs = tap.capture(variables, images)
    return {g: {name: pooled(outputs[name], g) for name in tap.names} for g in grids}


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns the cosine similarity [B] of the rows of a and b [B, D] (float32); 1 where
    both rows are zero (the same representation), 0 where only one is."""
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    both_zero = (jnp.max(jnp.abs(a), axis=-1) == 0) & (jnp.max(jnp.abs(b), axis=-1) == 0)
    return jnp.where(both_zero, 1.0, dot / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))


def similarity(a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
    """Returns {'pooled': the cosine similarity [B] of the globally average-pooled outputs
    a and b [B, ...] of one layer, 'map': that of the whole outputs (flattened)}."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    flat = (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    return {"pooled": cosine(pooled(a), pooled(b)), "map": cosine(*flat)}
