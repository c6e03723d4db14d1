"""Adversarial rows: runs under signals, launchers and full disks (see tests/test_adversarial.py).

A disk that fills up in the middle of a run: the write that fails is made to raise
``OSError(ENOSPC)`` (what a full disk gives) for this row's folder only, at a chosen write. The
one line names the file and "no space left on device" (exit 1: the run, not the command line,
failed), the last good checkpoint stays, and ``--resume`` finishes the run once there is room.
(The torchrun and signal cases are subprocess tests: tests/test_distributed.py and
tests/test_preemption.py.)
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import torch

import upop.api
import upop.engine.phases
import upop.engine.run
from upop.cli.main import main

from ._adversarial_common import Row, compress

ROWS: dict[str, Row] = {}

#: (module, name) of each function a row replaces, with the function it replaced
_ORIGINAL: dict[tuple[object, str], Callable] = {}


def _full_disk_at(module, name: str, call: int, path_arg: int):
    """Replace ``module.name`` (a writer whose argument ``path_arg`` is the path written) by one
    that raises ENOSPC at its ``call``-th write under this row's folder, as a full disk does (no
    file name: ``torch.save`` into a file object gives none); writes anywhere else, and the other
    calls, go through. Put back by :func:`_restore` (and harmless if a failed row leaves it: it
    only ever touches its own row's folder)."""
    original = _ORIGINAL.setdefault((module, name), getattr(module, name))

    def setup(w, t):
        calls = [0]

        def writer(*args, **kwargs):
            if Path(args[path_arg]).resolve().is_relative_to(t.resolve()):
                calls[0] += 1
                if calls[0] == call:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(*args, **kwargs)

        setattr(module, name, writer)
        return compress(w, t / "out", "--checkpoint-every", "2")

    return setup


def _restore() -> None:
    for (module, name), original in _ORIGINAL.items():
        setattr(module, name, original)


def _resumable(phase: str | None, step: int = 0):
    """After the row: the writers are back; the last good state (``phase`` at ``step``) is intact,
    no temp file or lock is left, and ``--resume`` finishes the run."""
    def after(w, t):
        _restore()
        out = t / "out"
        if phase is None:  # the first state write failed: there is none, the resume starts over
            assert not (out / "state" / "run.pt").exists()
        else:
            state = torch.load(out / "state" / "run.pt", weights_only=False)
            assert (state["phase"], state["step"]) == (phase, step)
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name] and not (out / ".upop-lock").exists()
        assert main(compress(w, out, "--checkpoint-every", "2", "--resume")) == 0
        assert (out / "report.json").is_file() and (out / "compressed" / "upop_plan.json").is_file()
    return after


# the tiny world's search has 4 steps: states at step 2, then after the pruning ("retrain", 0)
ROWS["full-disk-saving-the-run-state"] = Row(
    _full_disk_at(upop.engine.run, "torch_save_atomic", 2, 1), needle="no space left on device while writing", code=1,
    after=_resumable("search", 2))
ROWS["full-disk-saving-the-first-run-state"] = Row(
    _full_disk_at(upop.engine.run, "torch_save_atomic", 1, 1), needle=f"{os.sep}state{os.sep}run.pt'; the last good",
    code=1, after=_resumable(None))
# the retraining's best model (its first validation, after 4 steps): the state before it stays
ROWS["full-disk-saving-the-compressed-model"] = Row(
    _full_disk_at(upop.engine.phases, "save_compressed", 1, 1), needle="/compressed'; the last good checkpoint is kept in",
    code=1, after=_resumable("retrain", 2))
# a write the run does not name itself (the dense metrics, at the start): the CLI's own line; the
# fresh run is kept (not abandoned) and resumes
ROWS["full-disk-writing-the-dense-metrics"] = Row(
    _full_disk_at(upop.api, "write_json_atomic", 2, 0), needle="upop: error: no space left on device", code=1,
    after=_resumable(None))
