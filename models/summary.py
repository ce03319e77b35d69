"""The architecture summary: every layer's kernel F, stride S, padding P, shapes, weights,
biases, FLOPs and receptive field, with totals; as a text table or as JSON.

All numbers come from the specs (`models.architecture`), i.e. from `models.shapes`; each
row's kind label and note from the layer's kind (`models.kinds`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from models.kinds import KINDS
from models.shapes import LayerSpec

_COLUMNS = (
    "layer",
    "kind",
    "F",
    "S",
    "P",
    "input",
    "output",
    "weights",
    "biases",
    "FLOPs",
    "RF",
    "note",
)
_NUMERIC = {"F", "S", "P", "weights", "biases", "FLOPs", "RF"}


def count_params(module: nnx.Module) -> int:
    """Returns the number of trained parameters (entries of nnx.Param leaves) of `module`;
    works on abstract modules from `nnx.eval_shape` too."""
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return sum(math.prod(leaf.shape) for leaf in leaves)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _row(spec: LayerSpec) -> dict[str, str]:
    kind = KINDS[spec.kind]
    window = kind.has_window
    return {
        "layer": spec.name,
        "kind": kind.label(spec),
        "F": str(spec.kernel_size) if window else "",
        "S": str(spec.stride) if window else "",
        "P": str(spec.padding) if window else "",
        "input": _shape(spec.in_shape),
        "output": _shape(spec.out_shape),
        "weights": f"{spec.weights:,}",
        "biases": f"{spec.biases:,}",
        "FLOPs": f"{spec.flops:,}",
        "RF": str(spec.receptive_field),
        "note": kind.note(spec),
    }


def totals(specs: Sequence[LayerSpec]) -> dict[str, int]:
    """Returns the sums over `specs`: params, weights, biases, batch_stats, flops."""
    return {
        "params": sum(s.params for s in specs),
        "weights": sum(s.weights for s in specs),
        "biases": sum(s.biases for s in specs),
        "batch_stats": sum(s.batch_stats for s in specs),
        "flops": sum(s.flops for s in specs),
    }


def format_table(specs: Sequence[LayerSpec]) -> str:
    """Returns the summary as a text table, one row per layer, then the totals."""
    rows = [dict(zip(_COLUMNS, _COLUMNS, strict=True))] + [_row(s) for s in specs]
    widths = {c: max(len(r[c]) for r in rows) for c in _COLUMNS}

    def line(row: dict[str, str]) -> str:
        cells = [
            row[c].rjust(widths[c]) if c in _NUMERIC else row[c].ljust(widths[c]) for c in _COLUMNS
        ]
        return "  ".join(cells).rstrip()

    lines = [line(rows[0]), "-" * len(line(rows[0]))] + [line(r) for r in rows[1:]]
    t = totals(specs)
    lines += [
        "",
        f"input {_shape(specs[0].in_shape)} -> output {_shape(specs[-1].out_shape)}",
        f"trained params: {t['params']:,} (weights {t['weights']:,} + biases "
        f"{t['biases']:,}); {4 * t['params'] / 2**20:.2f} MiB at float32",
        f"FLOPs per example (forward, 2 per multiply-accumulate): {t['flops']:,}",
    ]
    if t["batch_stats"]:
        lines.append(f"BatchNorm running statistics (state, not trained): {t['batch_stats']:,}")
    local = [s for s in specs if s.shared_params]  # the locally connected layers
    if local:
        unshared = sum(s.params for s in local)
        shared = sum(s.shared_params for s in local)
        lines.append(
            f"locally connected layers: {unshared:,} params; with weight sharing {shared:,} "
            f"(the whole model would have {t['params'] - unshared + shared:,})"
        )
    return "\n".join(lines)


def to_json(specs: Sequence[LayerSpec]) -> dict[str, Any]:
    """Returns the summary as a JSON-ready dict: `layers` (one dict per spec, with `params`),
    `total_params`, `total_weights`, `total_biases`, `total_batch_stats`, `total_flops`,
    `input_shape`, `output_shape`."""
    layer_dicts = [{**dataclasses.asdict(s), "params": s.params} for s in specs]
    for d in layer_dicts:
        for key in ("in_shape", "out_shape", "inputs"):
            d[key] = list(d[key])
    return {
        **{f"total_{k}": v for k, v in totals(specs).items()},
        "input_shape": list(specs[0].in_shape),
        "output_shape": list(specs[-1].out_shape),
        "layers": layer_dicts,
    }
