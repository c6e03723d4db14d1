"""Atomic writes: a file or a whole folder appears complete or not at all.

Every writer writes a temp sibling (``.NAME.tmp-PID-RAND``, the one scheme
:meth:`upop.runs.rundir.RunDir.clean_temp` recognises and removes after a crash), fsyncs it and renames
it into place; a folder that already exists is renamed aside first and deleted after the swap.
Also the shared-disk marker of the multi-node check (:func:`shared_marker`, :func:`sees_marker`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from upop.errors import ConfigError

MARKER_PREFIX = ".upop-node-check-"
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{8})")
"""The temp names of :func:`_temp_path` (``tmp``: being written, ``old``: set aside)."""
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def show_path(value: object) -> str:
    """A user value (path, file name) for a one-line message: quoted and escaped like ``repr``,
    so newlines, control characters and NUL never appear raw (also rundir's and folder_lock's)."""
    return repr(os.fspath(value) if isinstance(value, os.PathLike) else str(value))


# ----------------------------------------------------------------------------- atomic writers


def _temp_path(target: Path, tag: str) -> Path:
    """A fresh temp name next to ``target`` in the one scheme :meth:`RunDir.clean_temp` knows."""
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def open_temp(target: Path) -> tuple[int, Path]:
    """Create (exclusively) and open a temp file for ``target``; returns (fd, path)."""
    while True:
        tmp = _temp_path(target, "tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:  # 32 random bits collided: draw again
            continue


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable, where the OS lets a folder be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then its folders (before ``root`` is renamed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def write_file_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a file atomically: ``write(fh)`` fills a binary temp file next to ``path``, which is
    fsynced and renamed over ``path``; on any exception the temp is removed and ``path`` is as
    before. The base of the writers below, public for callers that write to a file object
    (``savefig(fh, format="png")``)."""
    path = Path(path)
    fd, tmp = open_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    return write_file_atomic(path, lambda fh: fh.write(data))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 1, sorted keys, final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch  # here, not at the top: the folder, lock and text writers need no torch

    return write_file_atomic(path, lambda fh: torch.save(obj, fh))


def write_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Write a folder atomically: ``fill(tmp)`` writes into a temp sibling folder, which then
    replaces ``path`` (an existing folder is renamed aside, the new one renamed in, the old one
    deleted); a failure or kill leaves the previous ``path`` (or none) intact. Parents are
    created. A ``path`` that is a symbolic link or a file is refused."""
    out = Path(path)
    if out.is_symlink():
        raise ConfigError(f"{show_path(out)} is a symbolic link; upop never writes through links, "
                          "remove it or choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{show_path(out)} exists and is not a folder; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        fill(tmp)
        fsync_tree(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def make_temp_dir(target: Path) -> Path:
    while True:
        tmp = _temp_path(target, "tmp")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is renamed aside first (and put back if the
    second rename fails), then deleted."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = _temp_path(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by RunDir.clean_temp


# ----------------------------------------------------------------------------- multi-node check


def _marker_path(path: str | os.PathLike, token: str) -> Path:
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ValueError(f"marker token must be 1-64 letters, digits, '_' or '-', not {show_path(token)}")
    return Path(path) / f"{MARKER_PREFIX}{token}"


@contextlib.contextmanager
def shared_marker(path: str | os.PathLike, token: str) -> Iterator[Path]:
    """Rank 0's half of the shared-disk check: writes ``path/.upop-node-check-TOKEN`` (holding
    ``token``) for the body of the ``with``, then removes it. Every rank calls
    :func:`sees_marker` inside, between two barriers; a rank that does not see it has a
    different disk at ``path``."""
    marker = _marker_path(path, token)
    write_text_atomic(marker, token)
    try:
        yield marker
    finally:
        marker.unlink(missing_ok=True)


def sees_marker(path: str | os.PathLike, token: str) -> bool:
    """True if this process sees the marker :func:`shared_marker` wrote with ``token``."""
    try:
        return _marker_path(path, token).read_text(encoding="utf-8") == token
    except (OSError, UnicodeDecodeError):
        return False
