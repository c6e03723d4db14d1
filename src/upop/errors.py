"""Typed errors for user mistakes.

Every error a user can cause (bad option, bad data, bad checkpoint, unsupported model) is one of
these. Their message is one line that names what was wrong, the value and what is allowed. The
CLI prints ``upop: error: <message>`` and exits with code 2, without a traceback.
"""

from __future__ import annotations

import os


class UPopError(ValueError):
    """Base class of every user-facing error raised by upop."""


class ConfigError(UPopError):
    """An option or config field has a value that is not allowed."""


class DataError(UPopError):
    """A dataset folder, annotation file or image is missing, empty or malformed."""


class UnsupportedModelError(UPopError):
    """The model class or ``config.model_type`` has no architecture spec."""


class CheckpointError(UPopError):
    """A compressed checkpoint (plan, config or weights) is missing, tampered or inconsistent."""


class TaskError(UPopError):
    """The task is unknown or does not fit the model class."""


#: most items of one list, tuple, set or dict that :func:`show` writes out
SHOW_ITEMS = 8
#: deepest nesting :func:`show` writes out (deeper containers are shown as ``[...]``)
SHOW_DEPTH = 4
_BIG_INT_BITS = 1024  # larger ints are described, not written (their repr costs, or is refused)
_OPEN = {list: ("[", "]"), tuple: ("(", ")"), set: ("{", "}"), frozenset: ("frozenset({", "})"), dict: ("{", "}")}


def show(value, limit: int = 200) -> str:
    """``value`` as it may appear inside a one-line message: quoted and escaped like ``repr``.

    Paths and strings come from users' files and folders; a newline, NUL or terminal escape in
    one must not break or forge the message line, so every non-printable character is escaped.
    The text is at most about ``limit`` characters (cut with ``...``; paths are kept whole: their
    end names the file), and it is built without ever forming the full ``repr`` of a large or
    deeply nested value (a YAML alias bomb is a list of a billion items): containers are walked
    iteratively, at most :data:`SHOW_ITEMS` items each and :data:`SHOW_DEPTH` levels deep.
    """
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    text = _bounded_repr(value, limit)
    return text if len(text) <= limit else text[:limit] + "..."


def _scalar_repr(value, limit: int) -> str:
    """The repr of a non-container, never longer than needed for ``limit`` characters."""
    if isinstance(value, (str, bytes, bytearray)):
        cut = value[:limit + 1]
        return repr(cut) + ("..." if len(value) > len(cut) else "")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _BIG_INT_BITS:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the message
        return f"<{type(value).__name__}>"
    return _one_line(text[:4 * limit + 64])[:limit + 1]


def _one_line(text: str) -> str:
    """A repr on one line: its lines (a NumPy array's or a tensor's repr spans several) joined by
    one space, any other non-printable character escaped."""
    lines = [line.strip() for line in text.splitlines()]
    text = " ".join(line for line in lines if line) if len(lines) > 1 else text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _bounded_repr(value, limit: int) -> str:
    """A repr-like text of ``value`` of at most about ``limit`` characters, built iteratively
    (an explicit stack, so no nesting depth can exhaust Python's recursion)."""
    parts: list[str] = []
    size = 0
    stack: list = [(value, 0)]
    while stack and size <= limit:
        item = stack.pop()
        if isinstance(item, str):  # literal text: brackets, separators
            text = item
        else:
            obj, depth = item
            kind = next((k for k in _OPEN if type(obj) is k), None)
            if kind is None:
                text = _scalar_repr(obj, limit)
            elif not len(obj):
                text = repr(obj)  # set() and frozenset() have no bracket form
            elif depth >= SHOW_DEPTH:
                text = _OPEN[kind][0] + "..." + _OPEN[kind][1]
            else:
                text = _OPEN[kind][0]
                stack.extend(reversed(_children(obj, kind, depth + 1)))
        parts.append(text)
        size += len(text)
    return "".join(parts)


def _children(obj, kind, depth: int) -> list:
    """The stack entries of a container's first :data:`SHOW_ITEMS` items, separators and closing."""
    import itertools

    out: list = []
    items = itertools.islice(obj.items() if kind is dict else obj, SHOW_ITEMS)
    for i, item in enumerate(items):
        if i:
            out.append(", ")
        if kind is dict:
            out.extend([(item[0], depth), ": ", (item[1], depth)])
        else:
            out.append((item, depth))
    if len(obj) > SHOW_ITEMS:
        out.append(f", ... ({len(obj)} items)")
    elif kind is tuple and len(obj) == 1:
        out.append(",")
    out.append(_OPEN[kind][1])
    return out
