"""Typed errors for user mistakes.

Every error a user can cause (bad option, bad data, bad checkpoint, unsupported model) is one of
these. Their message is one line that names what was wrong, the value and what is allowed. The
CLI prints ``upop: error: <message>`` and exits with code 2, without a traceback.
"""

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


def show(value, limit: int = 200) -> str:
    """``value`` as it may appear inside a one-line message: quoted and escaped like ``repr``.

    Paths and strings come from users' files and folders; a newline, NUL or terminal escape in
    one must not break or forge the message line, so every non-printable character is escaped.
    Strings longer than ``limit`` characters are cut (paths are kept whole: their end names the
    file).
    """
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
