"""Runs that stop the way clusters stop them: SIGTERM mid-phase, a failure on one of several
processes, and the seeds and loss-scale state that an exact resume needs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upop
import upop.engine.phases
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.engine.run import seed_everything

from ._families import clip_world

# A real CLI run whose task loss sends a signal to its own process (or raises, on one rank) at a
# given call: the signal arrives mid-step, exactly where a scheduler's SIGTERM would.
WRAPPER = """
import os, signal, sys
from upop.errors import DataError
from upop.tasks.retrieval import RetrievalTask

calls, original = [0], RetrievalTask.loss
kill_at, fail_at = int(os.environ.get("KILL_AT", 0)), int(os.environ.get("FAIL_AT", 0))

def loss(self, model, batch):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGTERM)
    if calls[0] == fail_at and os.environ.get("RANK", "0") == os.environ.get("FAIL_RANK", "0"):
        raise DataError("image 'images/x.png' cannot be read (changed on disk)")
    return original(self, model, batch)

RetrievalTask.loss = loss

# SIGTERM in the last phases: during the retraining's last validation and save (KILL_LAST_SAVE),
# or during the final latency timing (KILL_LATENCY); the time of the kill goes to KILL_TIME_FILE
import time
import upop.api, upop.engine.phases

def _kill_here():
    with open(os.environ["KILL_TIME_FILE"], "w") as fh:
        fh.write(repr(time.monotonic()))
    os.kill(os.getpid(), signal.SIGTERM)

if os.environ.get("KILL_LAST_SAVE"):
    step_end = upop.engine.phases._Validate.step_end
    def last_step_end(self, done, stop):
        if done == self.run.retrain_steps:
            _kill_here()
        return step_end(self, done, stop)
    upop.engine.phases._Validate.step_end = last_step_end
if os.environ.get("KILL_DENSE_EVAL"):
    dense_baseline = upop.api._dense_baseline
    def dense(*args, **kwargs):
        _kill_here()
        return dense_baseline(*args, **kwargs)
    upop.api._dense_baseline = dense
if os.environ.get("KILL_LATENCY"):
    paired = upop.api.paired_latency
    def latency(*args, **kwargs):
        _kill_here()
        return paired(*args, **kwargs)
    upop.api.paired_latency = latency
from upop.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

ARGS = ["--task", "retrieval", "--search-epochs", "2", "--retrain-epochs", "2", "--batch-size", "8", "--lr", "1e-3",
        "--interval", "2", "--checkpoint-every", "100", "--no-progress", "--latency-time", "0.02",
        "--eval-batch-size", "8"]
SEARCH_STEPS = 12  # 48 images / 8 per step x 2 epochs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = clip_world(tmp_path_factory.mktemp("preempt"), 48, 8, 8)
    (root / "wrapper.py").write_text(WRAPPER)
    return root


def _cli(world, out, env=None, extra=(), timeout=300):
    cmd = [sys.executable, str(world / "wrapper.py"), "compress", "--model", str(world / "model"), "--data",
           str(world / "data"), "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _cli(world, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("phase,kill_at", [("search", 5), pytest.param("retrain", SEARCH_STEPS + 4, marks=pytest.mark.slow)])
def test_sigterm_saves_the_step_and_resume_gives_the_uninterrupted_run(phase, kill_at, world, reference, tmp_path):
    out = tmp_path / "run"
    proc = _cli(world, out, env={"KILL_AT": str(kill_at)})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("upop: stopped by SIGTERM after " + phase)
    assert lines[-1] == "upop: continue with the same command and --resume"
    assert "Traceback" not in proc.stderr
    # a temp file of a write a kill interrupted: removed by the next start
    leftover = out / "state" / f".run.pt.tmp-{os.getpid()}-0123abcd"
    leftover.write_bytes(b"half a file")
    proc = _cli(world, out, extra=["--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not leftover.exists()
    # the step the signal arrived in was finished and saved: none is run twice
    steps = [(r["phase"], r["step"]) for r in _records(out) if r["phase"] in ("search", "retrain")]
    assert len(steps) - len(set(steps)) <= 1
    assert len(set(steps)) == 2 * SEARCH_STEPS
    assert upop.read_plan(out / "compressed").groups == upop.read_plan(reference / "compressed").groups
    a = load_file(str(reference / "compressed" / WEIGHTS_FILE))
    b = load_file(str(out / "compressed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("where,message", [("KILL_DENSE_EVAL", "during the dense evaluation"),
                                           pytest.param("KILL_LAST_SAVE", "after the retraining", marks=pytest.mark.slow),
                                           ("KILL_LATENCY", "during the final evaluation")])
def test_sigterm_in_the_last_phases_stops_at_once_and_resume_finishes(where, message, world, reference, tmp_path):
    """SIGTERM during the dense evaluation of a fresh run (it used to kill the process, leaving the
    lock file; the fresh folder is kept, not abandoned), the retraining's last validation and save (it used to be swallowed: the run
    went on to the end) and during the final latency timing (it used to kill the process with no
    message and a stale lock file): the run stops at once with the usual two lines, the lock is
    released, and --resume finishes with the uninterrupted run's model and metrics."""
    out = tmp_path / "run"
    stamp = tmp_path / "killed-at"
    proc = _cli(world, out, env={where: "1", "KILL_TIME_FILE": str(stamp)})
    ended = time.monotonic()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert ended - float(stamp.read_text()) < 10  # the interpreter's start and exit included
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith(f"upop: stopped by SIGTERM {message}; the run is saved in "), lines[-2]
    assert lines[-1] == "upop: continue with the same command and --resume"
    assert "Traceback" not in proc.stderr
    assert not (out / ".upop-lock").exists() and not (out / "report.json").exists()
    proc = _cli(world, out, extra=["--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert upop.read_plan(out / "compressed").groups == upop.read_plan(reference / "compressed").groups
    a = load_file(str(reference / "compressed" / WEIGHTS_FILE))
    b = load_file(str(out / "compressed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mine, theirs = (json.loads((d / "report.json").read_text()) for d in (out, reference))
    assert mine["compressed"]["metrics"] == theirs["compressed"]["metrics"]
    assert not (out / ".upop-lock").exists() and not (out / "state" / "dense-model").exists()


def test_a_failure_on_one_process_stops_every_process_quickly(world, tmp_path):
    """Process 1 raises at its 3rd step: both processes stop at that step, before backward (no
    hang in an all-reduce), with one line naming the process and the step. (Its 4th call of the
    loss: under several processes the first looks for parameters without gradient.)"""
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29541", str(world / "wrapper.py"), "compress",
           "--model", str(world / "model"), "--data", str(world / "data"), "--out", str(out), *ARGS]
    cmd[cmd.index("--batch-size") + 1] = "4"
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "FAIL_AT": "4", "FAIL_RANK": "1"})
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("upop: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "search step 2 on process 1 of 2" in errors[0] and "changed on disk" in errors[0]
    assert "--resume" in errors[0]
    # no traceback from upop's processes (torchrun prints its own summary of the failed worker)
    assert "upop/engine/run.py" not in proc.stderr and "upop/api.py" not in proc.stderr


def test_seed_gives_each_process_its_own_reproducible_stream():
    def dropout_mask(seed, rank):
        seed_everything(seed, rank)
        return torch.nn.functional.dropout(torch.ones(256), 0.5) > 0

    assert torch.equal(dropout_mask(3, 0), dropout_mask(3, 0))
    assert not torch.equal(dropout_mask(3, 0), dropout_mask(4, 0))
    assert not torch.equal(dropout_mask(3, 0), dropout_mask(3, 1))


def _dropout_world(world, tmp_path):
    cfg = json.loads((world / "model" / "config.json").read_text())
    model_dir = tmp_path / "dropout-model"
    import shutil

    shutil.copytree(world / "model", model_dir)
    cfg["text_config"]["attention_dropout"] = cfg["vision_config"]["attention_dropout"] = 0.5
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


@pytest.mark.parametrize("seed,same", [(0, True), (1, False)])
def test_seed_decides_the_dropout_of_a_run(seed, same, world, tmp_path):
    """Two runs with --seed 0 draw the same dropout (same losses); --seed 1 draws other masks."""
    model_dir = _dropout_world(world, tmp_path)

    def first_losses(out, s):
        model, processor = upop.load_model(model_dir)
        with pytest.raises(KeyboardInterrupt):
            upop.compress(model, "retrieval", world / "data", processor=processor, out_dir=out, progress=False,
                          log=lambda m: None, stop_after=3,
                          config=upop.UPopConfig(search_epochs=2, batch_size=8, lr=1e-3, interval=2, seed=s))
        return [r["loss"] for r in _records(out) if r["phase"] == "search"]

    a = first_losses(tmp_path / "a", 0)
    b = first_losses(tmp_path / "b", seed)
    assert len(a) == 3 and (a == b) == same


def test_loss_scale_state_is_saved_and_restored(world, tmp_path):
    """fp16's GradScaler state is part of the run state (CPU has no fp16 autocast in Accelerate,
    so the round trip is checked with a CPU GradScaler standing in)."""
    from upop.tasks import get_task
    from upop.engine.run import Run

    model, processor = upop.load_model(world / "model")
    task = get_task("retrieval")
    splits = task.load_splits(world / "data")
    cfg = upop.UPopConfig(search_epochs=2, batch_size=8, interval=2)
    runs = [Run(model, task, splits["train"], splits["val"], cfg, processor, tmp_path) for _ in range(2)]
    for run, scale in zip(runs, (2.0**7, 2.0**16)):
        run.acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    runs[0].acc.scaler.scale(torch.ones(()))  # the scale tensor is made on first use
    runs[0].acc.scaler.update(new_scale=12.0)
    saved = runs[0].scaler_state()
    assert saved is not None and saved["scale"] == 12.0
    runs[1].load_scaler({"scaler": saved})
    assert runs[1].acc.scaler.get_scale() == 12.0
    assert runs[1].scaler_state() == saved
