"""The teacher table's host-memory limit (``CACHE_LIMIT_BYTES``) counts the table once per process
on the node: every process holds the whole table, so eight processes on one host hold eight copies.
The local process count is faked here (``LOCAL_WORLD_SIZE`` and a stand-in for the run's
Accelerator); no second process runs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

import upop.tasks._teacher_replay as R
from upop.arch import pairs
from upop.cli.main import main
from upop.config import UPopConfig
from upop.distill.distiller import make_teacher
from upop.models.folders import make_model, make_processor
from upop.tasks import get_task
from upop.tasks.registry import cached_tasks, task_names

MIB = 2**20


def _node(processes: int) -> SimpleNamespace:
    """The main process of a run of ``processes`` processes, as the table builders read it."""
    return SimpleNamespace(num_processes=processes, process_index=0, is_main_process=True)


# (processes of the run, LOCAL_WORLD_SIZE, the limit in tables of one process, fits)
CASES = [
    (1, None, 1, True),     # one process: one copy
    (4, None, 3, False),    # no LOCAL_WORLD_SIZE: the run's 4 processes share one node, 4 copies
    (4, None, 4, True),
    (4, "4", 3, False),     # 4 on this node
    (4, "2", 2, True),      # 2 nodes of 2: 2 copies on each
    (4, "2", 1, False),
    (8, "bad", 7, False),   # an unreadable LOCAL_WORLD_SIZE: all of the run's processes
]


@pytest.mark.parametrize("processes,local,limit,fits", CASES)
def test_the_limit_counts_one_table_per_process_on_the_node(processes, local, limit, fits, monkeypatch, caplog):
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.setattr(R, "CACHE_LIMIT_BYTES", limit * MIB)
    with caplog.at_level(logging.INFO, logger="upop"):
        assert R.table_fits(MIB, _node(processes)) is fits
    said = [r.getMessage() for r in caplog.records if "teacher's table is not cached" in r.getMessage()]
    if fits:
        assert said == []
    else:  # one line: the size, the copies and the limit
        copies = processes if local in (None, "bad") else int(local)
        assert said == [f"the teacher's table is not cached: 1.0 MiB per process x {copies} processes on this node "
                        f"is over the {limit} MiB host-memory limit; the teacher runs every step"]
    caplog.clear()
    other = _node(processes)
    other.is_main_process = False  # the other processes decide alike, silently
    with caplog.at_level(logging.INFO, logger="upop"):
        assert R.table_fits(MIB, other) is fits
    assert not caplog.records


#: the tasks that build a teacher table: those that replay the teacher's similarities (registry's
#: cached tasks) and those that learn from a teacher (label-free distillation)
TABLE_TASKS = sorted(set(cached_tasks()) | {t for t in task_names() if get_task(t).needs_teacher})


def _table(task, model, processor, train, accelerator) -> bool:
    """Whether the teacher's table is built, asked as a run asks (``Run._teacher``)."""
    teacher = make_teacher(model)
    if task.needs_teacher:
        task.set_teacher(teacher)
        return task.cache_teacher(train, processor, 8, accelerator)
    factory = task.teacher_replay(teacher, train, processor, 8, accelerator)
    return factory is not None and factory() is not None


@pytest.mark.parametrize("task_name", TABLE_TASKS)
def test_two_processes_on_a_node_need_room_for_two_tables(task_name, tmp_path, monkeypatch, caplog):
    """For every family of a task that builds the teacher's table: a limit of exactly one table
    builds it for one process and refuses it (before any collective, the same on every process)
    for two processes on the node, where two copies would be held."""
    assert main(["data", "shapes", "--task", task_name, "--out", str(tmp_path / "data"), "--train", "12",
                 "--val", "10", "--test", "10", "--image-size", "32"]) == 0
    task = get_task(task_name).configure(UPopConfig(augment="none"))
    train = task.load_splits(tmp_path / "data", splits=("train",))["train"]
    sizes: list[int] = []
    fits = R.table_fits

    def measured(table_bytes, accelerator=None):
        sizes.append(table_bytes)
        return fits(table_bytes, accelerator)

    monkeypatch.setattr(R, "table_fits", measured)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    checked = []
    for family in [f for f, t in pairs() if t == task_name]:
        processor = make_processor(family, 32)
        vocab = len(processor.tokenizer) if hasattr(processor, "tokenizer") else 128
        model = make_model(family, vocab_size=vocab, image_size=32)
        task.check_model(model)
        sizes.clear()
        if not _table(task, model, processor, train, None):  # this family keeps its teacher's forward
            assert sizes == [], family
            continue
        one = sizes[-1]
        monkeypatch.setattr(R, "CACHE_LIMIT_BYTES", one)
        assert _table(task, model, processor, train, None), family  # one process: one table, at the limit
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="upop"):
            assert not _table(task, model, processor, train, _node(2)), family
        assert sizes[-1] == one and "x 2 processes on this node" in caplog.text, family
        monkeypatch.setattr(R, "CACHE_LIMIT_BYTES", 2 * one)
        assert R.table_fits(one, _node(2))  # room for both copies
        monkeypatch.setattr(R, "CACHE_LIMIT_BYTES", 4 * 2**30)
        checked.append(family)
    assert checked, f"no family of task {task_name!r} builds a teacher table"
