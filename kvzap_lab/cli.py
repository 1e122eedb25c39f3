"""Command-line conventions shared by every kvzap-lab CLI: argument types, and bad input as one line, exit 2.

A CLI module defines ``main(argv) -> int`` and ends with ``sys.exit(cli.run(main))``. :func:`run` turns the
errors a user can cause (a bad value, a missing or unreadable file, a model or checkpoint that does not fit)
into one line ``PROG: error: MESSAGE`` on stderr and exit code 2, as argparse does for its own errors. Set
``KVZAP_LAB_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

# What a user's input can raise: bad values (ValueError and its subclasses: UnsupportedModelError,
# DatasetError, ModelMismatchError, json.JSONDecodeError, ...) and files that are missing, unreadable or of the
# wrong kind.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (newlines folded)."""
    text = str(err) or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Call ``main(argv)``; a user error ends as ``PROG: error: MESSAGE`` with exit code 2.

    Args:
        main: the CLI's entry point, returning its exit code.
        argv: the arguments (default: ``sys.argv[1:]``, as argparse reads them).
        prog: the program name in the message (default: the module that defines ``main``).

    Returns:
        ``main``'s exit code, or 2 after a user error.
    """
    try:
        return main(argv)
    except USER_ERRORS as err:
        if os.environ.get("KVZAP_LAB_DEBUG"):
            raise
        name = prog or f"python -m {_module_name(main)}"
        print(f"{name}: error: {one_line(err)}", file=sys.stderr)
        return 2


def _module_name(main: Callable) -> str:
    """``kvzap_lab.testbed`` also when the module runs as ``__main__`` (``python -m kvzap_lab.testbed``)."""
    if main.__module__ != "__main__":
        return main.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0; got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (no NaN, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return value


def fraction(low: float = 0.0, high: float = 1.0, *, high_open: bool = False) -> Callable[[str], float]:
    """argparse type factory: a number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""

    def parse(text: str) -> float:
        value = finite_float(text)
        if not (low <= value < high if high_open else low <= value <= high):
            bracket = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}{bracket}; got {text}")
        return value

    return parse


class ListOption(argparse.Action):
    """``--tasks a b`` (``nargs="+"``); the old comma spelling ``--tasks a,b`` still works, with a deprecation note.

    ``allowed`` (instead of argparse's ``choices``, which would refuse ``a,b`` before it is split) lists the valid
    items."""

    def __init__(self, option_strings, dest, allowed=None, **kwargs):
        self.allowed = None if allowed is None else list(allowed)
        if self.allowed is not None and "metavar" not in kwargs:
            kwargs["metavar"] = "{" + ",".join(self.allowed) + "}"
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = [part for value in values for part in value.split(",") if part]
        if any("," in value for value in values):
            print(f"{parser.prog}: warning: {option_string} a,b is deprecated; write {option_string} {' '.join(items)}", file=sys.stderr)
        if self.allowed is not None:
            unknown = [item for item in items if item not in self.allowed]
            if unknown:
                parser.error(f"argument {option_string}: unknown {unknown}; choose from {', '.join(self.allowed)}")
        setattr(namespace, self.dest, items)


class DeprecatedAlias(argparse.Action):
    """An old option name kept working: stores into the new option's ``dest`` and says what to write instead."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
