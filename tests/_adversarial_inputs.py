"""Adversarial rows: inputs (see tests/test_adversarial.py).

Config files (alias bombs, binary and UTF-16 text, FIFOs, folders, link loops, ``/dev/zero``,
YAML 1.1 numbers read as strings), size-like options past their documented ranges, image paths
that are not regular files, and ``upop data shapes`` at the smallest sizes (its data must pass
``upop data check`` and load) or interrupted (nothing of the new data left).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import upop
from upop.cli.main import main

from ._adversarial_common import Row, compress, write

ROWS: dict[str, Row] = {}

BOMB = "".join(f"{name}: &{name} [{', '.join([prev] * 9)}]\n" for name, prev in
               zip("abcdefghi", ["x", *("*" + c for c in "abcdefgh")])) + "ratio: *i\n"
"""The "billion laughs": 9 levels of 9 aliases, 9**9 items once expanded."""

_STARTED: dict[str, float] = {}


def _config(text: str | bytes, name: str = "c.yaml"):
    """A compress run with ``--config`` a file of ``text`` (in ``cfg/``)."""
    return lambda w, t: compress(w, t / "out", "--config", str(write(t / "cfg" / name, text)))


def _timed(setup, seconds: float = 5.0):
    """``setup``, with an ``after`` (see :func:`_in_time`) checking the case took under ``seconds``."""
    def run(w, t):
        _STARTED[str(t)] = time.monotonic()
        return setup(w, t)
    return run


def _in_time(seconds: float = 5.0):
    def after(w, t):
        took = time.monotonic() - _STARTED.pop(str(t))
        assert took < seconds, f"took {took:.1f} s"
    return after


def _special_config(make):
    """A compress run whose ``--config`` is ``make(tmp)`` (a FIFO, a folder, a link loop...)."""
    def setup(w, t):
        (t / "cfg").mkdir()
        return compress(w, t / "out", "--config", str(make(t / "cfg")))
    return setup


def _fifo(folder: Path, name: str = "c.yaml") -> Path:
    os.mkfifo(folder / name)
    return folder / name


def _loop(folder: Path, name: str = "c.yaml") -> Path:
    (folder / "other").symlink_to(folder / name)
    (folder / name).symlink_to(folder / "other")
    return folder / name


def _folder(folder: Path) -> Path:
    (folder / "c.yaml").mkdir()
    return folder / "c.yaml"


def _zero(folder: Path) -> Path:
    (folder / "c.yaml").symlink_to("/dev/zero")
    return folder / "c.yaml"


# 1. the alias bomb, bounded messages
ROWS["config: YAML alias bomb under ratio"] = Row(_timed(_config(BOMB)), "aliases", watch=("out", "cfg"),
                                                 after=_in_time())
ROWS["config: YAML nested 5,000 levels deep"] = Row(_timed(_config("ratio: " + "[" * 5000 + "]" * 5000 + "\n")),
                                                    "deeper than", watch=("out", "cfg"), after=_in_time())
ROWS["config: larger than 1 MiB"] = Row(_config("# padding\n" * 120_000 + "ratio: 0.5\n"), "too large",
                                        watch=("out", "cfg"))


def _bomb_value():
    value: list = ["x"] * 9
    for _ in range(8):
        value = [value] * 9
    return value


ROWS["api: a config value of 9**9 shared items"] = Row(
    _timed(lambda w, t: lambda: upop.UPopConfig(ratio=_bomb_value())), "ratio=[[[[", error=upop.ConfigError,
    after=_in_time())
ROWS["api: a config value nested 100,000 deep"] = Row(
    _timed(lambda w, t: lambda: upop.UPopConfig(seed=_deep(100_000))), "seed=[[[[", error=upop.ConfigError,
    after=_in_time())


def _deep(depth: int) -> list:
    root: list = []
    node = root
    for _ in range(depth):
        node.append([])
        node = node[0]
    return root


# 2. size-like options past their documented ranges (argparse: one line, exit 2)
ROWS["make-model --seed 2**70"] = Row(lambda w, t: ["make-model", "clip", "--out", str(t / "m"), "--seed",
                                                    str(2**70)], "seed=1180591620717411303424", watch=("m",))
ROWS["make-model --image-size 100000"] = Row(lambda w, t: ["make-model", "clip", "--out", str(t / "m"),
                                                           "--image-size", "100000"], "[16, 1024]", watch=("m",))
ROWS["make-model --num-labels 0"] = Row(lambda w, t: ["make-model", "vit", "--out", str(t / "m"), "--num-labels",
                                                      "0"], "num_labels=0", watch=("m",))
ROWS["data shapes --train 10**9"] = Row(lambda w, t: ["data", "shapes", "--task", "retrieval", "--out", str(t / "d"),
                                                      "--train", str(10**9)], "train=1000000000", watch=("d",))
ROWS["data shapes --image-size 4"] = Row(lambda w, t: ["data", "shapes", "--task", "retrieval", "--out",
                                                       str(t / "d"), "--image-size", "4"], "image_size=4",
                                         watch=("d",))
ROWS["compress --seed 2**70"] = Row(lambda w, t: compress(w, t / "out", "--seed", str(2**70)),
                                   "seed=1180591620717411303424", watch=("out",))
ROWS["compress --batch-size 10**7"] = Row(lambda w, t: compress(w, t / "out", "--batch-size", str(10**7)),
                                          "batch_size=10000000", watch=("out",))
ROWS["compress --workers 100000"] = Row(lambda w, t: compress(w, t / "out", "--workers", "100000"),
                                        "workers=100000", watch=("out",))
ROWS["compress --caption-beams 10**6"] = Row(lambda w, t: compress(w, t / "out", "--caption-beams", str(10**6)),
                                             "caption_beams=1000000", watch=("out",))
ROWS["compress --search-epochs 10**12"] = Row(lambda w, t: compress(w, t / "out", "--search-epochs", str(10**12)),
                                              "[1, 10000]", watch=("out",))
ROWS["compress --interval x"] = Row(lambda w, t: compress(w, t / "out", "--interval", "x"), "interval='x'",
                                   watch=("out",))
ROWS["evaluate --latency-batch-size 0"] = Row(
    lambda w, t: ["evaluate", "--model", str(w / "run" / "compressed"), "--task", "retrieval", "--data",
                  str(w / "data"), "--latency", "--latency-batch-size", "0"], "latency_batch_size=0")
ROWS["config: seed 2**70 in YAML"] = Row(_config(f"seed: {2**70}\n"), "seed=1180591620717411303424",
                                         watch=("out", "cfg"))
ROWS["config: lr of 400 digits"] = Row(_config("lr: " + "9" * 400 + "\n"), "lr=<an integer of", watch=("out", "cfg"))
ROWS["api: workers 10**6"] = Row(lambda w, t: lambda: upop.UPopConfig(workers=10**6), "workers=1000000",
                                 error=upop.ConfigError)

# 3. a --config that is not a regular UTF-8 file, image paths that are not regular files
ROWS["config: random bytes"] = Row(_config(bytes(range(128, 256)) * 3), "not UTF-8", watch=("out", "cfg"))
ROWS["config: UTF-16 text"] = Row(_config("ratio: 0.5\n".encode("utf-16")), "UTF-16", watch=("out", "cfg"))
ROWS["config: a FIFO"] = Row(_timed(_special_config(_fifo)), "FIFO", watch=("out", "cfg"), after=_in_time())
ROWS["config: a folder"] = Row(_special_config(_folder), "is a folder", watch=("out", "cfg"))
ROWS["config: a symbolic link loop"] = Row(_special_config(_loop), "symbolic link loop", watch=("out", "cfg"))
ROWS["config: /dev/zero"] = Row(_timed(_special_config(_zero)), "character device", watch=("out", "cfg"),
                                after=_in_time())
ROWS["config: mapping with a number as key"] = Row(_config("1: 2\n"), "must be text", watch=("out", "cfg"))


def _data_with(edit):
    """A compress run on a copy of the world's data (``d/``) changed by ``edit(d)``."""
    def setup(w, t):
        shutil.copytree(w / "data", t / "d")
        edit(t / "d")
        return compress(w, t / "out", data=t / "d")
    return setup


def _replace(make):
    """Replace the data's ``images/test_00001.png`` by ``make(path)`` (a FIFO, a folder...)."""
    def edit(d: Path):
        image = d / "images" / "test_00001.png"
        image.unlink()
        make(image)
    return edit


ROWS["data: an image that is a FIFO"] = Row(_timed(_data_with(_replace(os.mkfifo))), "is a FIFO",
                                            watch=("out", "d"), after=_in_time())
ROWS["data: an image that is a folder"] = Row(_data_with(_replace(Path.mkdir)), "is a folder", watch=("out", "d"))
ROWS["data: an image that is a symbolic link loop"] = Row(
    _data_with(_replace(lambda p: _loop(p.parent, p.name))), "symbolic link loop", watch=("out", "d"))
ROWS["data: an image that is /dev/zero"] = Row(_timed(_data_with(_replace(lambda p: p.symlink_to("/dev/zero")))),
                                               "character device", watch=("out", "d"), after=_in_time())


def _check_api(edit, task: str = "retrieval"):
    """``upop data check``'s API on a copy of the world's data changed by ``edit``: the first problem."""
    def setup(w, t):
        shutil.copytree(w / "data", t / "d")
        edit(t / "d")
        from upop.data.check import check_data
        return lambda: check_data(task, t / "d", images="full").raise_for_problems()
    return setup


ROWS["data check: an image that is a FIFO"] = Row(_timed(_check_api(_replace(os.mkfifo))), "is a FIFO",
                                                  watch=("d",), error=upop.DataError, after=_in_time())


def _classes_with_fifo(w, t):
    """Classification data (in ``d/``) with a FIFO named like an image in a class folder."""
    assert main(["data", "shapes", "--task", "classification", "--out", str(t / "d"), "--train", "10", "--val", "10",
                 "--test", "10", "--image-size", "16"]) == 0
    os.mkfifo(t / "d" / "val" / "red_circle" / "fifo.png")
    from upop.data.check import check_data
    return lambda: check_data("classification", t / "d").raise_for_problems()


ROWS["data check: a FIFO in a class folder"] = Row(_timed(_classes_with_fifo), "fifo.png' is a FIFO",
                                                   watch=("d",), error=upop.DataError, after=_in_time())

# 4. YAML 1.1 reads 1e-5 as a string: accepted for number settings (retrain_lr is refused after lr)
ROWS["config: lr 1e-5 accepted, a word refused"] = Row(_config("lr: 1e-5\nretrain_lr: fast\n"),
                                                       "retrain_lr='fast'", watch=("out", "cfg"))
ROWS["config: batch size '3.5' refused"] = Row(_config("batch_size: '3.5'\n"), "batch_size='3.5'",
                                               watch=("out", "cfg"))

# 5. latency timing needs a positive, bounded time
ROWS["compress --latency-time 0"] = Row(lambda w, t: compress(w, t / "out", "--latency-time", "0"),
                                        "latency_time=0.0", watch=("out",))
ROWS["compress --latency-time 1e9"] = Row(lambda w, t: compress(w, t / "out", "--latency-time", "1e9"),
                                          "[0.01, 60]", watch=("out",))
ROWS["config: latency_time 0"] = Row(_config("latency_time: 0\n"), "latency_time=0", watch=("out", "cfg"))


# 6. data shapes interrupted: nothing of the new data is left, and the leftover of a kill is cleaned
def _failing_write(w, t):
    """``write_shapes`` failing inside the writer (a bad image size), into a folder holding the user's file."""
    write(t / "d" / "notes.txt", "mine")
    from upop.data import write_shapes
    return lambda: write_shapes("retrieval", t / "d", train=2, val=1, test=1, image_size=10**6)


ROWS["api: data shapes failing mid-write leaves nothing"] = Row(_failing_write, "image_size=1000000",
                                                               watch=("d",), error=upop.ConfigError)


def _killed_write(w, t):
    """The leftover of a ``data shapes`` killed mid-write (a staged temp, a stale lock file), then
    the same command again with --overwrite."""
    stage = t / "d" / ".shapes.json.tmp-999999-0123abcd"
    shutil.copytree(w / "data" / "images", stage / "images")
    write(t / "d" / ".upop-lock", "999999\n")
    return ["data", "shapes", "--task", "retrieval", "--out", str(t / "d"), "--train", "2", "--val", "1", "--test",
            "1", "--image-size", "16", "--overwrite"]


def _clean_and_checked(w, t):
    names = sorted(os.listdir(t / "d"))
    assert names == ["images", "shapes.json", "test.json", "train.json", "val.json"], names
    assert main(["data", "check", "--task", "retrieval", "--data", str(t / "d")]) == 0


ROWS["data shapes after a killed write"] = Row(_killed_write, code=0, after=_clean_and_checked)


# 7. data shapes at the smallest sizes writes data that `data check` accepts, for every task
def _smallest(task: str, size: int):
    def setup(w, t):
        return ["data", "shapes", "--task", task, "--out", str(t / "d"), "--train", str(size), "--val", str(size),
                "--test", str(size), "--image-size", "16"]
    return setup


def _checked(task: str):
    def after(w, t):
        assert main(["data", "check", "--task", task, "--data", str(t / "d"), "--images", "full"]) == 0
        from upop.tasks import get_task
        splits = get_task(task).load_splits(t / "d")
        assert all(len(splits[s]) >= 1 for s in ("train", "val", "test")), splits
    return after


def _add_smallest_rows() -> None:
    from upop.data import shapes_min_split
    from upop.tasks import task_names

    for task in task_names():
        least = shapes_min_split(task)
        ROWS[f"data shapes --task {task} at size {least}"] = Row(_smallest(task, least), code=0,
                                                                  after=_checked(task))
        if least > 1:
            ROWS[f"data shapes --task {task} at size {least - 1}"] = Row(_smallest(task, least - 1),
                                                                         f"need at least {least}", watch=("d",))


_add_smallest_rows()
