"""Two CPU processes (gloo) through torchrun, the same code path as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from upop.cli import main

from ._families import clip_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = clip_world(tmp_path_factory.mktemp("ddp"))
    return root


def test_two_processes_hold_identical_masks_and_plan(world, tmp_path, capsys):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "upop", "compress",
           "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"), "--out", str(out),
           "--search-epochs", "2", "--retrain-epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--interval", "2",
           "--no-progress", "--latency-time", "0.02", "--eval-batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    checks = [r["masks_identical"] for r in records if "masks_identical" in r]
    assert len(checks) == 8 and all(checks)  # 2 epochs x 8 steps (64 / (4 x 2)), an update every 2
    prune = [r for r in records if r["phase"] == "prune"]
    assert prune == [{"phase": "prune", "processes": 2, "plans_identical": True}]
    # the summary is printed once, by the main process only
    assert proc.stdout.count("Compressed model:") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    # metrics over the whole test set (each process evaluated half the batches) equal a
    # single-process evaluation of the same checkpoint
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", "retrieval", "--data", str(world / "data")]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single == pytest.approx(report["compressed"]["metrics"], abs=1e-9)
    # each process takes its own shard of every batch: an epoch is 8 steps of 2 x 4 samples = 64 images
    assert sum(1 for r in records if r["phase"] == "search") == 16
    # the weights are compared after the search and after every retrain epoch
    syncs = [r for r in records if r["phase"] == "sync"]
    assert [r["after"] for r in syncs] == ["search", "retrain"] and all(r["weights_identical"] for r in syncs)


# (family, task, master port, extra options): every family with a task, each on its own port so
# that a case left hanging cannot block the next one; four of them distil from the dense model
# (BLIP retrieval with logits+hidden: the teacher replays a loss with collectives and a paused ITM
# part; CLIP and BLIP with logits: the teacher's similarities come from embeddings computed once,
# gathered over the global batch)
COMPRESS_CASES = [
    ("clip", "retrieval", 29571, ["--distill", "logits"]),
    ("blip-retrieval", "retrieval", 29572, ["--distill", "logits+hidden"]),
    ("blip-retrieval", "retrieval", 29579, ["--distill", "logits"]),
    ("blip-vqa", "vqa", 29573, []),
    ("blip-caption", "caption", 29574, []),
    ("blip-nlvr", "nlvr", 29575, []),
    ("vit", "classification", 29576, []),
    ("deit", "classification", 29577, ["--distill", "logits", "--score", "taylor"]),
    ("segmenter", "segmentation", 29578, []),
    ("clip", "distill", 29580, []),  # label-free: the teacher's embeddings cached over both processes
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``folders(family, task) -> (model, data)``: a tiny random model per family and a tiny
    Shapes data set per task (16 training items: 2 steps of 2 x 4 per epoch; val 10 so that every
    classification class has an image; test 16: an evaluation batch of 8 per process), written
    through the CLI once and shared by the cases."""
    root = tmp_path_factory.mktemp("families")

    def make(family: str, task: str) -> tuple[Path, Path]:
        model, data = root / "models" / family, root / "data" / task
        if not data.is_dir():
            assert main(["data", "shapes", "--task", task, "--out", str(data), "--train", "16", "--val", "10",
                         "--test", "16", "--image-size", "32"]) == 0
        if not model.is_dir():
            assert main(["make-model", family, "--out", str(model), "--image-size", "32"]) == 0
        return model, data

    return make


@pytest.mark.parametrize("family,task,port,extra", COMPRESS_CASES, ids=[f"{f}-{t}" + (f"-{e[1]}" if e[:1] == ["--distill"] else "") for f, t, _, e in COMPRESS_CASES])
def test_every_family_compresses_under_torchrun_like_one_process(family, task, port, extra, folders, tmp_path, capsys):
    """Two processes compress each family end to end: the loss runs through the data-parallel
    wrapper (same weights on both after every phase), both choose the same plan, and the report's
    metrics (evaluation split across the processes) equal one process evaluating the checkpoint."""
    model, data = folders(family, task)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), "-m", "upop", "compress",
           "--model", str(model), "--task", task, "--data", str(data), "--out", str(out),
           "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--interval", "1",
           "--no-progress", "--latency-time", "0.02", "--eval-batch-size", "8", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Compressed model:") == 1  # the summary comes from the main process only
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    syncs = [r for r in records if r["phase"] == "sync"]
    assert [r["after"] for r in syncs] == ["search", "retrain"] and all(r["weights_identical"] for r in syncs)
    assert [r for r in records if r["phase"] == "prune"] == [{"phase": "prune", "processes": 2, "plans_identical": True}]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    assert report["distill"].get("teacher_cached", False) == (task == "distill" or (task == "retrieval" and extra[:2] == ["--distill", "logits"]))
    capsys.readouterr()
    teacher = ["--teacher", str(model)] if task == "distill" else []
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", task, "--data", str(data),
                 "--batch-size", "8", *teacher]) == 0
    single = json.loads(capsys.readouterr().out)
    # recalls are counts (exact); the label-free cosines are float means, summed in another order
    assert single == pytest.approx(report["compressed"]["metrics"], abs=1e-9 if task != "distill" else 1e-4)


def test_through_wrapper_runs_the_loss_as_the_wrappers_forward():
    import torch
    from torch import nn

    from upop.tasks._blip import through_wrapper

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel: hooks live in its forward
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args):
            self.calls += 1
            return self.module(*args)

    inner = nn.Linear(3, 2)
    wrapped = Wrapper(inner)
    x = torch.randn(4, 3)
    loss = through_wrapper(wrapped, lambda m, t: m.weight.sum() * t.sum(), x)
    assert wrapped.calls == 1 and torch.allclose(loss, inner.weight.sum() * x.sum())
    assert "forward" not in inner.__dict__ and inner(x).shape == (4, 2)  # the real forward is back
    assert through_wrapper(inner, lambda m, t: t.sum(), x) == x.sum()  # no wrapper: a plain call
    assert wrapped.calls == 1


DIST_EVAL = """
import json, sys
from pathlib import Path
import torch
from accelerate import PartialState
from upop.data import shapes_writer
from upop.models import _shapes_labels, make_model, make_processor
from upop.tasks import get_task

state = PartialState(cpu=True)
root, out = Path(sys.argv[1]), {}
cases = {"classification": "vit", "segmentation": "segmenter", "vqa": "blip-vqa", "caption": "blip-caption",
         "nlvr": "blip-nlvr", "retrieval": "clip"}
for task_name, family in cases.items():
    data = root / task_name
    if state.is_main_process:
        n = 21 if task_name == "classification" else 7  # classification: every class needs an image
        shapes_writer(task_name)(data, train=n, val=n, test=n, image_size=32, seed=0)
    state.wait_for_everyone()
    task = get_task(task_name)
    test = task.load_splits(data, splits=("test",))["test"]
    processor = make_processor(family, 32)
    vocab = len(processor.tokenizer) if hasattr(processor, "tokenizer") else 128
    model = make_model(family, vocab_size=vocab, image_size=32, num_labels=_shapes_labels(family) or 10)
    sharded = task.evaluate(model, test, processor, batch_size=2, accelerator=state)
    if state.is_main_process:
        out[task_name] = {"sharded": sharded, "single": task.evaluate(model, test, processor, batch_size=2)}
    state.wait_for_everyone()
if state.is_main_process:
    (root / "metrics.json").write_text(json.dumps(out))
"""


def test_every_task_evaluates_split_across_processes_like_one_process(tmp_path):
    """Each task's evaluation, split over 2 processes (7 or 21 samples in batches of 2: uneven shards),
    gives exactly the single-process metrics."""
    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_EVAL)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29535", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(metrics) == ["caption", "classification", "nlvr", "retrieval", "segmentation", "vqa"]
    for task_name, m in metrics.items():
        assert m["sharded"] == m["single"], task_name
