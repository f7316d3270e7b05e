"""Input checks used at every boundary (config, data, CLI).

Each helper raises :class:`BrainalignError` (a ``ValueError``) whose message names the
parameter, what was expected and what was received, and suggests the closest valid value
where there is one (MNE's ``_check_option`` / ``_suggest``).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["BrainalignError", "check_name", "check_option", "check_range", "check_type", "suggest"]


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
    """Return ``value`` if it is a finite number in the interval; raise showing the interval otherwise.

    NaN and +-inf are always refused, whatever the bounds: no key of brainalign means
    anything at infinity (``lr=inf`` trains to NaN, ``temperature=inf`` divides by it).
    """
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    opening = "[" if low_inclusive and low is not None else "("
    closing = "]" if high_inclusive and high is not None else ")"
    interval = f"{opening}{lo}, {hi}{closing}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BrainalignError(f"{name} must be a number in {interval}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise BrainalignError(f"{name} must be a finite number in {interval}, got {value!r}.")
    bad = (low is not None and (value < low if low_inclusive else value <= low)) or (
        high is not None and (value > high if high_inclusive else value >= high)
    )
    if bad:
        raise BrainalignError(f"{name} must be in {interval}, got {value!r}.")
    return value


#: Longest name accepted by :func:`check_name` (a path component; file systems allow 255 bytes).
NAME_MAX = 128
_NAME_FORM = (
    "a plain name: letters, digits, '_', '-' and '.', starting with a letter or digit, "
    f"at most {NAME_MAX} characters (it becomes a folder name)"
)


def check_name(what: str, value: Any) -> str:
    """Return ``value`` if it is a plain name that may safely become one path component.

    Study, experiment, run and subject names end up as folder names (``ray_results/<study>``,
    MLflow artifact roots, ``subject=<id>``). A name that is empty, ``.`` or ``..``, holds a
    slash, a backslash or a control character, starts with a dot or a dash (hidden files,
    command-line options) or is over-long could address another folder (``--fresh`` on a
    study named ``..`` would delete ``$BRAINALIGN_HOME``), so it is refused.

    Parameters
    ----------
    what : str
        What the name is, for the message (``"study name"``, ``"experiment"``).
    value : str
        The name.

    Returns
    -------
    str
        ``value`` unchanged.

    Raises
    ------
    BrainalignError
        Naming the value and the allowed form.
    """
    if not isinstance(value, str):
        raise BrainalignError(f"{what} must be a string, got {type(value).__name__} {value!r}; use {_NAME_FORM}.")
    problem = ""
    if not value:
        problem = "it is empty"
    elif value in (".", ".."):
        problem = "it names the current or the parent folder"
    elif "/" in value or "\\" in value:
        problem = "it holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "it holds a control character"
    elif value[0] in ".-":
        problem = f"it starts with {value[0]!r}"
    elif len(value) > NAME_MAX:
        problem = f"it is {len(value)} characters long"
    elif not all(c.isascii() and (c.isalnum() or c in "_-.") for c in value):
        bad = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "_-."))})
        problem = f"it holds {''.join(bad)!r}"
    if problem:
        raise BrainalignError(f"{what} {value!r} is not allowed ({problem}); use {_NAME_FORM}.")
    return value


def check_gpu_share(name: str, value: float) -> None:
    """A GPU amount Ray accepts per worker: a fraction in (0, 1] or a whole number of GPUs.

    Raises
    ------
    BrainalignError
        Zero, negative, non-finite, or a non-whole amount above 1.
    """
    check_range(name, value, low=0.0, low_inclusive=False)
    if value > 1 and not float(value).is_integer():
        raise BrainalignError(
            f"{name} = {value:g}: Ray shares a GPU only in fractions up to 1 (e.g. 0.25 puts four workers on one "
            "GPU); above 1 use a whole number of GPUs."
        )
