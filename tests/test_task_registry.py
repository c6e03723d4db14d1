"""The task registry: one registration per task, in the task's module, and nothing else to touch.

Every task module ends with ``register_task(...)`` (``src/upop/tasks/registry.py``); the CLI reads
the names and summaries from the modules' source without importing them. These tests iterate the
registry: every entry is complete, what the source declares is what the import registers, every
Task class of the package is registered, and a task registered at test time reaches
``get_task``, the Shapes writer, the minimum split size and the data checker (and the CLI) by that
act alone. The Shapes data of every task at its smallest sizes (it passes ``upop data check`` and
the task's reader, or the size is refused in one line before anything is written) is
``tests/test_shapes.py::test_data_shapes_at_small_sizes_is_accepted_or_refused_before_writing``,
which iterates the same registry.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import upop.tasks as tasks_package
from upop.cli.main import main
from upop.data import check_shapes_sizes, shapes_min_split, shapes_writer
from upop.data.check import check_data
from upop.errors import ConfigError, TaskError
from upop.tasks import get_task
from upop.tasks import registry
from upop.tasks.base import Task
from upop.tasks.registry import declared, register_task, task_entries, task_entry, task_names, task_summaries

WRITER_KEYWORDS = {"train", "val", "test", "image_size", "seed"}
CHECKER_PARAMETERS = ["root", "split", "files", "problems"]


def test_the_package_declares_tasks_and_each_module_registers_what_it_declares():
    """The source read (no import) and the import agree: name, module and summary of each task."""
    assert declared(), "no task module found"
    for name, source in declared().items():
        entry = task_entry(name)
        assert entry.task.__module__ == source.module, (name, entry.task.__module__, source.module)
        assert entry.summary == source.summary, name
    own = {name for name, entry in registry.TASK_ENTRIES.items() if entry.task.__module__.startswith("upop.")}
    assert own == set(declared())


def test_every_task_class_of_the_package_is_registered():
    """A Task subclass with a name in any module of ``upop.tasks`` has an entry: no task is reached
    only by importing its module."""
    for info in pkgutil.iter_modules(tasks_package.__path__):
        module = importlib.import_module(f"upop.tasks.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Task) and value.__module__ == module.__name__ \
                    and value.name:
                assert value.name in task_names() and task_entry(value.name).task is value, value


@pytest.mark.parametrize("name", task_names())
def test_every_entry_has_a_class_a_writer_a_checker_and_a_summary(name, tmp_path):
    entry = task_entry(name)
    task = get_task(name)
    assert type(task) is entry.task and task.name == name and task.main_metric
    assert get_task(task) is task
    assert shapes_writer(name) is entry.writer and shapes_min_split(name) == entry.min_split >= 1
    assert WRITER_KEYWORDS <= set(inspect.signature(entry.writer).parameters), name
    checker = inspect.signature(entry.checker).parameters
    assert list(checker)[:4] == CHECKER_PARAMETERS, (name, list(checker))
    extra = set(entry.check_context(tmp_path, []) if entry.check_context else {})
    assert extra == set(list(checker)[4:]), (name, extra)  # the context fills exactly the checker's extras
    assert entry.summary and "\n" not in entry.summary and len(entry.summary) < 120, name
    assert bool(entry.min_split_why) == (entry.min_split > 1), name  # a minimum above 1 says why


@pytest.mark.parametrize("name", task_names())
def test_sizes_under_the_minimum_are_refused_in_one_line(name):
    least = shapes_min_split(name)
    check_shapes_sizes(name, least, least, least)
    if least > 1:
        with pytest.raises(ConfigError, match=f"--val {least - 1} is too few .* need at least {least}"):
            check_shapes_sizes(name, least, least - 1, least)


@pytest.mark.parametrize("lookup", [get_task, shapes_writer, shapes_min_split, lambda t: check_data(t, ".")])
@pytest.mark.parametrize("bad", ["juggling", "", ["retrieval"], None])
def test_an_unknown_task_is_one_line_naming_it_and_the_tasks(lookup, bad):
    with pytest.raises(TaskError) as exc:
        lookup(bad)
    message = str(exc.value)
    assert "\n" not in message and "unknown task" in message and ", ".join(task_names()) in message


# ----------------------------------------------------------------------------- a task registered at test time


class ToyTask(Task):
    """A task of the test: its data is ``SPLIT.json``, a list of words per split."""

    name = "toy"
    main_metric = "words"

    def load_splits(self, data_dir, splits=("train", "val", "test")):
        return {s: json.loads((Path(data_dir) / f"{s}.json").read_text()) for s in splits}


def write_toy(out_dir, *, train=2, val=2, test=2, image_size=16, seed=0) -> dict:
    out = Path(out_dir)
    sizes = {"train": train, "val": val, "test": test}
    for split, n in sizes.items():
        (out / f"{split}.json").write_text(json.dumps([f"word{seed}_{i}" for i in range(n)]))
    (out / "shapes.json").write_text(json.dumps({"task": "toy"}))
    return {"splits": {s: {"images": n} for s, n in sizes.items()}}


CONTEXTS: list[dict] = []


def toy_context(root, problems) -> dict:
    CONTEXTS.append({"splits": []})
    return {"seen": CONTEXTS[-1]}


def check_toy(root, split, files, problems, seen) -> dict:
    seen["splits"].append(split)
    words = json.loads((Path(root) / f"{split}.json").read_text())
    problems.extend(f"{split}.json: {w!r} is not a word" for w in words if not str(w).isidentifier())
    return {"words": len(words)}


@pytest.fixture
def toy(monkeypatch):
    """The registry with the toy task registered in it (the real one untouched after the test; every
    task module is imported first, so none registers into the copy only)."""
    task_entries()
    monkeypatch.setattr(registry, "TASK_ENTRIES", dict(registry.TASK_ENTRIES))
    CONTEXTS.clear()
    return register_task(name="toy", task=ToyTask, writer=write_toy, checker=check_toy, check_context=toy_context,
                         min_split=2, min_split_why="two words make a list", summary="a list of words per split")


def test_a_task_registered_at_run_time_reaches_every_lookup(toy, tmp_path):
    assert "toy" in task_names() and task_summaries()["toy"] == "a list of words per split"
    assert isinstance(get_task("toy"), ToyTask) and task_entries()["toy"] is toy
    assert shapes_writer("toy") is write_toy and shapes_min_split("toy") == 2
    write_toy(tmp_path, train=3)
    report = check_data("toy", tmp_path)
    assert report.ok and report.splits == {"train": {"words": 3}, "val": {"words": 2}, "test": {"words": 2}}
    assert CONTEXTS == [{"splits": ["train", "val", "test"]}]  # one context, shared by the splits
    (tmp_path / "val.json").write_text(json.dumps(["ok", "not one"]))
    assert check_data("toy", tmp_path).problems == ["val.json: 'not one' is not a word"]


def test_a_task_registered_at_run_time_reaches_the_command_line(toy, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "shapes", "--task", "toy", "--out", str(out), "--train", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "need at least 2 images per split (two words make a list)" in err, err
    assert not out.exists()
    assert main(["data", "shapes", "--task", "toy", "--out", str(out), "--train", "2", "--val", "2",
                 "--test", "3"]) == 0
    assert main(["data", "check", "--task", "toy", "--data", str(out)]) == 0
    assert "test: 3 words" in capsys.readouterr().out
    assert get_task("toy").load_splits(out)["test"] == ["word0_0", "word0_1", "word0_2"]


def test_register_task_refuses_what_no_lookup_could_use(toy):
    ok = dict(task=ToyTask, writer=write_toy, checker=check_toy)
    bad = {
        "name": dict(ok, name="Toy Task"),
        "another class's name": dict(ok, name="toys"),
        "a writer that is no function": dict(ok, name="toy", writer="upop.data.shapes:write_retrieval"),
        "a checker that is no function": dict(ok, name="toy", checker=None),
        "min_split": dict(ok, name="toy", min_split=0),
        "another module's name": dict(ok, name="retrieval", task=type("RetrievalTask", (Task,), {"name": "retrieval"})),
        "a teacher_cache that is no bool": dict(ok, name="toy", teacher_cache="yes"),
        "a teacher cache without a replay of its own": dict(ok, name="toy", teacher_cache=True),
    }
    for why, kwargs in bad.items():
        with pytest.raises(ValueError):
            register_task(**kwargs)
        assert registry.TASK_ENTRIES["toy"] is toy, why
    assert register_task(**dict(ok, name="toy", summary="again")).summary == "again"  # same module: replaced


# ----------------------------------------------------------------------------- --help without torch


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["evaluate", "--help"], ["data", "--help"]])
def test_help_lists_the_tasks_without_importing_torch(argv):
    code = ("import sys, runpy\nsys.argv = ['upop', *sys.argv[1:]]\ntry:\n    runpy.run_module('upop', "
            "run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules if m.startswith(('torch', 'transformers'))}))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "HEAVY []", out[-500:]
    if argv[0] == "compress":
        flat = " ".join(out.split())
        for name, summary in task_summaries().items():
            assert f"{name}: {summary}" in flat, name
