"""The launchers users run upop under, and the multi-node folder check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from upop.cli.main import main

from ._families import clip_world

RUN = ["--task", "retrieval", "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--lr", "1e-3",
       "--interval", "2", "--no-progress", "--latency-time", "0.02", "--eval-batch-size", "8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return clip_world(tmp_path_factory.mktemp("launch"), 32, 8, 8)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_accelerate_launch_runs_two_processes(world, tmp_path, capsys):
    """``accelerate launch --multi_gpu`` (what users type on a GPU node) starts 2 gloo processes on
    a CPU machine: the run uses both and its metrics equal one process evaluating everything."""
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "run"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29562", "-m", "upop",
           "compress", "--model", str(world / "model"), "--data", str(world / "data"), "--out", str(out), *RUN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["device"] == "cpu"
    devices = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    phases = {r["of"]: r["device"] for r in devices if r["phase"] == "device"}
    assert phases == {p: "cpu" for p in ("dense_eval", "search", "retrain", "final_eval", "latency")}
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", "retrieval", "--data",
                 str(world / "data")]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(report["compressed"]["metrics"], abs=1e-9)


BLIND = """
import os, sys
import upop.api
if os.environ.get("RANK") == "1":  # this process's node mounts another disk at --out
    upop.api.sees_marker = lambda path, token: False
from upop.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_folder_not_shared_by_every_process_is_refused(world, tmp_path):
    """Multi-node runs need --out on a shared disk: a process that cannot see the main process's
    marker stops the run at its start, with one line, before any training."""
    script = tmp_path / "blind.py"
    script.write_text(BLIND)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29563", str(script), "compress", "--model",
           str(world / "model"), "--data", str(world / "data"), "--out", str(out), *RUN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("upop: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "is not shared: process 1 on host" in errors[0]
    assert not (out / "state").exists() and not (out / "log.jsonl").exists()
