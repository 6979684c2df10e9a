"""What the entry points share to check their flags before any work: argparse types,
path checks, and which flags a command line set.

A check on one flag alone is an argparse ``type=`` (or ``choices=``): argparse turns its
message into ``PROG: error: argument --epochs: ...`` and exit status 2 while parsing.
Checks across flags, against the model and on the disk raise
:class:`~reference_models.errors.ConfigError` from each entry point's validate step, which
its ``main`` turns into the same one line.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError

__all__ = ["dest_of", "existing_file", "float_in", "given_flags", "int_at_least", "new_file",
           "writable_folder"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``.

    >>> int_at_least(1)("3")
    3
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1  # not an integer: the same message as one out of range
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from ``low`` to ``high``, the
    ends included unless ``low_open`` / ``high_open``.

    >>> float_in(0, 1, high_open=True)("0.25")
    0.25
    """
    if math.isinf(high):
        allowed = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                   f"{')' if high_open else ']'}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations (``args`` attribute names) that ``argv`` sets explicitly.

    Parses ``argv`` once more into a namespace that already holds a marker for every
    destination, so argparse fills in no default and what still holds the marker was not
    given: a flag given with its default value counts as given. Call it after the real
    parse, which has already refused a bad command line.
    """
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {dest for dest, value in vars(parser.parse_args(argv, namespace)).items()
            if value is not unset}


def dest_of(flag: str) -> str:
    """The ``args`` attribute of a flag as messages name it.

    >>> dest_of("--carry/--no-carry")
    'carry'
    """
    return flag.split("/")[0].removeprefix("--").replace("-", "_")


def writable_folder(flag: str, text: str) -> Path:
    """``text`` as a folder that exists or can be made, and written to; ConfigError if not.

    Nothing is created: the nearest existing ancestor must be a writable folder.
    """
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {text!r} is a file; it needs a folder")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {text!r}: {str(existing)!r} is a file, so no folder can "
                          "be made inside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {text!r}: {str(existing)!r} is not writable")
    return path


def existing_file(flag: str, text: str, what: str = "file") -> Path:
    """``text`` as a file that exists; ConfigError (``no such {what}``) if not."""
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{flag} {text!r}: no such {what}")
    return path


def new_file(flag: str, text: str) -> Path:
    """``text`` as a file still to be written: absent, in a writable folder."""
    path = Path(text)
    if path.exists():
        raise ConfigError(f"{flag} {text!r} exists; name a new file (nothing is overwritten)")
    writable_folder(flag, str(path.parent))
    return path
