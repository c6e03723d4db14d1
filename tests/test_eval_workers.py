"""Evaluation batches loaded by DataLoader workers, and the gather of the per-batch results across
processes (:mod:`upop.tasks._shard`).

With a ``load``, :func:`map_batches` reads, decodes and collates each batch in the run's
``workers`` DataLoader processes (given by :func:`upop.engine.runtime.evaluating`) and runs the
model in this one: the results, their order and the run's random state are those of loading in
this process; every task's evaluation gives the same metrics with workers as without (a table over
the task registry). Across processes the results' tensors travel in a padded tensor all-gather, never
in the pickle that carries the rest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from upop.engine.runtime import evaluating
from upop.tasks._shard import map_batches

from .test_kill_resume import folders  # noqa: F401 (the fixture: tiny models and Shapes data, shared)


def _classification(folders):  # noqa: F811
    """The first tiny model the registry pairs with classification, its test split, processor and
    evaluation collator."""
    from upop.arch import pairs
    from upop.data.imagefolder import ImageClassificationCollator
    from upop.models.folders import load_any
    from upop.tasks import get_task

    name = next(model for model, task in pairs() if task == "classification")
    model_dir, data = folders(name, "classification")
    model, processor = load_any(model_dir)
    test = get_task("classification").load_splits(data, splits=("test",))["test"]
    return model.eval(), test, processor, ImageClassificationCollator(processor).collate_eval


def _worker() -> int:
    info = torch.utils.data.get_worker_info()
    return -1 if info is None else info.id


def test_an_evaluation_loaded_by_workers_equals_one_loaded_here(folders):  # noqa: F811
    from upop.tasks.classification import topk_accuracy

    model, test, processor, collate = _classification(folders)

    def load(lo: int, hi: int) -> dict:
        return {**collate([test[i] for i in range(lo, hi)]), "worker": _worker()}

    @torch.no_grad()
    def run(batch: dict):
        return model(pixel_values=batch["pixel_values"]).logits, batch["labels"], batch["worker"]

    def evaluate(**kwargs):
        logits, labels, workers = zip(*map_batches(len(test), 3, run, load=load, **kwargs))
        return torch.cat(logits), torch.cat(labels), set(workers)

    here = evaluate(workers=0)
    rng = torch.get_rng_state()
    loaded = evaluate(workers=2)
    assert torch.equal(torch.get_rng_state(), rng)  # the loader drew nothing from the global RNG
    assert here[2] == {-1} and loaded[2] == {0, 1}  # the batches came from two worker processes
    assert torch.equal(loaded[0], here[0]) and torch.equal(loaded[1], here[1])  # same batches, same order
    assert topk_accuracy(loaded[0], loaded[1]) == topk_accuracy(here[0], here[1])
    assert len(here[1]) == len(test)
    # the run's setting, given by the evaluation block, where the call names none
    with evaluating(model, "cpu", "fp32", workers=2):
        assert evaluate()[2] == {0, 1}
    assert evaluate()[2] == {-1}  # outside it: in this process
    # without a load, fn gets the bounds (the callers that load in fn itself)
    assert map_batches(7, 3, lambda lo, hi: (lo, hi)) == [(0, 3), (3, 6), (6, 7)]


# every task's evaluation -----------------------------------------------------------------------
def _task_cases() -> list:
    """pytest params of every task with the first tiny model the registry pairs it with; the first
    task is in the default suite, the rest are slow (CI's second stage)."""
    from upop.arch import pairs
    from upop.tasks.registry import task_names

    every = pairs()
    cases = [(task, next(model for model, t in every if t == task)) for task in task_names()]
    return [pytest.param(task, model, marks=[] if i == 0 else [pytest.mark.slow], id=f"{task}-{model}")
            for i, (task, model) in enumerate(cases)]


def _holds_a_module(obj) -> bool:
    """Whether pickling ``obj`` meets a torch module (a ``load`` must carry the data, not the model)."""
    found = []

    class Watch(pickle.Pickler):
        def persistent_id(self, value):
            if isinstance(value, nn.Module):
                found.append(type(value).__name__)
            return None

    Watch(io.BytesIO()).dump(obj)
    return bool(found)


@pytest.fixture
def loaders(monkeypatch):
    """The DataLoaders the evaluations make: (worker processes, whether their ``load`` pickles
    without a module in it) of each."""
    made: list[tuple[int, bool]] = []

    class Recording(torch.utils.data.DataLoader):
        def __init__(self, dataset, *args, **kwargs):
            super().__init__(dataset, *args, **kwargs)
            made.append((self.num_workers, not _holds_a_module(dataset.load)))

    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    return made


@pytest.mark.parametrize("task, model", _task_cases())
def test_every_task_evaluates_the_same_with_loader_workers(task, model, folders, loaders):  # noqa: F811
    import upop
    from upop.tasks import get_task

    model_dir, data = folders(model, task)
    teacher = model_dir if get_task(task).needs_teacher else None  # distill: agreement with the dense model

    def evaluate(workers: int) -> dict:
        config = upop.UPopConfig(workers=workers)
        return dict(upop.evaluate(str(model_dir), task, data, batch_size=3, config=config, teacher=teacher))

    here = evaluate(0)
    assert loaders == []  # workers=0: every batch loaded in this process
    loaded = evaluate(2)
    assert loaders and all(workers >= 1 for workers, _ in loaders), loaders  # each map over batches had workers
    assert all(clean for _, clean in loaders), loaders  # and its load carried no model
    assert loaded == here and here


GATHER = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from accelerate import PartialState
from upop.tasks._shard import map_batches

state = PartialState(cpu=True)
pickled = []
plain_gather = dist.all_gather_object


def recording(out, obj, *args, **kwargs):
    pickled.append(obj)
    return plain_gather(out, obj, *args, **kwargs)


dist.all_gather_object = recording


def result(lo, hi):
    x = torch.arange(lo, hi, dtype=torch.float64).view(-1, 1) * torch.linspace(-1.5, 2.0, 3, dtype=torch.float64)
    return {"x": x, "bits": torch.arange(lo, hi) % 2 == 0, "half": x.to(torch.bfloat16)[:, :2].t(),
            "first": torch.tensor(lo, dtype=torch.int32), "none": torch.zeros(0, 4), "count": hi - lo,
            "texts": [f"t{i}" for i in range(lo, hi)], "pair": (torch.tensor([lo]), "p")}


def same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def tensors_in(obj):
    if torch.is_tensor(obj):
        return 1
    if isinstance(obj, dict):
        return sum(tensors_in(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensors_in(v) for v in obj)
    return 0


checks = {}
for n, batch in ((11, 2), (5, 2), (2, 2), (0, 2)):  # uneven shards; one process with no batch; none at all
    sharded = map_batches(n, batch, result, state)
    single = [result(lo, min(lo + batch, n)) for lo in range(0, n, batch)]
    checks[f"{n}/{batch}"] = same(sharded, single)
ints = map_batches(7, 2, lambda lo, hi: hi - lo, state)  # plain values only: no tensor gather
checks["ints"] = ints == [2, 2, 2, 1]
checks["no tensor pickled"] = bool(pickled) and all(tensors_in(obj) == 0 for obj in pickled)
if state.is_main_process:
    Path(sys.argv[1]).write_text(json.dumps(checks))
state.wait_for_everyone()
dist.destroy_process_group()  # a clean exit: gloo's threads stopped before the interpreter ends
"""


def test_two_processes_gather_the_results_of_one_with_tensors_as_tensors(tmp_path):
    script, out = tmp_path / "gather.py", tmp_path / "checks.json"
    script.write_text(GATHER)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29547", str(script), str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = json.loads(out.read_text())
    assert checks == {k: True for k in checks} and len(checks) == 6, checks
