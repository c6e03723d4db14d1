"""SIGKILL and ``--resume`` for every (tiny model, task) pair the registry declares.

A run killed outright (no handler runs: the way an out-of-memory killer or a lost node ends a job)
right after it wrote a mid-phase checkpoint, then continued with the same command and ``--resume``,
ends with the uninterrupted run's metrics and plan, and its compressed weights bit for bit.

The cases come from :func:`upop.arch.pairs`, so a family or task registered later is covered by
that act alone. The default run keeps the first classification pair (15-40 s a pair on 2 cores;
``tests/test_cli.py`` SIGKILLs CLIP retrieval runs in the default run too); every other pair is
``slow``: CI's second stage (``pytest -m slow``) runs them on every submission.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from upop.cli.main import main
from upop.checkpoint.folder import WEIGHTS_FILE

#: every run: one search and one retraining epoch on tiny data; a checkpoint every 2 steps, so the
#: first one is written in the middle of the search (an epoch is 4 steps or more)
ARGS = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--interval", "1",
        "--checkpoint-every", "2", "--no-progress", "--latency-time", "0.02", "--eval-batch-size", "8"]
STATE = Path("state") / "run.pt"


def _cases() -> list:
    """pytest params of every registry pair; the first classification pair (a one-tower model, the
    cheapest run) is in the default suite, the rest are slow (CI's second stage)."""
    from upop.arch import pairs

    every = pairs()
    fast = next((p for p in every if p[1] == "classification"), every[0])
    return [pytest.param(model, task, marks=[] if (model, task) == fast else [pytest.mark.slow], id=f"{model}-{task}")
            for model, task in every]


CASES = _cases()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``folders(model, task) -> (model folder, data)``: each tiny model and each task's Shapes data
    (16 training items; 8 validation and test ones, or the fewest the task's writer can fill),
    written through the CLI once and shared by the cases."""
    from upop.data import shapes_min_split

    root = tmp_path_factory.mktemp("kill")

    def make(name: str, task: str) -> tuple[Path, Path]:
        model, data = root / "models" / name, root / "data" / task
        if not data.is_dir():
            held_out = str(max(8, shapes_min_split(task)))
            assert main(["data", "shapes", "--task", task, "--out", str(data), "--train", "16", "--val", held_out,
                         "--test", held_out, "--image-size", "32"]) == 0
        if not model.is_dir():
            assert main(["make-model", name, "--out", str(model), "--image-size", "32"]) == 0
        return model, data

    return make


@pytest.fixture
def compress():
    """``compress(model, task, data, out, *extra)``: ``upop compress`` started in its own process (one
    thread: the runs are compared bit for bit), its output in ``out.log`` (a file: a pipe nobody
    reads while the test polls could fill). A process still running when the test ends is killed."""
    started: list[subprocess.Popen] = []

    def start(model: Path, task: str, data: Path, out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "upop", "compress", "--model", str(model), "--task", task, "--data", str(data),
               "--out", str(out), *ARGS, *extra]
        with open(out.with_suffix(".log"), "w") as log:
            started.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"}))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _output(proc: subprocess.Popen) -> str:
    return Path(proc.args[proc.args.index("--out") + 1]).with_suffix(".log").read_text()


def _finished(proc: subprocess.Popen) -> str:
    """Wait for ``proc`` to succeed; its output."""
    proc.wait(timeout=600)
    assert proc.returncode == 0, _output(proc)[-3000:]
    return _output(proc)


def _kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as its run folder holds a checkpoint (written atomically: it is
    complete once its name appears)."""
    deadline = time.monotonic() + timeout
    while not (out / STATE).is_file():
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{_output(proc)[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _safetensors(path: Path) -> tuple[dict, dict]:
    """The metadata and the tensors of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("model, task", CASES)
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(model, task, folders, compress, tmp_path):
    import torch

    model_dir, data = folders(model, task)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted run goes alongside the killed run and its resumption (one thread each)
    uninterrupted = compress(model_dir, task, data, reference)
    _kill_after_first_checkpoint(compress(model_dir, task, data, killed), killed)
    # killed mid-run: nothing final was written, the checkpoint is a step inside a phase
    assert not (killed / "report.json").exists() and not (killed / "compressed").exists()
    state = torch.load(killed / STATE, weights_only=True, map_location="cpu")
    assert state["step"] < state["totals"][state["phase"]], (state["phase"], state["step"])

    resumed = compress(model_dir, task, data, killed, "--resume")
    _finished(uninterrupted)
    err = _finished(resumed)
    assert f"resuming the {'search' if state['phase'] == 'search' else 'retraining'} at step {state['step']}/" in err
    want, got = (json.loads((d / "report.json").read_text()) for d in (reference, killed))
    for part in ("dense", "compressed"):
        assert got[part]["metrics"] == want[part]["metrics"], part
        assert (got[part]["params"], got[part]["flops"]) == (want[part]["params"], want[part]["flops"]), part
    assert got["achieved_ratio"] == want["achieved_ratio"]
    assert (killed / "compressed" / "upop_plan.json").read_bytes() == \
        (reference / "compressed" / "upop_plan.json").read_bytes()
    # the weights: every tensor bit for bit (the files' bytes may not match: safetensors writes its
    # metadata keys in a per-process hash order)
    (meta, weights), (want_meta, want_weights) = (_safetensors(d / "compressed" / WEIGHTS_FILE)
                                                  for d in (killed, reference))
    assert meta == want_meta and weights.keys() == want_weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == want_weights[name].dtype and torch.equal(tensor, want_weights[name]), name
    # no temp file of an interrupted write is left
    assert not [p for p in killed.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
