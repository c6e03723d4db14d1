"""The task registry: one registration per task, in the task's own module.

A task module (``tasks/retrieval.py``, ``tasks/vqa.py``, ...) ends with one call::

    register_task(
        name="retrieval",                  # the --task value; the class's ``name``
        task=RetrievalTask,                # loss, evaluation, reader and the optional hooks (tasks.base.Task)
        writer=write_retrieval,            # the Shapes writer of the task's format (upop data shapes)
        checker=check_retrieval,           # the data checker of one split (upop data check)
        summary="image-text retrieval ...",  # one line for --help
    )

(``min_split``/``min_split_why``: the fewest images per split the writer can fill, and why;
``check_context``: extra arguments of the checker, read once per data set; ``teacher_cache=True``:
the task replays the teacher from outputs cached once, so ``distill="auto"`` distils there). Everything else reads
this registry: :func:`upop.tasks.get_task`, :func:`upop.data.shapes_writer` and
:func:`upop.data.shapes_min_split`, :func:`upop.data.check.check_data` and the CLI's ``--task``.

The CLI must know the task names (and their summaries, for ``--help``) without importing torch,
which every task module imports. So this module finds the task modules by reading the source
files of the ``upop.tasks`` package, without importing them: a module is a task module when one of
its top-level statements is a ``register_task(...)`` call, whose ``name`` and ``summary`` are
then read as the string literals they must be, and ``teacher_cache`` as a bool literal
(:func:`declared`). A task's module is imported on
the first lookup of its name (:func:`task_entry`); so a new task is one new file. A task
registered from Python (:func:`register_task` with a class of one's own) is found the same way.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

from upop.errors import TaskError, show

#: what a task name may look like (it is a command-line value)
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class TaskEntry:
    """Everything upop knows about one task.

    ``task``: the :class:`~upop.tasks.base.Task` subclass (its ``name`` is the entry's).
    ``writer(out_dir, *, train, val, test, image_size, seed) -> dict``: writes the Shapes world in
    the task's format. ``checker(data_dir, split, files, problems, **context) -> counts``: checks one
    split the way :func:`upop.data.check.check_data` asks (every problem a line of ``problems``).
    ``check_context(data_dir, problems) -> dict``: the checker's extra keyword arguments, made once
    for the three splits of a check (None: none). ``min_split``: the fewest images (NLVR2: pairs)
    per split for which the writer writes data the reader accepts, ``min_split_why`` the reason
    when it is above 1. ``summary``: one line for ``--help``. ``teacher_cache``: whether the task
    can replay the teacher from outputs computed once (it overrides
    :meth:`~upop.tasks.base.Task.teacher_replay`), so that ``distill="auto"`` distils the logits at
    no per-step cost (:func:`upop.config.decide_distill`).
    """

    name: str
    task: type
    writer: Callable[..., dict]
    checker: Callable[..., dict]
    check_context: Callable[[Path, list], dict] | None = None
    min_split: int = 1
    min_split_why: str = ""
    summary: str = ""
    teacher_cache: bool = False


#: task name -> its entry, filled by :func:`register_task` as each task module is imported
TASK_ENTRIES: dict[str, TaskEntry] = {}


def register_task(*, name: str, task: type, writer: Callable[..., dict], checker: Callable[..., dict],
                  check_context: Callable[[Path, list], dict] | None = None, min_split: int = 1,
                  min_split_why: str = "", summary: str = "", teacher_cache: bool = False) -> TaskEntry:
    """Register a task under ``name`` (see :class:`TaskEntry`) and return its entry.

    Registering a name again from the same module replaces the entry (a reloaded module); from
    another module it is refused, as are a name that is not a plain lowercase word, a class whose
    ``name`` differs, a writer or checker that cannot be called, a ``min_split`` below 1 and a
    ``teacher_cache`` that is not a bool or is True for a class without its own ``teacher_replay``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"task name {show(name)} is not allowed; need lowercase letters, digits, '-' or '_'")
    if not isinstance(task, type) or getattr(task, "name", None) != name:
        raise ValueError(f"task {name!r}: task={show(task)} must be a Task class whose name is {name!r}")
    for field, value in (("writer", writer), ("checker", checker)):
        if not callable(value):
            raise ValueError(f"task {name!r}: {field}={show(value)} is not callable")
    if check_context is not None and not callable(check_context):
        raise ValueError(f"task {name!r}: check_context={show(check_context)} is not callable")
    if isinstance(min_split, bool) or not isinstance(min_split, int) or min_split < 1:
        raise ValueError(f"task {name!r}: min_split={show(min_split)} is not allowed; need an integer >= 1")
    if not isinstance(teacher_cache, bool):
        raise ValueError(f"task {name!r}: teacher_cache={show(teacher_cache)} is not allowed; need True or False")
    if teacher_cache:
        from upop.tasks.base import Task  # imported by the task's own module already

        if getattr(task, "teacher_replay", Task.teacher_replay) is Task.teacher_replay:
            raise ValueError(f"task {name!r}: teacher_cache=True needs a teacher_replay of its own in {task.__name__}")
    old = TASK_ENTRIES.get(name)
    if old is not None and old.task.__module__ != task.__module__:
        raise ValueError(f"task {name!r} is already registered by {old.task.__module__}; "
                         f"{task.__module__} cannot register it again")
    entry = TaskEntry(name=name, task=task, writer=writer, checker=checker, check_context=check_context,
                      min_split=min_split, min_split_why=min_split_why, summary=summary, teacher_cache=teacher_cache)
    TASK_ENTRIES[name] = entry
    return entry


@dataclass(frozen=True)
class Declared:
    """A task as its module's source declares it: the module, the summary for ``--help`` and
    whether it caches the teacher (``teacher_cache``)."""

    module: str
    summary: str
    teacher_cache: bool = False


def _literal(call: ast.Call, keyword: str, path: Path) -> str:
    """The string literal passed as ``keyword`` to the ``register_task`` call in ``path``."""
    for kw in call.keywords:
        if kw.arg == keyword:
            if isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                return kw.value.value
            break
    raise RuntimeError(f"{path}: register_task(...) needs {keyword}= as a string literal (the CLI reads it "
                       "without importing the module)")


def _flag(call: ast.Call, keyword: str, path: Path) -> bool:
    """The bool literal passed as ``keyword`` to the ``register_task`` call in ``path`` (False when
    it is not passed)."""
    for kw in call.keywords:
        if kw.arg == keyword:
            if isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, bool):
                return kw.value.value
            raise RuntimeError(f"{path}: register_task(...) needs {keyword}= as True or False (read without "
                               "importing the module)")
    return False


@cache
def declared() -> dict[str, Declared]:
    """Task name -> :class:`Declared`, for every module of this package whose top level calls
    ``register_task`` (read from the source files, not imported: no torch)."""
    found: dict[str, Declared] = {}
    package = __name__.rpartition(".")[0]
    for path in sorted(Path(__file__).parent.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "register_task(" not in source or path.name == Path(__file__).name:
            continue
        for node in ast.parse(source, str(path)).body:
            call = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "register_task":
                name = _literal(call, "name", path)
                if name in found:
                    raise RuntimeError(f"task {name!r} is registered in {found[name].module} and in {path}")
                found[name] = Declared(f"{package}.{path.stem}", _literal(call, "summary", path),
                                       _flag(call, "teacher_cache", path))
    return found


def task_names() -> tuple[str, ...]:
    """Every task's name, sorted: those the package's modules declare and those registered at run time."""
    return tuple(sorted(set(declared()) | set(TASK_ENTRIES)))


def task_summaries() -> dict[str, str]:
    """Task name -> its one-line summary, without importing any task module."""
    summaries = {name: d.summary for name, d in declared().items()}
    summaries.update({name: e.summary for name, e in TASK_ENTRIES.items()})
    return dict(sorted(summaries.items()))


def caches_teacher(name: Any) -> bool:
    """Whether the task called ``name`` registers ``teacher_cache=True``, without importing its
    module (False for None or a name that is no task)."""
    if isinstance(name, str) and name in TASK_ENTRIES:
        return TASK_ENTRIES[name].teacher_cache
    found = declared().get(name) if isinstance(name, str) else None
    return found is not None and found.teacher_cache


def cached_tasks() -> tuple[str, ...]:
    """The names of the tasks that register ``teacher_cache=True``, sorted (no task module imported)."""
    return tuple(name for name in task_names() if caches_teacher(name))


def task_entry(name: Any) -> TaskEntry:
    """The entry of the task called ``name``, importing its module on first use; TaskError for a
    name that is no task."""
    if not isinstance(name, str) or (name not in TASK_ENTRIES and name not in declared()):
        raise TaskError(f"unknown task {show(name)}; available tasks: {', '.join(task_names())}")
    if name not in TASK_ENTRIES:
        module = declared()[name].module
        import_module(module)
        if name not in TASK_ENTRIES:
            raise RuntimeError(f"{module} declares the task {name!r} but did not register it")
    return TASK_ENTRIES[name]


def task_entries() -> dict[str, TaskEntry]:
    """Every task's entry (every task module imported), by name."""
    return {name: task_entry(name) for name in task_names()}


__all__ = ["Declared", "TASK_ENTRIES", "TaskEntry", "cached_tasks", "caches_teacher", "declared", "register_task",
           "task_entries", "task_entry", "task_names", "task_summaries"]
