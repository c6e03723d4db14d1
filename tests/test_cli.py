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

from upop.cli import main

from ._families import clip_world

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
    assert abs(report["achieved_ratio"] - 0.5) <= 0.01
    for key in ("params", "flops", "latency_ms", "metrics"):
        assert key in report["dense"] and key in report["compressed"]
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert set(report["compressed"]["metrics"]) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert (out / "report.md").is_file() and (out / "allocation.png").stat().st_size > 1000
    assert (out / "log.jsonl").read_text().count('"phase": "search"') == 16
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
    from upop.models import load_any

    model, processor = load_any(world / "model")
    result = compress(model, "retrieval", world / "data", processor=processor, out_dir=tmp_path / "api",
                      config=upop.UPopConfig(search_epochs=1, retrain_epochs=0, batch_size=8, ratio=0.3), progress=False)
    assert abs(result.report["achieved_ratio"] - 0.3) <= 0.01
    assert type(result.model).__name__ == "CLIPModel"


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "upop", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def test_sigkill_during_search_then_resume_gives_the_same_plan(world, tmp_path):
    args = ["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
            "--search-epochs", "6", "--retrain-epochs", "1", "--batch-size", "4", "--lr", "1e-3",
            "--checkpoint-every", "3", "--no-progress", "--ratio", "0.5", "--latency-time", "0.02"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = _run_cli([*args, "--out", str(ref)])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    proc = _run_cli([*args, "--out", str(killed)])
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.is_file() and log.read_text().count('"phase": "search"') >= 20:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = log.read_text().count('"phase": "search"')
    assert 20 <= lines < 96, "the kill must land during the search"
    assert not (killed / "report.json").exists()
    proc = _run_cli([*args, "--out", str(killed), "--resume"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    plan_ref = json.loads((ref / "compressed" / "upop_plan.json").read_text())
    plan_resumed = json.loads((killed / "compressed" / "upop_plan.json").read_text())
    assert plan_resumed["groups"] == plan_ref["groups"]
    a = json.loads((ref / "report.json").read_text())["compressed"]["metrics"]
    b = json.loads((killed / "report.json").read_text())["compressed"]["metrics"]
    assert a == pytest.approx(b, abs=1e-6)


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
