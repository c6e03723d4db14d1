"""What a path really is, before upop opens it: a regular file, or a folder, a FIFO, a device, a
symbolic link loop... (one line each), and bounded reads of small text files.

Opening a FIFO for reading blocks until a writer appears and ``/dev/zero`` never ends, so a
path a user gave is ``stat``-ed first and only a regular file is ever read; the read itself
opens with ``O_NONBLOCK`` and checks the opened file again (the path may change in between).
"""

from __future__ import annotations

import errno
import os
import stat

from upop.errors import show

#: what a non-regular file is, by its ``stat`` type
_KINDS = ((stat.S_ISDIR, "is a folder"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
          (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
          (stat.S_ISSOCK, "is a socket"))


def kind_of(mode: int) -> str:
    """``"is a folder"``, ``"is a FIFO (named pipe)"``... for a ``st_mode`` that is not a regular file."""
    return next((text for test, text in _KINDS if test(mode)), "is not a regular file")


def not_a_file(path) -> str | None:
    """Why ``path`` is not a readable regular file (``"does not exist"``, ``"is a folder"``, ``"is
    a symbolic link loop"``, ``"is a FIFO (named pipe), not a regular file"``...), or None if it
    is one. Follows symbolic links, never opens the path."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "is a symbolic link to a missing file" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        return _stat_error(exc)
    except ValueError:  # a NUL in the path
        return "has a NUL character in its path, which no file name can hold"
    if stat.S_ISREG(info.st_mode):
        return None
    what = kind_of(info.st_mode)
    return what if what == "is a folder" else f"{what}, not a regular file"


def _stat_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link loop"
    if exc.errno == errno.EACCES:
        return "cannot be read: permission denied"
    if exc.errno == errno.ENAMETOOLONG:
        return "has a name too long for the file system"
    if exc.errno == errno.ENOTDIR:
        return "does not exist (a part of its path is a file, not a folder)"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def read_limited(path, limit: int, what: str, error: type) -> bytes:
    """The bytes of the regular file ``path``, refusing (``error``, one line naming ``what`` and
    ``path``) anything that is not a regular file or holds more than ``limit`` bytes; never
    reads more than ``limit + 1`` bytes."""
    problem = not_a_file(path)
    if problem:
        raise error(f"{what} {show(path)} {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{what} {show(path)} {_stat_error(exc)}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced since the stat above
            raise error(f"{what} {show(path)} {kind_of(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise error(f"{what} {show(path)} is too large ({info.st_size:,} bytes; the limit is {limit:,})")
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise error(f"{what} {show(path)} {_stat_error(exc)}") from None
    if len(data) > limit:
        raise error(f"{what} {show(path)} is too large (more than the limit of {limit:,} bytes)")
    return data


_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))


def decode_utf8(data: bytes, path, what: str, error: type) -> str:
    """``data`` as UTF-8 text (a UTF-8 byte-order mark is dropped); UTF-16/32 or binary data is a
    one-line ``error`` saying so."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise error(f"{what} {show(path)} is {name} text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise error(f"{what} {show(path)} is not UTF-8 text (line {line}, byte {exc.start}: is it a binary "
                    "file?); save it as UTF-8") from None


def image_files(entries, suffixes: tuple[str, ...], problems: list[str] | None, what: str = "image file") -> list:
    """The paths of ``entries`` (a folder's listing) with one of ``suffixes`` (any case) that are
    regular files, sorted; a visible entry with such a name that is not one (a folder, FIFO,
    device, symbolic link loop...) is reported through ``problems`` (raised as a DataError when
    it is None) instead of being skipped silently. Hidden names (``.name``) are skipped."""
    from upop.data._problems import report

    files = []
    for path in entries:
        if path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        problem = not_a_file(path)
        if problem is None:
            files.append(path)
        else:
            report(problems, f"{what} {show(path)} {problem} (need an image file)")
    return sorted(files)
