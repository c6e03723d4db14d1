"""The command line end to end on a tiny CLIP and tiny Shapes data: compress, evaluate, resume
after SIGKILL, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from upop.cli.main import main
from upop.checkpoint.folder import WEIGHTS_FILE

from ._families import clip_world, largest_chunk_share

TINY = ["--search-epochs", "2", "--retrain-epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--eval-batch-size", "32",
        "--latency-time", "0.02",
        "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = clip_world(tmp_path_factory.mktemp("world"))
    return root


def _compress(world, out, *extra):
    return main(["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
                 "--out", str(out), *TINY, *extra])


def test_compress_then_evaluate_reproduces_the_report(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert _compress(world, out, "--ratio", "0.5") == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.5 <= report["achieved_ratio"] < 0.5 + largest_chunk_share(world / "model", report)
    assert report["round_to"] == {"setting": "auto", "used": 2, "why": report["round_to"]["why"]}
    assert all(len(g["kept"]) % 2 == 0 for g in json.loads((out / "compressed" / "upop_plan.json").read_text())["groups"].values())
    for key in ("params", "flops", "latency_ms", "metrics"):
        assert key in report["dense"] and key in report["compressed"]
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert set(report["compressed"]["metrics"]) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert (out / "report.md").is_file() and (out / "allocation.png").stat().st_size > 1000
    card = (out / "compressed" / "README.md").read_text()  # the model card carries the run's table
    assert "| r_mean |" in card and "| dense | compressed |" in card and "tags:\n- upop" in card
    assert (out / "log.jsonl").read_text().count('"phase": "search"') == 16
    # the dense model for the paired latency was kept on disk during the run, not in memory, and is gone
    assert not (out / "state" / "dense-model").exists()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", "retrieval", "--data", str(world / "data")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(report["compressed"]["metrics"], abs=1e-9)

    import upop
    import transformers

    model = upop.load_compressed(out / "compressed")
    assert type(model) is transformers.CLIPModel
    assert (out / "compressed" / "tokenizer.json").is_file()


def test_python_api_does_the_same_in_three_lines(world, tmp_path):
    import upop
    from upop.api import compress
    from upop.models.folders import load_any

    model, processor = load_any(world / "model")
    result = compress(model, "retrieval", world / "data", processor=processor, out_dir=tmp_path / "api",
                      config=upop.UPopConfig(search_epochs=1, retrain_epochs=0, batch_size=8, ratio=0.3), progress=False)
    assert 0.3 <= result.report["achieved_ratio"] < 0.3 + largest_chunk_share(world / "model", result.report)
    assert type(result.model).__name__ == "CLIPModel"


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "upop", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


SIGKILL_ARGS = ["--search-epochs", "4", "--retrain-epochs", "3", "--batch-size", "4", "--lr", "1e-3",
                "--checkpoint-every", "3", "--no-progress", "--ratio", "0.5", "--latency-time", "0.02"]
# where to kill: (phase, lines of that phase in log.jsonl before the kill, lines the phase has in all)
KILL_POINTS = {"during the search": ("search", 20, 64), "during the retraining": ("retrain", 20, 48)}


@pytest.fixture(scope="module")
def sigkill_reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigkill") / "ref"
    proc = _run_cli(["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
                     *SIGKILL_ARGS, "--out", str(out)])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return out


@pytest.mark.parametrize("where", [pytest.param(w, marks=[pytest.mark.slow] if w != "during the retraining" else [])
                                   for w in sorted(KILL_POINTS)])  # one stop point in the default suite, as for SIGTERM
def test_sigkill_then_resume_gives_the_same_result(where, world, sigkill_reference, tmp_path):
    from safetensors.torch import load_file

    phase, at, total = KILL_POINTS[where]
    args = ["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
            *SIGKILL_ARGS, "--out", str(tmp_path / "killed")]
    proc = _run_cli(args)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.is_file() and log.read_text().count(f'"phase": "{phase}"') >= at:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = log.read_text().count(f'"phase": "{phase}"')
    assert at <= lines < total, f"the kill must land {where}"
    assert not (tmp_path / "killed" / "report.json").exists()
    assert (tmp_path / "killed" / "state" / "dense-model" / "config.json").is_file()  # the resume measures against it
    proc = _run_cli([*args, "--resume"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    ref, killed = sigkill_reference / "compressed", tmp_path / "killed" / "compressed"
    assert json.loads((killed / "upop_plan.json").read_text())["groups"] == \
        json.loads((ref / "upop_plan.json").read_text())["groups"]
    a, b = load_file(str(ref / WEIGHTS_FILE)), load_file(str(killed / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_folder_holding_another_run(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert _compress(world, out, "--search-epochs", "1", "--retrain-epochs", "0") == 0
    capsys.readouterr()
    assert _compress(world, out, "--search-epochs", "1", "--retrain-epochs", "0") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert _compress(world, out, "--search-epochs", "1", "--retrain-epochs", "0", "--overwrite") == 0
    (out / "precious.txt").write_text("user data")
    assert _compress(world, out, "--search-epochs", "1", "--retrain-epochs", "0", "--overwrite") == 2
    assert (out / "precious.txt").is_file()
