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
            ...                            # the run, writing with the *_atomic functions (upop.runs.atomic)
        except BaseException:
            rd.restore_previous()          # nothing of the previous run is lost
            raise
        rd.drop_previous()                 # the new run finished: the previous one may go

A rejected run in a folder it created calls :meth:`RunDir.discard_created` to remove the
(empty) folders it made, parents included.

Every writer (:mod:`upop.runs.atomic`, re-exported here) writes a temp sibling named ``.NAME.tmp-PID-RANDOM`` (a folder being replaced
is moved aside as ``.NAME.old-PID-RANDOM``), fsyncs it, renames it into place and fsyncs the
parent folder, and removes the temp on any exception (``KeyboardInterrupt`` included). Only a
kill (SIGKILL, power loss) leaves a temp behind; :meth:`RunDir.clean_temp` knows that one naming
scheme and removes exactly those names.

Every refusal is a :class:`~upop.errors.ConfigError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from upop.runs.atomic import (MARKER_PREFIX, TEMP_NAME, fsync_dir, open_temp, show_path, shared_marker, sees_marker,  # noqa: F401
                     torch_save_atomic, write_dir_atomic, write_file_atomic, write_json_atomic, write_text_atomic)
from upop.errors import ConfigError
from upop.runs.lock import LOCK_FILE, FolderLock

__all__ = ["KINDS", "check_out_dir", "LOCK_FILE", "MARKER_PREFIX", "OWN_FILES", "PREVIOUS_DIR", "RUN_FILES", "RunDir", "sees_marker",
           "shared_marker", "torch_save_atomic", "write_dir_atomic", "write_file_atomic", "write_json_atomic",
           "write_text_atomic"]


PREVIOUS_DIR = ".upop-previous"
OWN_FILES = frozenset({LOCK_FILE, PREVIOUS_DIR})
"""rundir's own bookkeeping names, part of every kind's file set."""

RUN_FILES = frozenset({"report.json", "report.md", "allocation.png", "log.jsonl", "run.json", "state",
                       "compressed", "dense.json", "tracking"}) | OWN_FILES
"""The names a upop run (``upop compress``) writes into its folder."""

KINDS = ("run", "model", "data")
_PROBE = "upop-write-test"  # target name of check_free's probe (written as a temp of this scheme)
_TEMP = TEMP_NAME
_PREVIOUS = re.compile(re.escape(PREVIOUS_DIR) + r"(-[0-9]+)?")
_SHOWN = 3  # entries named in a message


def _show_some(names: Iterable[str]) -> str:
    """The first few of ``names`` (sorted), shown, with how many more there are."""
    names = sorted(names)
    shown = ", ".join(show_path(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


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


class RunDir(FolderLock):
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
            raise ValueError(f"RunDir kind must be one of {', '.join(KINDS)}, not {show_path(kind)}")
        if files is None and kind != "run":
            raise ValueError(f"RunDir of kind {kind!r} needs the names it writes (files=...)")
        self.path = Path(path)
        self.kind = kind
        self.files = frozenset(RUN_FILES if files is None else files) - OWN_FILES
        self._created: list[Path] = []
        self._lock_fd: int | None = None
        self._lock_pid: int | None = None
        self._aside: Path | None = None
        #: the kind's names that were in the folder when this command took it (:meth:`note_existing`)
        self.existing: frozenset[str] = frozenset()

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
            raise ConfigError(f"output folder {show_path(self.path)} cannot be read ({exc.strerror or exc})") from None

    def _refuse_link_or_file(self) -> None:
        if self.path.is_symlink():
            raise ConfigError(f"output {show_path(self.path)} is a symbolic link; upop never writes through links, "
                              "give the real folder as --out")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output {show_path(self.path)} exists and is not a folder; choose another --out")

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
                raise ConfigError(f"output folder {show_path(self.path)} cannot be created "
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
            raise ConfigError(f"output folder {show_path(self.path)} already holds files ({_show_some(entries)}); {flags}")
        if not resume:
            foreign = [e for e in entries if not self._owns(e)]
            if foreign:
                raise ConfigError(f"output folder {show_path(self.path)} holds files upop did not write "
                                  f"({_show_some(foreign)}); refusing to overwrite, choose another --out")
        links = [e for e in entries if self._owns(e) and (self.path / e).is_symlink()]
        if links:
            raise ConfigError(f"output folder {show_path(self.path)} holds symbolic links ({_show_some(links)}); "
                              "upop never writes through links, remove them or choose another --out")
        if overwrite and not resume and self.kind == "run" and "run.json" not in entries:
            named = [e for e in entries if e in self.files]
            if named:  # a run writes run.json first: without it, these are not a run's files
                raise ConfigError(f"output folder {show_path(self.path)} holds {_show_some(named)} but no run.json, so no "
                                  "upop run wrote them; refusing to overwrite, choose another --out")

    def check_empty(self, why: str) -> None:
        """Refuse a folder that holds anything but rundir's own lock, markers and the temps of
        killed writes (``why`` says which rule asked, e.g. ``--restart-if-missing``)."""
        self._refuse_link_or_file()
        if not self.path.exists():
            return
        held = [e for e in self._entries() if e != LOCK_FILE and not e.startswith(MARKER_PREFIX)
                and not _is_temp_of(e, self.files | {_PROBE})]
        if held:
            raise ConfigError(f"output folder {show_path(self.path)} holds files but no run ({_show_some(held)}); {why}: "
                              "choose another --out, or --overwrite to replace what an earlier upop run wrote")

    def note_existing(self) -> None:
        """Remember which of the kind's names the folder holds now: what a rejected run may
        remove is only what it wrote itself."""
        self.existing = frozenset(e for e in self._entries() if e in self.files)

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
        notes = [f"output folder {show_path(self.path)} holds {_show_some(earlier)} from an earlier --overwrite that "
                 "never finished; kept until this run finishes"] if earlier else []
        moving = [e for e in self._entries() if e in self.files or _is_temp_of(e, self.files)]
        if not moving:
            return notes
        aside = self._new_previous_dir()
        for name in moving:
            os.rename(self.path / name, aside / name)
        fsync_dir(aside)
        fsync_dir(self.path)
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
            fsync_dir(self.path)
            return []
        return [f"output folder {show_path(self.path)}: the new run wrote {_show_some(kept)}; the previous "
                f"ones stay in {show_path(aside.name)}"]

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
            fd, probe = open_temp(self.path / _PROBE)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
            free = shutil.disk_usage(self.path).free
        except OSError as exc:
            raise ConfigError(f"output folder {show_path(self.path)} is not writable ({exc.strerror or exc})") from None
        if free < min_bytes:
            raise ConfigError(f"output folder {show_path(self.path)}: only {free / 2**20:.0f} MiB free on its disk, "
                              f"need about {min_bytes / 2**20:.0f} MiB")


# ----------------------------------------------------------------------------- where a run may write


def _real(path: str | os.PathLike) -> Path | None:
    """``path`` resolved (links followed, as far as they exist); None if it cannot be (a NUL in it)."""
    try:
        return Path(os.path.realpath(os.fspath(path)))
    except (ValueError, OSError):
        return None


def check_out_dir(out: str | os.PathLike | None, inputs: dict[str, str | os.PathLike | None],
                  flag: str = "--out") -> Path:
    """``out`` as a folder a command may write, checked against the command's inputs.

    Refused (one line): an empty ``out`` (it would mean the current folder), and an ``out`` that is
    one of ``inputs`` (name -> a local file or folder, e.g. ``{"model": ..., "data": ...}``; ids
    and missing paths are skipped) or lies inside one: the run's files would land among the
    model's or the data's (an ``allocation.png`` as an eleventh class, a report beside the weights)
    and change what the next command reads.
    """
    if out is None or not os.fspath(out).strip():
        raise ConfigError(f"{flag} {show_path(os.fspath(out) if out is not None else '')} is empty (it would mean the "
                          f"current folder); name the folder to write, e.g. {flag} upop-out")
    target = _real(out)
    for name, given in inputs.items():
        if given is None or not os.fspath(given) or not os.path.exists(os.fspath(given)):
            continue
        source = _real(given)
        if target is None or source is None:
            continue
        if target == source or source in target.parents:
            where = "is" if target == source else "is inside"
            raise ConfigError(f"{flag} {show_path(out)} {where} the {name} {show_path(given)}; upop never writes into its "
                              f"inputs (the {name} would change under the next command): choose an {flag} outside it")
    return Path(out)
