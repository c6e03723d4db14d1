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
           "--no-progress", "--latency-time", "0.02"]
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
    # metrics over the whole test set equal a single-process evaluation of the same checkpoint
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", "retrieval", "--data", str(world / "data")]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single == pytest.approx(report["compressed"]["metrics"], abs=1e-9)
    # each process takes its own shard of every batch: an epoch is 8 steps of 2 x 4 samples = 64 images
    assert sum(1 for r in records if r["phase"] == "search") == 16
