"""Checks of a model section's fields: each returns the field's value or raises a UserError
that names `model.<field>` and what it must be. The families call them before building
their layers (`models.architecture` is the model section's validation)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from errors import UserError


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
