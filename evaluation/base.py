"""What a measure is, what it sees, and the one jit-compiled pass that feeds every measure.

A `Measure` (see `evaluation.measures` for today's) owns everything about one quantity: its
per-batch sums (jit-able, added up over the split in ONE compiled pass shared by all measures),
its eval.json fields, its TensorBoard scalars, its lines of the terminal report and its figures.
eval.json, TensorBoard and the report are made by going through the chosen measures in order.
A measure that needs more than batch sums (a timed pass, the layers' activations, probes of
the restored run) does that in `run`, which gets a `Context`: the restored run, the split, the
apply function and the options.

The model enters as `apply_fn(variables, images) -> logits`: uint8 images [B, H, W, C] in,
float32 logits [B, classes] out (normalisation inside), so the same pass measures a trained
network or any hand-built module (the tests' exactly shift-invariant one). Every sum is
weighted by the eval batches' mask, so padding never counts and each example counts once.

The layers enter as a `taps.Tap` (the probe points and a function that reads them): a measure
with `shift_features` compares the layers' outputs of shifted images in the same pass (and the
same forward passes) as the shift curves; the probes and the top patches read them
in passes of their own, from `run`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import data
from errors import UserError
from evaluation import shift, taps

ApplyFn = Callable[[Any, jax.Array], jax.Array]

# At most this many probe points (evenly spaced) are compared under shifts: each one's output
# of the unshifted batch is held through the shift loop (ResNet-110 has 112 points).
SHIFT_POINTS = 32


@dataclasses.dataclass(frozen=True)
class Options:
    """The settings of one evaluation, the same for every measure (static under jit)."""

    num_classes: int
    max_shift: int = 8  # the largest shift k, in pixels, of the shift measures
    tta: bool = False  # measure flip test-time augmentation


class Batch:
    """One eval batch inside the compiled pass: images [B, H, W, C] uint8, labels [B], mask [B]
    (1 for a real example), its `index` in the pass, and the model's outputs that measures
    share (`logits`, `shift_logits`, `shift_features`), each computed at most once."""

    def __init__(
        self,
        apply_fn,
        variables,
        batch,
        index,
        options: Options,
        shift_curves: bool,
        tap: taps.Tap | None = None,
        shift_features: bool = False,
    ):
        self.images, self.labels, self.mask = batch["image"], batch["label"], batch["mask"]
        self.index = index
        self.options = options
        self.tap = tap
        self._apply_fn, self._variables = apply_fn, variables
        self._shift_curves = shift_curves
        self._shift_features = shift_features

    def apply(self, images: jax.Array) -> jax.Array:
        """Returns the model's logits [B, classes] of uint8 `images` [B, H, W, C]."""
        return self._apply_fn(self._variables, images)

    @functools.cached_property
    def layer_outputs(self) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits [B, classes], {probe point: its output [B, ...]}) of the unshifted images,
        read through the tap (`evaluation.taps.Tap`)."""
        if self.tap is None:
            raise ValueError("a measure reads the layers: pass split_sums(..., tap=...)")
        logits, outputs = self.tap.capture(self._variables, self.images)
        return logits, {name: outputs[name] for name in self.tap.names}

    @property
    def shift_points(self) -> list[str]:
        """The probe points that `shift_similarity` compares: at most SHIFT_POINTS of them."""
        return [p.name for p in taps.thin(self.tap.points, SHIFT_POINTS)]

    @functools.cached_property
    def _shifted(self) -> dict[str, Any]:
        """The outputs of the images moved k = 0..K (options.max_shift) pixels, example r in
        direction r mod 4 (`shift.DIRECTIONS`): 'logits' [K + 1, 2, B, classes] (circular,
        zero fill) when a measure has `shift_curves`; 'similarity' {point: {'pooled', 'map'}:
        [K + 1, B]} (`taps.similarity` of each probe point's output of the circularly moved
        image with the unshifted image's) when one has `shift_features`.

        One compiled loop body serves every shift, and a tapped pass reads the logits and the
        layers of a moved image in one forward pass. Shift 0 is the unshifted image, computed
        by the same code as the others (tapped: the unshifted pass itself), so its consistency
        is exactly 1.
        """
        size, features = self.images.shape[0], self._shift_features
        if features:
            reference_logits, outputs = self.layer_outputs
            reference = {name: outputs[name] for name in self.shift_points}

        def outputs_at(k):
            offsets = shift.curve_offsets(size, k)
            circular = shift.translate(self.images, offsets, circular=True)
            out = {}
            if features:
                logits, moved = self.tap.capture(self._variables, circular)
                out["similarity"] = {n: taps.similarity(moved[n], reference[n]) for n in reference}
            else:
                logits = self.apply(circular)
            if self._shift_curves:
                filled = self.apply(shift.translate(self.images, offsets, circular=False))
                out["logits"] = jnp.stack([logits, filled])
            return out

        if not features:
            return jax.lax.map(outputs_at, jnp.arange(self.options.max_shift + 1))
        ones = jnp.ones((size,), jnp.float32)
        first = {"similarity": {n: {"pooled": ones, "map": ones} for n in reference}}
        if self._shift_curves:
            first["logits"] = jnp.stack([reference_logits, reference_logits])
        moved = jax.lax.map(outputs_at, jnp.arange(1, self.options.max_shift + 1))
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, moved)

    @property
    def shift_logits(self) -> jax.Array:
        """Logits [K + 1, 2, B, classes] of the images moved k = 0..K pixels, circular then
        zero fill (see `_shifted`; the measure sets `shift_curves`)."""
        return self._shifted["logits"]

    @property
    def shift_similarity(self) -> dict[str, dict[str, jax.Array]]:
        """{probe point: {'pooled', 'map'}: cosine similarity [K + 1, B]} of the point's output
        of the image moved k = 0..K pixels (circular) with the unshifted image's, for the
        `shift_points` (see `_shifted`; the measure sets `shift_features`)."""
        return self._shifted["similarity"]

    @functools.cached_property
    def logits(self) -> jax.Array:
        """The logits [B, classes] of the unshifted images: from the pass that measures use
        anyway (the tapped pass, or shift 0 of the shift curves), else their own forward pass."""
        if self._shift_features:
            return self.layer_outputs[0]
        if self._shift_curves:
            return self.shift_logits[0, 0]
        return self.apply(self.images)


@dataclasses.dataclass(eq=False)
class Context:
    """What a measure's `run` and `figures` may use beyond its batch sums.

    `run`: the restored training run (`evaluation.run.Run`; None when a bare model is measured),
    `split`/`split_name`: the examples measured, `apply_fn`/`variables`: the model, `count`:
    the number of examples, `out_dir`: where the figures go, `tap`: the model's probe points
    and how to read them (`evaluation.taps.Tap`; None: no layer measures), `batch_size` and
    `mesh`: how the pass ran (for a measure's own passes), `train_split`: training examples
    (the probes'; default: the run's).
    """

    options: Options
    split: data.Split
    apply_fn: ApplyFn
    variables: Any
    count: int
    run: Any = None
    split_name: str = "test"
    out_dir: Path | None = None
    tap: taps.Tap | None = None
    batch_size: int = 0
    mesh: Mesh | None = None
    train_examples: data.Split | None = None

    @property
    def train_split(self) -> data.Split:
        """The training examples: `train_examples` when given, else the run's training split."""
        if self.train_examples is not None:
            return self.train_examples
        if self.run is None:
            raise ValueError("no training split: pass train_examples or a restored run")
        return self.run.splits.train

    def require_tap(self, measure: str) -> taps.Tap:
        """Returns `tap`; ValueError naming `measure` when there is none."""
        if self.tap is None:
            raise ValueError(f"measure {measure!r} reads the layers: it needs a Context.tap")
        return self.tap

    @functools.cached_property
    def evaluation(self) -> dict[str, float]:
        """{'loss', 'accuracy', 'count', 'images_per_s'} of the split by the run's compiled eval
        step (one timed pass, shared by the measures that read it)."""
        if self.run is None:
            raise ValueError("the eval step's pass needs a restored run (Context.run)")
        return self.run.timed_evaluation(self.split)


class Measure:
    """One thing eval measures. Subclasses set `name` and override what they need; each hook's
    default contributes nothing. Register a subclass with `@register` to make it selectable by
    name (`--measures=`). Measures keep no state: everything comes in through the arguments."""

    name: ClassVar[str] = ""
    # True when `sums` reads `batch.shift_logits`: then `batch.logits` is their shift 0.
    shift_curves: ClassVar[bool] = False
    # True when `sums` reads `batch.shift_similarity` (the tap's layers under circular
    # shifts): the circular logits then come from the same forward passes.
    shift_features: ClassVar[bool] = False

    def sums(self, batch: Batch) -> dict[str, jax.Array]:
        """Jit-able sums over the real examples of one batch (weighted by batch.mask); the
        pass adds them up over the split and hands the totals to `run`."""
        return {}

    def run(self, context: Context, sums: dict[str, np.ndarray]) -> dict[str, Any]:
        """Returns this measure's eval.json fields (JSON-ready) from the totals of its `sums`
        over the split, and from anything else it measures through `context`."""
        return {}

    def scalars(self, result: dict[str, Any]) -> dict[str, float]:
        """The TensorBoard scalars (name: value) of an evaluation `result` (eval.json)."""
        return {}

    def headline(self, result: dict[str, Any]) -> list[str]:
        """Short items of the report's summary line, e.g. 'ECE 1.7%'."""
        return []

    def report(self, result: dict[str, Any]) -> list[str]:
        """Lines of the terminal report, below the summary line."""
        return []

    def figures(self, result: dict[str, Any], context: Context) -> dict[str, Any]:
        """Draws this measure's PNG figures into context.out_dir; returns eval.json fields that
        describe them (most measures: none)."""
        return {}


REGISTRY: dict[str, type[Measure]] = {}


def register(cls: type[Measure]) -> type[Measure]:
    """Class decorator: makes the Measure subclass `cls` selectable by its `name`."""
    if not cls.name or cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"measure {cls.__name__}: its name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    return cls


def select(names: Sequence[str]) -> list[Measure]:
    """Returns the registered measures `names`, in that order, each once; UserError for an
    unknown name, listing the valid ones."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(
            f"unknown measure {unknown[0]!r} in --measures; choose from {', '.join(REGISTRY)}."
        )
    return [REGISTRY[n]() for n in dict.fromkeys(names)]


def batch_sums(
    measures: Sequence[Measure],
    apply_fn: ApplyFn,
    options: Options,
    tap: taps.Tap | None,
    variables,
    batch,
    index,
) -> dict[str, Any]:
    """Returns {'count': real examples, <measure name>: its sums} of one batch (jit-able)."""
    view = Batch(
        apply_fn,
        variables,
        batch,
        index,
        options,
        any(m.shift_curves for m in measures),
        tap,
        any(m.shift_features for m in measures),
    )
    sums = {"count": jnp.sum(view.mask)}
    for measure in measures:
        sums[measure.name] = measure.sums(view)
    return sums


def split_sums(
    measures: Sequence[Measure],
    apply_fn: ApplyFn,
    variables,
    split: data.Split,
    *,
    batch_size: int,
    mesh: Mesh,
    options: Options,
    tap: taps.Tap | None = None,
) -> dict[str, Any]:
    """Returns `batch_sums` added up over every example of `split` (host numpy arrays).

    Batches of `batch_size` are split over the mesh's 'data' axis; `variables` are used as
    laid out (replicated, for a restored train state). One program for all measures, compiled
    once. `tap` reads the layers, for the measures with `shift_features`.
    """
    step = jax.jit(functools.partial(batch_sums, tuple(measures), apply_fn, options, tap))
    totals = None
    batches = data.eval_batches(
        split, global_batch_size=batch_size, sharding=NamedSharding(mesh, P("data"))
    )
    for index, batch in enumerate(batches):
        sums = step(variables, batch, np.int32(index))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return jax.device_get(totals)


def measure_split(
    measures: Sequence[Measure],
    apply_fn: ApplyFn,
    variables,
    split: data.Split,
    *,
    batch_size: int,
    mesh: Mesh,
    options: Options,
    tap: taps.Tap | None = None,
    **context,
) -> tuple[dict[str, Any], Context]:
    """Runs `measures` on `split`: one pass for their sums, then each one's `run`.

    Returns (fields, context): the measures' eval.json fields, in their order, and the
    `Context` they ran in (its other fields, e.g. `run`, `split_name`, `out_dir`,
    `train_examples`, come from the keyword arguments).
    """
    totals = split_sums(
        measures,
        apply_fn,
        variables,
        split,
        batch_size=batch_size,
        mesh=mesh,
        options=options,
        tap=tap,
    )
    count = int(round(float(totals["count"])))
    ctx = Context(
        options,
        split,
        apply_fn,
        variables,
        count,
        tap=tap,
        batch_size=batch_size,
        mesh=mesh,
        **context,
    )
    fields = {}
    for measure in measures:
        fields.update(measure.run(ctx, totals[measure.name]))
    return fields, ctx
