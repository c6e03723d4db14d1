"""Readers either stop at the first problem (loading for a run) or list them all (``upop data check``).

A reader takes ``problems: list[str] | None``. With ``None`` a bad entry raises its one-line
:class:`~upop.errors.DataError`; with a list the message is appended, the entry is skipped and
reading goes on, so one pass finds every problem.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from upop.errors import DataError, show

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


def collect_list(problems: list[str] | None, fn: Callable[..., T], path, data, root, fields: str) -> list[T]:
    """The items ``fn(path, i, entry, root)`` of a JSON list of annotation entries (``data``), with
    :func:`collect`'s handling of bad entries; a top level that is no list is refused naming the
    ``fields`` each entry needs."""
    if not isinstance(data, list):
        raise DataError(f"annotation file {show(path)}: top level is {type(data).__name__} (need a JSON list of "
                        f"{fields} entries)")
    items = (collect(problems, fn, path, i, entry, root) for i, entry in enumerate(data))
    return [it for it in items if it is not None]


def report(problems: list[str] | None, message: str) -> None:
    """Raise ``message`` as a DataError, or record it when ``problems`` is a list."""
    if problems is None:
        raise DataError(message)
    problems.append(message)


def require_fields(path, where: str, entry, keys: tuple[str, ...]) -> None:
    """Refuse an annotation entry that is not an object or lacks one of ``keys`` (one line naming
    the file, the entry and the fields needed)."""
    if not isinstance(entry, dict):
        raise DataError(f"annotation file {show(path)}: {where} is {type(entry).__name__} (need an object)")
    for key in keys:
        if key not in entry:
            needed = ", ".join(repr(k) for k in keys[:-1]) + f" and {keys[-1]!r}"
            raise DataError(f"annotation file {show(path)}: {where} has no {key!r} field (need {needed})")
