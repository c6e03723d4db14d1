"""What the adversarial rows share: the row type, the tiny world, digests and the one-line check."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

import upop

from ._families import clip_world

#: a compress run as short as it gets on the tiny world
TINY = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "8", "--no-progress", "--latency-time", "0.02"]


@dataclass(frozen=True)
class Row:
    """One adversarial case.

    ``setup(world, tmp)`` prepares the case's folders under ``tmp`` (the test's own folder, also
    the working directory) and returns the CLI argv, or a no-argument callable for an API case.
    ``code``: the exit code the CLI must give; ``needle``: text its one line must contain (or the
    API error's message); ``error``: the API error type. ``watch``: folders under ``tmp`` that
    must be unchanged (the world always is). ``after(world, tmp)``: extra assertions.
    """

    setup: Callable[[Path, Path], Any]
    needle: str = ""
    code: int = 2
    watch: tuple[str, ...] = ()
    error: type = upop.UPopError
    after: Callable[[Path, Path], None] | None = field(default=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Shapes retrieval data set (``data``), a tiny CLIP (``model``) and a compressed copy
    of it made by a real (short) run (``run/compressed``)."""
    from upop.cli.main import main

    root = clip_world(tmp_path_factory.mktemp("adversarial"), 32, 8, 8)
    assert main(["compress", "--model", str(root / "model"), "--task", "retrieval", "--data", str(root / "data"),
                 "--out", str(root / "run"), *TINY]) == 0
    return root


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def compress(w: Path, out, *extra, model=None, data=None) -> list[str]:
    return ["compress", "--model", str(model or w / "model"), "--task", "retrieval", "--data", str(data or w / "data"),
            "--out", str(out), *TINY, *extra]


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in text, text
    return lines[0]


def tree_sum(root: Path) -> str | None:
    """sha256 over relative paths, file bytes and link targets under ``root`` (links never
    followed; FIFOs and other special files by name only); None if ``root`` does not exist."""
    if not os.path.lexists(root):
        return None
    digest = hashlib.sha256()
    if root.is_symlink() or not root.is_dir():
        digest.update(os.readlink(root).encode() if root.is_symlink() else
                      root.read_bytes() if root.is_file() else b"special")
        return digest.hexdigest()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder) / name
            digest.update(os.fsencode(path.relative_to(root)) + b"\0")
            if path.is_symlink():
                digest.update(b"link:" + os.fsencode(os.readlink(path)))
            elif path.is_file():
                digest.update(b"file:" + path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def sums(*roots: Path) -> dict[str, str | None]:
    return {str(root): tree_sum(root) for root in roots}
