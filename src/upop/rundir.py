"""The one owner of a run folder: lock, overwrite policy, set-aside, atomic writes, temp clean-up.

A upop command that writes a folder (``compress --out``, ``make-model --out``, ``data shapes
--out``) goes through a :class:`RunDir`, in this order::

    rd = RunDir(out)                       # kind "run"; "model"/"data" pass their own file names
    rd.create()                            # remembers the parents it made
    with rd.lock():                        # one upop process per folder (a second gets ConfigError)
        rd.check_overwrite(resume, overwrite)
        rd.clean_temp()                    # leftovers of writes a kill interrupted
        notes = rd.set_aside_previous() if overwrite else []   # previous run -> .upop-previous/
        try:
            ...                            # the run, writing with the *_atomic functions below
        except BaseException:
            rd.restore_previous()          # nothing of the previous run is lost
            raise
        rd.drop_previous()                 # the new run finished: the previous one may go

A rejected run in a folder it created calls :meth:`RunDir.discard_created` to remove the
(empty) folders it made, parents included.

Every writer here writes a temp sibling named ``.NAME.tmp-PID-RANDOM`` (a folder being replaced
is moved aside as ``.NAME.old-PID-RANDOM``), fsyncs it, renames it into place and fsyncs the
parent folder, and removes the temp on any exception (``KeyboardInterrupt`` included). Only a
kill (SIGKILL, power loss) leaves a temp behind; :meth:`RunDir.clean_temp` knows that one naming
scheme and removes exactly those names.

Every refusal is a :class:`~upop.errors.ConfigError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: the lock file is written but nothing excludes a second run
    fcntl = None

LOCK_FILE = ".upop-lock"
PREVIOUS_DIR = ".upop-previous"
MARKER_PREFIX = ".upop-node-check-"
OWN_FILES = frozenset({LOCK_FILE, PREVIOUS_DIR})
"""rundir's own bookkeeping names, part of every kind's file set."""

RUN_FILES = frozenset({"report.json", "report.md", "allocation.png", "log.jsonl", "run.json", "state",
                       "compressed", "dense.json"}) | OWN_FILES
"""The names a upop run (``upop compress``) writes into its folder."""

KINDS = ("run", "model", "data")
_PROBE = "upop-write-test"  # target name of check_free's probe (written as a temp of this scheme)
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{8})")
_PREVIOUS = re.compile(re.escape(PREVIOUS_DIR) + r"(-[0-9]+)?")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHOWN = 3  # entries named in a message


def _show(value: object) -> str:
    """A user value (path, file name) for a one-line message: quoted and escaped like ``repr``,
    so newlines, control characters and NUL never appear raw."""
    return repr(os.fspath(value) if isinstance(value, os.PathLike) else str(value))


def _show_some(names: Iterable[str]) -> str:
    """The first few of ``names`` (sorted), shown, with how many more there are."""
    names = sorted(names)
    shown = ", ".join(_show(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


# ----------------------------------------------------------------------------- atomic writers


def _temp_path(target: Path, tag: str) -> Path:
    """A fresh temp name next to ``target`` in the one scheme :meth:`RunDir.clean_temp` knows."""
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _open_temp(target: Path) -> tuple[int, Path]:
    """Create (exclusively) and open a temp file for ``target``; returns (fd, path)."""
    while True:
        tmp = _temp_path(target, "tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:  # 32 random bits collided: draw again
            continue


def _fsync_dir(folder: Path) -> None:
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


def _fsync_tree(root: Path) -> None:
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
        _fsync_dir(Path(folder))


def write_file_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a file atomically: ``write(fh)`` fills a binary temp file next to ``path``, which is
    fsynced and renamed over ``path``; on any exception the temp is removed and ``path`` is as
    before. The base of the writers below, public for callers that write to a file object
    (``savefig(fh, format="png")``)."""
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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
        raise ConfigError(f"{_show(out)} is a symbolic link; upop never writes through links, "
                          "remove it or choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{_show(out)} exists and is not a folder; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(out)
    try:
        fill(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return out


def _make_temp_dir(target: Path) -> Path:
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
        raise ValueError(f"marker token must be 1-64 letters, digits, '_' or '-', not {_show(token)}")
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


# ----------------------------------------------------------------------------- the folder


def _is_temp_of(name: str, targets: frozenset[str]) -> bool:
    match = _TEMP.fullmatch(name)
    return bool(match) and match["name"] in targets


def _remove(path: Path) -> None:
    """Delete a file, link or folder (never following a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class RunDir:
    """The folder ``path`` that one upop command of ``kind`` writes ("run", "model" or "data").

    ``files`` are the top-level names that kind writes (default, for "run": :data:`RUN_FILES`;
    "model" and "data" must pass theirs). rundir's own names (``.upop-lock``,
    ``.upop-previous``, ``.upop-node-check-*``) and temps of the scheme for the kind's names
    belong to every kind. Anything else in the folder is the user's and is never touched.

    The lock: :meth:`lock` (or :meth:`acquire` / :meth:`release`) takes an exclusive,
    non-blocking ``fcntl.flock`` on ``path/.upop-lock`` and writes the holder's pid, host and
    start time into it. The OS frees a flock when its process dies (even by SIGKILL), so a stale
    lock file never blocks anyone. A released lock removes its file. On NFS, flock works across
    machines only where the mount has locking (NFSv4, or NFSv3 with ``lockd``); a ``nolock``
    mount locks per machine only. Processes forked while the lock is held share it until they
    exit. :meth:`clean_temp`, :meth:`set_aside_previous`, :meth:`restore_previous` and
    :meth:`drop_previous` need the lock.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "run", files: Iterable[str] | None = None):
        if kind not in KINDS:
            raise ValueError(f"RunDir kind must be one of {', '.join(KINDS)}, not {_show(kind)}")
        if files is None and kind != "run":
            raise ValueError(f"RunDir of kind {kind!r} needs the names it writes (files=...)")
        self.path = Path(path)
        self.kind = kind
        self.files = frozenset(RUN_FILES if files is None else files) - OWN_FILES
        self._created: list[Path] = []
        self._lock_fd: int | None = None
        self._lock_pid: int | None = None
        self._aside: Path | None = None

    def __repr__(self) -> str:
        return f"RunDir({os.fspath(self.path)!r}, kind={self.kind!r})"

    # names -----------------------------------------------------------------------------------
    def _owns(self, name: str) -> bool:
        """True if ``name`` (a top-level entry) is one this kind or rundir itself writes."""
        return (name in self.files or name == LOCK_FILE or name.startswith(MARKER_PREFIX)
                or bool(_PREVIOUS.fullmatch(name)) or _is_temp_of(name, self.files | {_PROBE}))

    def _entries(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path))
        except OSError as exc:
            raise ConfigError(f"output folder {_show(self.path)} cannot be read ({exc.strerror or exc})") from None

    def _refuse_link_or_file(self) -> None:
        if self.path.is_symlink():
            raise ConfigError(f"output {_show(self.path)} is a symbolic link; upop never writes through links, "
                              "give the real folder as --out")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output {_show(self.path)} exists and is not a folder; choose another --out")

    # create / discard ------------------------------------------------------------------------
    def create(self) -> None:
        """Make the folder and any missing parents, remembering which ones this call made."""
        self._refuse_link_or_file()
        missing = []
        folder = self.path
        while not os.path.lexists(folder) and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
                self._created.append(folder)
            except FileExistsError:  # made by someone else meanwhile: not ours to remove
                pass
            except OSError as exc:
                raise ConfigError(f"output folder {_show(self.path)} cannot be created "
                                  f"({exc.strerror or exc})") from None
        self._refuse_link_or_file()

    def discard_created(self) -> list[Path]:
        """Remove the folders :meth:`create` made, deepest first, as long as they are empty (for a
        rejected run); releases the lock first (its file would keep the folder non-empty).
        Returns the removed folders."""
        self.release()
        removed = []
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): it and its parents stay
                break
            removed.append(folder)
        self._created = []
        return removed

    # lock ------------------------------------------------------------------------------------
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
                raise ConfigError(f"output folder {_show(self.path)} is in use by another upop run ({holder}); "
                                  "wait for it to finish or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                raise ConfigError(f"output folder {_show(self.path)} cannot be locked ({exc.strerror or exc}); "
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
            raise ConfigError(f"output folder {_show(self.path)}: cannot open its lock file {LOCK_FILE} "
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
    def lock(self) -> Iterator[RunDir]:
        """``with rd.lock():`` holds the lock for the body (see :meth:`acquire`)."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def _require_lock(self, what: str) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"RunDir.{what}() needs the folder's lock: call it inside rd.lock()")

    # overwrite policy ------------------------------------------------------------------------
    def check_overwrite(self, resume: bool, overwrite: bool) -> None:
        """Refuse to write where a previous run (or the user's files) would be harmed.

        A missing or empty folder (rundir's own lock and markers aside) is fine. A non-empty one
        needs ``resume`` (continue that run) or ``overwrite``. With overwrite, every entry must be
        one this kind writes: anything else, hidden or not (``.git``, ``.env``), refuses. Entries
        of the kind's names that are symbolic links refuse in both modes (never followed), as does
        a ``path`` that is a file or a link. Reads only; changes nothing.
        """
        self._refuse_link_or_file()
        if not self.path.exists():
            return
        entries = [e for e in self._entries() if e != LOCK_FILE and not e.startswith(MARKER_PREFIX)]
        if not entries:
            return
        if not (resume or overwrite):
            flags = "pass --resume to continue that run or --overwrite to replace it" if self.kind == "run" \
                else "pass --overwrite to replace it"
            raise ConfigError(f"output folder {_show(self.path)} already holds files ({_show_some(entries)}); {flags}")
        if not resume:
            foreign = [e for e in entries if not self._owns(e)]
            if foreign:
                raise ConfigError(f"output folder {_show(self.path)} holds files upop did not write "
                                  f"({_show_some(foreign)}); refusing to overwrite, choose another --out")
        links = [e for e in entries if self._owns(e) and (self.path / e).is_symlink()]
        if links:
            raise ConfigError(f"output folder {_show(self.path)} holds symbolic links ({_show_some(links)}); "
                              "upop never writes through links, remove them or choose another --out")

    # set aside / restore / drop --------------------------------------------------------------
    def _previous_dirs(self) -> list[str]:
        return [e for e in self._entries() if _PREVIOUS.fullmatch(e)]

    def set_aside_previous(self) -> list[str]:
        """Move the previous run's entries (the kind's names and their temps) into
        ``.upop-previous/`` with one rename each: nothing is deleted, so a rejected new run can
        :meth:`restore_previous`. A ``.upop-previous`` left by an earlier overwrite that never
        finished is kept as it is (never merged into): this run's entries go to
        ``.upop-previous-N`` instead. Returns one-line notes for the user (possibly none)."""
        self._require_lock("set_aside_previous")
        earlier = self._previous_dirs()
        notes = [f"output folder {_show(self.path)} holds {_show_some(earlier)} from an earlier --overwrite that "
                 "never finished; kept until this run finishes"] if earlier else []
        moving = [e for e in self._entries() if e in self.files or _is_temp_of(e, self.files)]
        if not moving:
            return notes
        aside = self._new_previous_dir()
        for name in moving:
            os.rename(self.path / name, aside / name)
        _fsync_dir(aside)
        _fsync_dir(self.path)
        self._aside = aside
        return notes

    def _new_previous_dir(self) -> Path:
        number = 1
        while True:
            aside = self.path / (PREVIOUS_DIR if number == 1 else f"{PREVIOUS_DIR}-{number}")
            try:
                aside.mkdir()
                return aside
            except FileExistsError:
                number += 1

    def restore_previous(self) -> list[str]:
        """Move the entries :meth:`set_aside_previous` moved back into place (for a new run
        rejected before it wrote anything). An entry whose name the new run has written since
        stays set aside, named in a returned note."""
        self._require_lock("restore_previous")
        if self._aside is None:
            return []
        aside, self._aside = self._aside, None
        kept = []
        for name in sorted(os.listdir(aside)):
            if os.path.lexists(self.path / name):
                kept.append(name)
            else:
                os.rename(aside / name, self.path / name)
        if not kept:
            aside.rmdir()
            _fsync_dir(self.path)
            return []
        return [f"output folder {_show(self.path)}: the new run wrote {_show_some(kept)}; the previous "
                f"ones stay in {_show(aside.name)}"]

    def drop_previous(self) -> list[Path]:
        """Delete every set-aside previous run (``.upop-previous`` and ``.upop-previous-N``): the
        new run finished. Returns what it deleted."""
        self._require_lock("drop_previous")
        removed = [self.path / name for name in self._previous_dirs()]
        for path in removed:
            _remove(path)
        self._aside = None
        return removed

    # temp clean-up ---------------------------------------------------------------------------
    def clean_temp(self) -> list[Path]:
        """Remove what interrupted writes of this module left in the folder and its ``state/``:
        ``.NAME.tmp-PID-RANDOM`` / ``.NAME.old-PID-RANDOM`` (at the top only for the kind's
        names) and stale ``.upop-node-check-*`` markers. A folder replacement killed between its
        two renames (``NAME`` missing, its ``.old`` and ``.tmp`` of one PID present) is undone:
        the ``.old`` is renamed back to ``NAME``. Needs the lock. Returns the removed paths."""
        self._require_lock("clean_temp")
        removed = [self.path / e for e in self._entries() if e.startswith(MARKER_PREFIX)]
        removed += self._clean_folder(self.path, self.files | {_PROBE})
        state = self.path / "state"
        if "state" in self.files and state.is_dir() and not state.is_symlink():
            removed += self._clean_folder(state, None)
        for path in removed:
            with contextlib.suppress(FileNotFoundError):
                _remove(path)
        return removed

    @staticmethod
    def _clean_folder(folder: Path, targets: frozenset[str] | None) -> list[Path]:
        """The temps to remove in ``folder`` (of ``targets`` only, unless None), after putting
        back any ``.old`` whose replacement was interrupted."""
        temps = [(name, m) for name in sorted(os.listdir(folder))
                 if (m := _TEMP.fullmatch(name)) and (targets is None or m["name"] in targets)]
        pending = {(m["name"], m["pid"]) for _, m in temps if m["tag"] == "tmp"}
        doomed = []
        for name, m in temps:
            target = folder / m["name"]
            if m["tag"] == "old" and (m["name"], m["pid"]) in pending and not os.path.lexists(target):
                os.rename(folder / name, target)
            else:
                doomed.append(folder / name)
        return doomed

    # space -----------------------------------------------------------------------------------
    def check_free(self, min_bytes: int) -> None:
        """Fail before any work if the folder cannot be written or its disk has less than
        ``min_bytes`` free (creates the folder if needed)."""
        self.create()
        try:
            fd, probe = _open_temp(self.path / _PROBE)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
            free = shutil.disk_usage(self.path).free
        except OSError as exc:
            raise ConfigError(f"output folder {_show(self.path)} is not writable ({exc.strerror or exc})") from None
        if free < min_bytes:
            raise ConfigError(f"output folder {_show(self.path)}: only {free / 2**20:.0f} MiB free on its disk, "
                              f"need about {min_bytes / 2**20:.0f} MiB")


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
