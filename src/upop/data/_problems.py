"""Readers either stop at the first problem (loading for a run) or list them all (``upop data check``).

A reader takes ``problems: list[str] | None``. With ``None`` a bad entry raises its one-line
:class:`~upop.errors.DataError`; with a list the message is appended, the entry is skipped and
reading goes on, so one pass finds every problem.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import DataError

T = TypeVar("T")


def collect(problems: list[str] | None, fn: Callable[..., T], *args) -> T | None:
    """``fn(*args)``; if it raises a DataError and ``problems`` is a list, record it and return None."""
    try:
        return fn(*args)
    except DataError as exc:
        if problems is None:
            raise
        problems.append(str(exc))
        return None


def report(problems: list[str] | None, message: str) -> None:
    """Raise ``message`` as a DataError, or record it when ``problems`` is a list."""
    if problems is None:
        raise DataError(message)
    problems.append(message)
