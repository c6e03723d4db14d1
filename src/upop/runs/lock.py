"""The exclusive lock of a upop folder (``.upop-lock``), a mixin of :class:`upop.runs.rundir.RunDir`.

An exclusive, non-blocking ``fcntl.flock`` on ``path/.upop-lock``, holding the holder's pid, host
and start time. The OS frees a flock when its process dies (even by SIGKILL), so a stale lock
file never blocks anyone; a released lock removes its file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from upop.runs.atomic import show_path
from upop.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: the lock file is written but nothing excludes a second run
    fcntl = None

LOCK_FILE = ".upop-lock"


class FolderLock:
    """The lock of the folder ``self.path`` (the class using it sets ``path``, ``_lock_fd = None``
    and ``_lock_pid = None``, and provides ``create()``, which makes the folder)."""

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Take the folder's lock (creating the folder if needed); ConfigError if another upop
        process holds it. Does nothing if this object holds it already."""
        if self._lock_fd is not None:
            return
        self.create()
        lock_path = self.path / LOCK_FILE
        while True:
            fd = self._open_lock(lock_path)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._same_file(fd, lock_path):
                    break
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(f"output folder {show_path(self.path)} is in use by another upop run ({holder}); "
                                  "wait for it to finish or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                raise ConfigError(f"output folder {show_path(self.path)} cannot be locked ({exc.strerror or exc}); "
                                  "its file system needs locking (on NFS: lockd, or NFSv4)") from None
            os.close(fd)  # the holder we waited on removed that file on release: lock the new one
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        os.fsync(fd)
        self._lock_fd, self._lock_pid = fd, os.getpid()

    def _open_lock(self, lock_path: Path) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(lock_path, flags, 0o644)
        except OSError as exc:
            raise ConfigError(f"output folder {show_path(self.path)}: cannot open its lock file {LOCK_FILE} "
                              f"({exc.strerror or exc}); remove it if it is a link or a folder") from None

    @staticmethod
    def _same_file(fd: int, lock_path: Path) -> bool:
        """True if ``fd`` is still the file at ``lock_path`` (a releasing holder unlinks it)."""
        try:
            here, there = os.fstat(fd), os.lstat(lock_path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        """Give the lock back and remove the lock file. In a process forked from the holder this
        only closes the inherited descriptor (the holder keeps the lock)."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            if self._lock_pid == os.getpid():
                (self.path / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: see _same_file
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self) -> Iterator["FolderLock"]:
        """``with rd.lock():`` holds the lock for the body (see :meth:`acquire`)."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def _require_lock(self, what: str) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"RunDir.{what}() needs the folder's lock: call it inside rd.lock()")



def _read_holder(fd: int) -> str:
    """'pid N on HOST, since TIME' from a held lock file (its fields checked, never shown raw).
    A holder that has just locked may not have written them yet: wait for them up to 0.5 s."""
    info: Any = {}
    for _ in range(10):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 4096).decode("utf-8"))
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info:
            break
        time.sleep(0.05)
    if not isinstance(info, dict):
        info = {}
    pid = info.get("pid")
    pid = str(pid) if isinstance(pid, int) else "?"
    host = info.get("host")
    host = host if isinstance(host, str) and re.fullmatch(r"[\w.-]{1,253}", host) else "?"
    since = info.get("since")
    since = since if isinstance(since, str) and re.fullmatch(r"[0-9T:+.-]{1,40}", since) else "?"
    return f"pid {pid} on {host}, since {since}"
