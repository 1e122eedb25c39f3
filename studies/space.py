"""Search-space building blocks: a space is a ``{name: Float | Int | Choice}`` dict whose names are the keyword
arguments of the object they configure (a scorer's constructor, or the rule of :mod:`kvzap_lab.studies.rule`).

Every dimension carries a ``default`` (the paper's or the scorer's own value), which the study enqueues as its
baseline trial. Spaces are plain data so they can be checked (:func:`check_space`), overridden from the command
line (:func:`override`: ``--space lr=1e-4:1e-2``, ``--space depth=1,2``, ``--space epochs=15``) and sampled with
an Optuna trial (:func:`suggest`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Union


@dataclass(frozen=True)
class Float:
    """A float in ``[low, high]`` (log-uniform when ``log``)."""

    low: float
    high: float
    log: bool = False
    default: float | None = None


@dataclass(frozen=True)
class Int:
    """An int in ``[low, high]`` (log-uniform when ``log``)."""

    low: int
    high: int
    log: bool = False
    default: int | None = None


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (str, int, float or bool)."""

    values: tuple
    default: Any = None


Dim = Union[Float, Int, Choice]


class SpaceError(ValueError):
    """A search space that cannot be sampled (inverted or empty range, unknown dimension, bad override)."""


def check_dim(name: str, dim: Dim) -> None:
    """Raise :class:`SpaceError` for an inverted, empty or non-positive-log range, or a default outside it."""
    if isinstance(dim, Choice):
        if len(dim.values) == 0:
            raise SpaceError(f"search dimension {name!r} has no values to choose from")
        if dim.default is not None and dim.default not in dim.values:
            raise SpaceError(f"search dimension {name!r}: default {dim.default!r} is not one of {list(dim.values)}")
        return
    if not isinstance(dim, (Float, Int)):
        raise SpaceError(f"search dimension {name!r} must be a Float, Int or Choice; got {type(dim).__name__}")
    if not (math.isfinite(dim.low) and math.isfinite(dim.high)):
        raise SpaceError(f"search dimension {name!r}: bounds must be finite, got [{dim.low}, {dim.high}]")
    if dim.low > dim.high:
        raise SpaceError(f"search dimension {name!r}: range [{dim.low}, {dim.high}] is inverted (low > high); write low:high")
    if dim.low == dim.high:
        raise SpaceError(
            f"search dimension {name!r}: range [{dim.low}, {dim.high}] is empty; give low < high, or fix the value "
            f"with --space {name}={dim.low}"
        )
    if dim.log and dim.low <= 0:
        raise SpaceError(f"search dimension {name!r} is log-scaled, so its low bound must be > 0; got {dim.low}")
    if dim.default is not None and not dim.low <= dim.default <= dim.high:
        raise SpaceError(f"search dimension {name!r}: default {dim.default} is outside [{dim.low}, {dim.high}]")


def contains(dim: Dim, value) -> bool:
    """Whether ``dim`` can take ``value`` (one of its choices, or inside its range)."""
    return value in dim.values if isinstance(dim, Choice) else dim.low <= value <= dim.high


def check_space(space: dict[str, Dim]) -> dict[str, Dim]:
    """Check every dimension of ``space`` (see :func:`check_dim`); returns it."""
    if not space:
        raise SpaceError("the search space is empty: it needs at least one dimension")
    for name, dim in space.items():
        check_dim(name, dim)
    return space


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def override(space: dict[str, Dim], specs: list[str]) -> dict[str, Dim]:
    """Apply ``NAME=LOW:HIGH`` (range), ``NAME=A,B,C`` (choices) or ``NAME=VALUE`` (fixed) overrides to ``space``."""
    space = dict(space)
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name or not text:
            raise SpaceError(f"--space takes NAME=LOW:HIGH, NAME=A,B,C or NAME=VALUE; got {spec!r}")
        if name not in space:
            raise SpaceError(f"--space {spec!r}: no dimension {name!r} in this search space; dimensions: {', '.join(space)}")
        dim = space[name]
        if ":" in text:
            if isinstance(dim, Choice):
                raise SpaceError(f"--space {spec!r}: {name!r} is a choice among {list(dim.values)}; give NAME=A,B,C")
            low, _, high = text.partition(":")
            cast = float if isinstance(dim, Float) else int
            try:
                low, high = cast(low), cast(high)
            except ValueError:
                raise SpaceError(f"--space {spec!r}: bounds of {name!r} must be {cast.__name__}s") from None
            default = dim.default if dim.default is not None and low <= dim.default <= high else None
            space[name] = replace(dim, low=low, high=high, default=default)
        else:
            values = tuple(_value(v) for v in text.split(",") if v != "")
            space[name] = Choice(values, default=dim.default if dim.default in values else None)
        check_dim(name, space[name])
    return space


def suggest(trial, space: dict[str, Dim]) -> dict:
    """Sample every dimension of ``space`` with an Optuna ``trial``; returns ``{name: value}``."""
    values = {}
    for name, dim in space.items():
        if isinstance(dim, Float):
            values[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        elif isinstance(dim, Int):
            values[name] = trial.suggest_int(name, dim.low, dim.high, log=dim.log)
        else:
            values[name] = trial.suggest_categorical(name, list(dim.values))
    return values


def defaults(space: dict[str, Dim]) -> dict:
    """The default of every dimension (a dimension without one takes its low bound or first choice)."""
    return {
        name: dim.default if dim.default is not None else (dim.values[0] if isinstance(dim, Choice) else dim.low)
        for name, dim in space.items()
    }


def describe(space: dict[str, Dim]) -> dict[str, str]:
    """A short text form of each dimension, for logs and study metadata."""
    out = {}
    for name, dim in space.items():
        if isinstance(dim, Choice):
            out[name] = "{" + ", ".join(map(str, dim.values)) + "}"
        else:
            out[name] = f"[{dim.low:g}, {dim.high:g}]" + (" log" if dim.log else "")
    return out
