"""Errors that the command line turns into exit status 2 (bad usage, configuration or input)."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from typing import Any


class UsageError(Exception):
    """Bad usage, configuration or input: reported in one message, exit status 2."""


class ConfigError(UsageError):
    """A configuration key, type or value is wrong."""


class DataError(UsageError):
    """Input data is missing, truncated or malformed."""


class CheckpointError(UsageError):
    """A path is not a checkpoint, or a checkpoint does not match the configuration."""


class DiskFullError(RuntimeError):
    """No space left on the device while writing a file (exit status 1); the file it was to
    replace is intact."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (``trainer.stop_on_nan``): exit status 1."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` if none is close."""
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 8, 8, 8
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def short_repr(value: Any, limit: int = 160) -> str:
    """``repr(value)`` cut short (nesting, items and length bounded, with ``...``): safe to put
    into a message whatever the value, a list of a billion items included."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
