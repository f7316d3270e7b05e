"""Input checks used at every boundary (config, data, CLI).

Each helper raises :class:`BrainalignError` (a ``ValueError``) whose message names the
parameter, what was expected and what was received, and suggests the closest valid value
where there is one (MNE's ``_check_option`` / ``_suggest``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["BrainalignError", "check_option", "check_range", "check_type", "suggest"]


class BrainalignError(ValueError):
    """A problem with the user's input: config, data, paths or names."""


def suggest(value: object, choices: Iterable[object]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_option(name: str, value: T, allowed: Iterable[T]) -> T:
    """Return ``value`` if it is one of ``allowed``; raise naming the choices and a guess."""
    choices = list(allowed)
    if value in choices:
        return value
    shown = ", ".join(repr(c) for c in choices[:40]) + (" ..." if len(choices) > 40 else "")
    raise BrainalignError(
        f"Invalid {name} {value!r}; expected one of [{shown}].{suggest(value, choices)}"
    )


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> Any:
    """Return ``value`` if it is an instance of ``types`` (bools are not ints)."""
    tup = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, tup) and not (isinstance(value, bool) and bool not in tup)
    if not ok:
        names = " or ".join(t.__name__ for t in tup)
        raise BrainalignError(f"{name} must be {names}, got {type(value).__name__} {value!r}.")
    return value


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` if it lies in the interval; raise showing the interval otherwise."""
    bad = (
        (low is not None and (value < low if low_inclusive else value <= low))
        or (high is not None and (value > high if high_inclusive else value >= high))
        or value != value  # NaN
    )
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        raise BrainalignError(f"{name} must be in {interval}, got {value!r}.")
    return value
