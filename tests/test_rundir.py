"""upop.runs.rundir: the run folder's lock, overwrite policy, set-aside, temp clean-up and atomic writers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upop.runs import rundir
from upop.errors import ConfigError
from upop.runs.rundir import (
    LOCK_FILE,
    RUN_FILES,
    RunDir,
    sees_marker,
    shared_marker,
    torch_save_atomic,
    write_dir_atomic,
    write_file_atomic,
    write_json_atomic,
    write_text_atomic,
)

TEMP_NAME = re.compile(r"\..+\.(tmp|old)-[0-9]+-[0-9a-f]{8}")


def make(root: Path, spec: dict) -> None:
    """Build entries under ``root``: name -> text (a file), None (a folder, name ends in '/'),
    or ("link", target) (a symbolic link)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in spec.items():
        path = root / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.mkdir(exist_ok=True)
        elif isinstance(value, tuple):
            path.symlink_to(value[1])
        else:
            path.write_bytes(value.encode() if isinstance(value, str) else value)


def tree(root: Path, skip: tuple[str, ...] = (LOCK_FILE,)) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too, links never followed) -> a checksum of its bytes,
    'dir', or 'link:TARGET'."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if rel in skip:
                continue
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


RUN_SPEC = {
    "run.json": "{}\n",
    "report.md": "# report\n",
    "report.json": '{"a": 1}\n',
    "log.jsonl": '{"step": 1}\n',
    "dense.json": "{}\n",
    "state/run.pt": b"\x00\x01state",
    "state/dense-model/config.json": "{}",
    "compressed/model.upop.safetensors": b"\x00weights",
    ".dense.json.tmp-9-0123abcd": "half",
}


# ----------------------------------------------------------------------------- lock

# The child imports upop.runs.rundir without the package __init__ (which imports transformers), so it
# holds the lock within a second.
HOLDER = """
import sys, time, types
pkg = types.ModuleType("upop")
pkg.__path__ = [sys.argv[1]]
sys.modules["upop"] = pkg
from upop.runs.rundir import RunDir
RunDir(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_held_by_another_process_then_freed_when_it_is_killed(tmp_path):
    out = tmp_path / "run"
    src = str(Path(rundir.__file__).parent.parent)  # the upop package folder
    child = subprocess.Popen([sys.executable, "-c", HOLDER, src, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as err:
            RunDir(out).acquire()
        message = str(err.value)
        assert f"is in use by another upop run (pid {child.pid} on {socket.gethostname()}, since " in message
        assert message.endswith("wait for it to finish or choose another --out")
        assert "\n" not in message
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert (out / LOCK_FILE).exists()  # a killed holder leaves its file, but not its lock
    rd = RunDir(out)
    with rd.lock():
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("hold", ["context manager", "acquire/release"])
def test_second_holder_in_this_process_is_refused_until_release(tmp_path, hold):
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    if hold == "context manager":
        with first.lock():
            with pytest.raises(ConfigError, match=rf"\(pid {os.getpid()} on "):
                second.acquire()
    else:
        first.acquire()
        with pytest.raises(ConfigError, match=rf"\(pid {os.getpid()} on "):
            second.acquire()
        first.release()
    assert not first.locked and not (tmp_path / "run" / LOCK_FILE).exists()
    with second.lock():
        assert second.locked


@pytest.mark.parametrize("content, shown", [
    ('{"pid": 5, "host": "node7", "since": "2025-01-02T03:04:05+00:00"}',
     "pid 5 on node7, since 2025-01-02T03:04:05+00:00"),
    ('{"pid": "5\\n", "host": "evil\\nhost", "since": "x\\u0000"}', "pid ? on ?, since ?"),
    ("not json\n\x00", "pid ? on ?, since ?"),
])
def test_lock_message_shows_only_checked_holder_fields(tmp_path, content, shown):
    rd = RunDir(tmp_path / "run")
    with rd.lock():
        (tmp_path / "run" / LOCK_FILE).write_text(content)  # same file: the holder rewrote it
        with pytest.raises(ConfigError) as err:
            RunDir(tmp_path / "run").acquire()
    assert f"({shown})" in str(err.value) and "\n" not in str(err.value)


def test_lock_file_that_is_a_link_is_refused_not_followed(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    make(tmp_path / "run", {LOCK_FILE: ("link", target)})
    with pytest.raises(ConfigError, match="cannot open its lock file"):
        RunDir(tmp_path / "run").acquire()
    assert target.read_text() == "keep"


# ----------------------------------------------------------------------------- overwrite policy

OVERWRITE_CASES = [
    # id, folder content (None: missing), kind files (None: a run), resume, overwrite, error (regex) or None
    ("missing", None, None, False, False, None),
    ("empty", {}, None, False, False, None),
    ("only rundir's own", {LOCK_FILE: "", ".upop-node-check-ab": "ab"}, None, False, False, None),
    ("run, no flag", {"report.md": "r"}, None, False, False,
     r"already holds files \('report\.md'\); pass --resume to continue that run or --overwrite to replace it$"),
    ("run, resume", {"report.md": "r", "notes.txt": "mine"}, None, True, False, None),
    ("run, overwrite", {**RUN_SPEC, ".upop-previous/": None, ".upop-node-check-x": "x"}, None, False, True, None),
    ("hidden user files", {"report.md": "r", ".git/HEAD": "ref", ".env": "SECRET=1"}, None, False, True,
     r"holds files upop did not write \('\.env', '\.git'\); refusing to overwrite, choose another --out$"),
    ("user file", {"report.md": "r", "notes.txt": "mine"}, None, False, True, r"did not write \('notes\.txt'\)"),
    ("run names but no run.json", {"report.md": "mine", "log.jsonl": "x", "compressed/thesis.tex": "t"}, None, False,
     True, r"holds 'compressed', 'log\.jsonl', 'report\.md' but no run\.json, so no upop run wrote them"),
    ("temp look-alike", {".notes.txt.tmp-1-0123abcd": "x"}, None, False, True, r"did not write"),
    ("many user files", {n: n for n in "abcde"}, None, False, True, r"\('a', 'b', 'c' and 2 more\)"),
    ("newline in a name", {"bad\nname": "x"}, None, False, True, r"\('bad\\nname'\)"),
    ("linked entry, overwrite", {"compressed": ("link", "ELSEWHERE")}, None, False, True,
     r"holds symbolic links \('compressed'\); upop never writes through links"),
    ("linked entry, resume", {"state": ("link", "ELSEWHERE")}, None, True, False, r"holds symbolic links \('state'\)"),
    ("model, no flag", {"config.json": "{}"}, {"config.json"}, False, False,
     r"\('config\.json'\); pass --overwrite to replace it$"),
    ("model, overwrite", {"config.json": "{}", "model.safetensors": "w"}, {"config.json", "model.safetensors"},
     False, True, None),
    ("model, overwrite a run", {"config.json": "{}", "report.md": "r"}, {"config.json"}, False, True,
     r"did not write \('report\.md'\)"),
]


@pytest.mark.parametrize("content, files, resume, overwrite, error", [c[1:] for c in OVERWRITE_CASES],
                         ids=[c[0] for c in OVERWRITE_CASES])
def test_check_overwrite(tmp_path, content, files, resume, overwrite, error):
    elsewhere = tmp_path / "elsewhere"
    make(elsewhere, {"precious.bin": b"\x00keep"})
    out = tmp_path / "out"
    if content is not None:
        make(out, {k: ("link", elsewhere) if v == ("link", "ELSEWHERE") else v for k, v in content.items()})
    before, before_elsewhere = tree(tmp_path, skip=()), tree(elsewhere)
    rd = RunDir(out) if files is None else RunDir(out, kind="model", files=files)
    if error is None:
        rd.check_overwrite(resume=resume, overwrite=overwrite)
    else:
        with pytest.raises(ConfigError, match=error) as err:
            rd.check_overwrite(resume=resume, overwrite=overwrite)
        assert "\n" not in str(err.value)
    assert tree(tmp_path, skip=()) == before and tree(elsewhere) == before_elsewhere  # reads only


@pytest.mark.parametrize("what, error", [
    ("file", r"exists and is not a folder"),
    ("link to a folder", r"is a symbolic link; upop never writes through links"),
    ("dangling link", r"is a symbolic link"),
])
@pytest.mark.parametrize("call", ["check_overwrite", "create"])
def test_output_path_that_is_a_file_or_link_is_refused(tmp_path, what, error, call):
    elsewhere = tmp_path / "elsewhere"
    make(elsewhere, {"report.md": "theirs"})
    out = tmp_path / "out"
    if what == "file":
        out.write_text("a file")
    else:
        out.symlink_to(elsewhere if what == "link to a folder" else tmp_path / "nowhere")
    before = tree(tmp_path, skip=())
    rd = RunDir(out)
    with pytest.raises(ConfigError, match=error):
        rd.check_overwrite(resume=False, overwrite=True) if call == "check_overwrite" else rd.create()
    assert tree(tmp_path, skip=()) == before


@pytest.mark.parametrize("kind, files", [("bogus", None), ("model", None), ("data", None)])
def test_kind_must_be_known_and_name_its_files(kind, files):
    with pytest.raises(ValueError):
        RunDir("x", kind=kind, files=files)


# ----------------------------------------------------------------------------- set aside / restore / drop


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "earlier set-aside kept"])
def test_set_aside_restore_drop_keep_every_byte(tmp_path, earlier):
    out = tmp_path / "run"
    make(out, RUN_SPEC)
    if earlier:
        make(out, {".upop-previous/report.md": "the run before"})
    before = tree(out)
    aside = ".upop-previous-2" if earlier else ".upop-previous"
    rd = RunDir(out)
    with rd.lock():
        rd.check_overwrite(resume=False, overwrite=True)
        notes = rd.set_aside_previous()
        assert sorted(os.listdir(out)) == sorted({LOCK_FILE, ".upop-previous", aside})
        assert tree(out / aside) == {k: v for k, v in before.items() if not k.startswith(".upop-previous")}
        assert len(notes) == earlier and all("'.upop-previous'" in n and "\n" not in n for n in notes)
        assert rd.restore_previous() == []
        assert tree(out) == before
        rd.set_aside_previous()
        (out / "report.md").write_text("the new run")
        assert sorted(p.name for p in rd.drop_previous()) == sorted({".upop-previous", aside})
    assert os.listdir(out) == ["report.md"]


def test_restore_keeps_aside_what_the_new_run_wrote(tmp_path):
    out = tmp_path / "run"
    make(out, {"report.md": "old report", "dense.json": "old dense"})
    rd = RunDir(out)
    with rd.lock():
        rd.set_aside_previous()
        (out / "report.md").write_text("new report")
        notes = rd.restore_previous()
    assert (out / "dense.json").read_text() == "old dense" and (out / "report.md").read_text() == "new report"
    assert (out / ".upop-previous" / "report.md").read_text() == "old report"
    assert len(notes) == 1 and "'report.md'" in notes[0]


@pytest.mark.parametrize("method", ["clean_temp", "set_aside_previous", "restore_previous", "drop_previous"])
def test_folder_changes_need_the_lock(tmp_path, method):
    make(tmp_path / "run", RUN_SPEC)
    before = tree(tmp_path / "run")
    with pytest.raises(RuntimeError, match="needs the folder's lock"):
        getattr(RunDir(tmp_path / "run"), method)()
    assert tree(tmp_path / "run") == before


# ----------------------------------------------------------------------------- temp clean-up

CLEAN_CASES = [
    # entry (a trailing / makes a folder), removed by clean_temp
    (".report.json.tmp-123-0123abcd", True),
    (".compressed.tmp-9-deadbeef/", True),
    (".compressed.old-9-0badf00d/", True),
    (".upop-write-test.tmp-5-11111111", True),
    (".upop-node-check-abc", True),
    ("state/.run.pt.tmp-77-89abcdef", True),
    ("state/.dense-model.old-1-00000000/", True),
    (".notes.txt.tmp-1-0123abcd", False),            # not a name upop writes
    (".report.json.tmp-123", False),                 # no random part
    ("report.json.tmp-1-0123abcd", False),           # no leading dot
    (".report.json.tmp-x1-0123abcd", False),         # pid not a number
    (".report.json.tmp-1-0123ABCD", False),          # random part not lowercase hex
    (".report.json.tmp-1-0123abcd0", False),         # random part too long
    (".report.json.bak-1-0123abcd", False),          # neither tmp nor old
    ("compressed/.model.upop.safetensors.tmp-1-0123abcd", False),  # only the top and state/ are cleaned
    ("notes.txt", False),
]


@pytest.mark.parametrize("entry, removed", CLEAN_CASES, ids=[c[0] for c in CLEAN_CASES])
def test_clean_temp_removes_only_the_scheme(tmp_path, entry, removed):
    out = tmp_path / "run"
    make(out, {**RUN_SPEC, entry: None if entry.endswith("/") else "leftover"})
    before = tree(out)
    rd = RunDir(out)
    with rd.lock():
        got = rd.clean_temp()
    name = entry.rstrip("/")
    expected = {name, ".dense.json.tmp-9-0123abcd"} if removed else {".dense.json.tmp-9-0123abcd"}
    assert {str(p.relative_to(out)) for p in got} == expected
    assert tree(out) == {k: v for k, v in before.items() if k not in expected and not k.startswith(name + "/")}


@pytest.mark.parametrize("target, temps, expected", [
    # an interrupted swap (target gone, .old and .tmp of one pid) is undone
    ("compressed", {".compressed.old-4-aaaaaaaa/f": "old", ".compressed.tmp-4-bbbbbbbb/f": "new"}, "old"),
    ("state/dense-model", {"state/.dense-model.old-4-aaaaaaaa/f": "old", "state/.dense-model.tmp-4-bbbbbbbb/f": "new"},
     "old"),
    # an .old without its .tmp is a leftover: the target was deleted on purpose and stays so
    ("compressed", {".compressed.old-4-aaaaaaaa/f": "old", ".compressed.tmp-5-bbbbbbbb/f": "new"}, None),
    # the target is there: both are leftovers
    ("compressed", {"compressed/f": "current", ".compressed.old-4-aaaaaaaa/f": "old",
                    ".compressed.tmp-4-bbbbbbbb/f": "new"}, "current"),
])
def test_clean_temp_undoes_an_interrupted_folder_swap(tmp_path, target, temps, expected):
    out = tmp_path / "run"
    make(out, {"report.md": "r", "state/run.pt": "s", **temps})
    rd = RunDir(out)
    with rd.lock():
        rd.clean_temp()
    if expected is None:
        assert not (out / target).exists()
    else:
        assert (out / target / "f").read_text() == expected
    assert not [p for p in out.rglob("*") if TEMP_NAME.fullmatch(p.name)]


# ----------------------------------------------------------------------------- atomic writers


class _Boom:
    """Pickling it raises, half-way through torch.save."""

    def __reduce__(self):
        raise KeyboardInterrupt


def _fill_then_raise(tmp: Path) -> None:
    (tmp / "f").write_text("half")
    raise KeyboardInterrupt


# writer -> (a good write, a write whose payload fails half-way, that failure's type)
WRITERS = {
    "file": (lambda p: write_file_atomic(p, lambda fh: fh.write(b"new")),
             lambda p: write_file_atomic(p, lambda fh: (fh.write(b"half"), fh.flush(), _Boom().__reduce__())),
             KeyboardInterrupt),
    "text": (lambda p: write_text_atomic(p, "new"), lambda p: write_text_atomic(p, None), AttributeError),
    "json": (lambda p: write_json_atomic(p, {"new": [1, 2]}), lambda p: write_json_atomic(p, {"x": object()}),
             TypeError),
    "torch": (lambda p: torch_save_atomic({"w": torch.ones(3)}, p),
              lambda p: torch_save_atomic({"w": torch.ones(1000), "boom": _Boom()}, p), KeyboardInterrupt),
    "dir": (lambda p: write_dir_atomic(p, lambda tmp: (tmp / "f").write_text("new")),
            lambda p: write_dir_atomic(p, _fill_then_raise), KeyboardInterrupt),
}


def _old(target: Path, kind: str) -> None:
    if kind == "dir":
        make(target, {"f": "old", "g": "old too"})
    else:
        target.write_bytes(b"old bytes")


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
@pytest.mark.parametrize("fault", ["payload", "fsync", "rename"])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_failed_write_leaves_the_old_one_and_no_temp(tmp_path, monkeypatch, kind, fault, existing):
    target = tmp_path / "target"
    if existing:
        _old(target, kind)
    before = tree(tmp_path)
    good, bad, payload_error = WRITERS[kind]
    seen_during = []
    if fault == "fsync":
        def fsync(fd):  # the temp holds its bytes now: record its name, then be interrupted
            seen_during.extend(os.listdir(tmp_path))
            raise KeyboardInterrupt
        monkeypatch.setattr(rundir.os, "fsync", fsync)
    elif fault == "rename":
        real_rename = os.rename

        def fail_on_temp(src, dst):  # renaming the finished temp into place fails
            if ".tmp-" in os.fspath(src):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_rename(src, dst)
        monkeypatch.setattr(rundir.os, "replace", fail_on_temp)
        monkeypatch.setattr(rundir.os, "rename", fail_on_temp)
    write, error = (bad, payload_error) if fault == "payload" else (good, (KeyboardInterrupt, OSError))
    with pytest.raises(error):
        write(target)
    monkeypatch.undo()
    assert tree(tmp_path) == before
    if fault == "fsync":
        assert [n for n in seen_during if TEMP_NAME.fullmatch(n)], seen_during  # the scheme clean_temp knows


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_write_replaces_and_leaves_no_temp(tmp_path, kind, existing):
    target = tmp_path / "target"
    if existing:
        _old(target, kind)
    WRITERS[kind][0](target)
    assert os.listdir(tmp_path) == ["target"]
    if kind == "dir":
        assert os.listdir(target) == ["f"] and (target / "f").read_text() == "new"
    elif kind == "torch":
        assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    elif kind == "json":
        assert json.loads(target.read_text()) == {"new": [1, 2]} and target.read_text().endswith("\n")
    else:
        assert target.read_bytes() == b"new"


@pytest.mark.parametrize("what, error", [("link", "is a symbolic link"), ("file", "exists and is not a folder")])
def test_write_dir_atomic_refuses_a_link_or_a_file(tmp_path, what, error):
    elsewhere = tmp_path / "elsewhere"
    make(elsewhere, {"keep": "theirs"})
    target = tmp_path / "compressed"
    target.symlink_to(elsewhere) if what == "link" else target.write_text("a file")
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match=error):
        write_dir_atomic(target, lambda tmp: (tmp / "keep").write_text("mine"))
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- create / discard / space


@pytest.mark.parametrize("existing, extra, removed", [
    ("", None, ["a/b/c", "a/b", "a"]),
    ("a", None, ["a/b/c", "a/b"]),
    ("a/b/c", None, []),                     # it was there: not ours
    ("", "a/b/c/report.md", []),             # not empty: it and its parents stay
    ("", "a/notes.txt", ["a/b/c", "a/b"]),   # a parent got a file meanwhile: it stays
])
def test_discard_created_removes_only_created_empty_folders(tmp_path, existing, extra, removed):
    if existing:
        (tmp_path / existing).mkdir(parents=True)
    rd = RunDir(tmp_path / "a/b/c")
    rd.create()
    rd.acquire()
    if extra:
        (tmp_path / extra).write_text("x")
    got = rd.discard_created()
    assert [str(p.relative_to(tmp_path)) for p in got] == removed
    assert not rd.locked
    for folder in ["a", "a/b", "a/b/c"]:
        assert (tmp_path / folder).exists() == (folder not in removed)


def test_create_under_a_file_is_refused(tmp_path):
    (tmp_path / "a").write_text("file")
    with pytest.raises(ConfigError, match=r"cannot be created \(Not a directory\)"):
        RunDir(tmp_path / "a" / "b").create()


def _deny(target):
    raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("min_bytes, deny, error", [
    (0, False, None),
    (2**60, False, r"only \d+ MiB free on its disk, need about \d+ MiB$"),
    (0, True, r"is not writable \(Permission denied\)$"),
])
def test_check_free(tmp_path, monkeypatch, min_bytes, deny, error):
    if deny:
        monkeypatch.setattr(rundir, "open_temp", _deny)
    rd = RunDir(tmp_path / "run")
    if error is None:
        rd.check_free(min_bytes)
    else:
        with pytest.raises(ConfigError, match=error):
            rd.check_free(min_bytes)
    assert os.listdir(tmp_path / "run") == []  # the probe is gone


# ----------------------------------------------------------------------------- multi-node marker


@pytest.mark.parametrize("written, checked, seen", [("tok-1", "tok-1", True), ("tok-1", "tok-2", False)])
def test_shared_marker_is_seen_then_removed(tmp_path, written, checked, seen):
    with shared_marker(tmp_path, written) as marker:
        assert sees_marker(tmp_path, checked) is seen
        assert RunDir(tmp_path)._owns(marker.name)
    assert os.listdir(tmp_path) == [] and not sees_marker(tmp_path, written)


@pytest.mark.parametrize("token", ["", "../x", "a b", "x" * 65, "a\nb", 7])
def test_marker_token_must_be_a_plain_word(tmp_path, token):
    with pytest.raises(ValueError):
        with shared_marker(tmp_path, token):
            pass
    assert os.listdir(tmp_path) == []


def test_run_files_name_what_a_run_writes():
    assert RUN_FILES >= {"report.json", "report.md", "allocation.png", "log.jsonl", "run.json", "state", "compressed",
                         "dense.json", ".upop-lock", ".upop-previous"}
