"""scripts/gpu_check.py: its CPU dry run end to end, and how it reads a run's log and report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load_script():
    """The script as a module (registered first: its dataclass looks its module up)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def test_cpu_dry_run_checks_every_phase_on_the_cpu(tmp_path):
    """The script end to end on the CPU: every run passes, with every phase on the CPU."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--work", str(tmp_path / "work"),
           "--families", "clip,vit"]
    runs = [("clip", "fp32", 1), ("clip", "bf16", 1), ("vit", "fp32", 1), ("vit", "bf16", 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["ok"] is True
    assert [(r["family"], r["precision"], r["processes"]) for r in result["runs"]] == runs
    for r in result["runs"]:
        assert r["ok"] is True and r["reason"] == "" and r["device"] == "cpu", r
        assert list(r["phases"]) == list(gpu_check.PHASES)
        assert all(p["device"] == "cpu" and p["peak_memory_mb"] is None and p["seconds"] > 0
                   for p in r["phases"].values()), r["phases"]
        # batches of 4: clip trains on 32 images x 2 captions (one sample per pair), vit on 32 images
        assert [r["phases"][p]["steps"] for p in ("search", "retrain")] == ([16, 16] if r["family"] == "clip" else [8, 8])
        assert [r["phases"][p]["precision"] for p in gpu_check.PHASES] == ["fp32", r["precision"], r["precision"],
                                                                          "fp32", "fp32"]
        assert r["phases"]["search"]["steps_per_s"] > 0
    assert f"{len(runs)}/{len(runs)} runs ok" in proc.stdout
    assert proc.stdout.count(" ok (") == len(runs)  # one progress line per run


def _good_log(device: str = "cpu", precision: str = "fp32") -> list[dict]:
    records = []
    for phase in gpu_check.PHASES:
        ran_at = precision if phase in ("search", "retrain") else "fp32"  # evaluation runs in fp32
        records.append({"phase": "device", "of": phase, "device": device, "dtype": "torch.float32", "precision": ran_at})
        steps = 4 if phase in ("search", "retrain") else None
        records.append({"phase": "phase_end", "of": phase, "seconds": 0.5, "steps": steps,
                        "peak_memory_mb": 12.5 if device.startswith("cuda") else None})
    return records


def _write_run(folder: Path, records: list[dict], report: dict | None) -> Path:
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    return folder


def _drop_end(phase):
    return lambda rs: [r for r in rs if not (r["phase"] == "phase_end" and r["of"] == phase)]


def _set(phase, **values):
    return lambda rs: [{**r, **values} if r["phase"] == "device" and r["of"] == phase else r for r in rs]


# (case, change to a good CUDA log, report, expected reason; "" = ok)
CHECKS = [
    ("good", lambda rs: rs, {"device": "cuda:0", "processes": 1}, ""),
    ("phase on the cpu", _set("latency", device="cpu"), {"device": "cuda:0", "processes": 1},
     "phase 'latency' ran on 'cpu', expected 'cuda'"),
    ("no phase_end", _drop_end("final_eval"), {"device": "cuda:0", "processes": 1},
     "log.jsonl has no phase_end record for phase 'final_eval'"),
    ("no device record", lambda rs: [r for r in rs if r.get("of") != "dense_eval" or r["phase"] != "device"],
     {"device": "cuda:0", "processes": 1}, "log.jsonl has no device record for phase 'dense_eval'"),
    ("other precision", _set("retrain", precision="fp32"), {"device": "cuda:0", "processes": 1},
     "phase 'retrain' ran at precision 'fp32', expected 'bf16'"),
    ("report on the cpu", lambda rs: rs, {"device": "cpu", "processes": 1}, "report.json device is 'cpu', expected 'cuda'"),
    ("one process of two", lambda rs: rs, {"device": "cuda:0", "processes": 2},
     "report.json processes is 2, expected 1"),
]


@pytest.mark.parametrize("change,report,reason", [c[1:] for c in CHECKS], ids=[c[0] for c in CHECKS])
def test_check_run_reads_the_device_of_every_phase(change, report, reason, tmp_path):
    folder = _write_run(tmp_path / "run", change(_good_log("cuda:0", "bf16")), report)
    result = gpu_check.RunResult("vit", "classification", "bf16", 1)
    gpu_check.check_run(result, folder, "cuda")
    assert (result.ok, result.reason) == (reason == "", reason)
    if result.ok:
        assert result.peak_memory_mb == 12.5 and result.device == "cuda:0"
        assert result.phases["search"] == {"device": "cuda:0", "dtype": "torch.float32", "precision": "bf16",
                                           "seconds": 0.5, "steps": 4, "steps_per_s": 8.0, "peak_memory_mb": 12.5}
        assert result.phases["final_eval"]["precision"] == "fp32"
        assert result.phases["latency"]["steps"] is None and result.phases["latency"]["steps_per_s"] is None


@pytest.mark.parametrize("log,report,reason", [
    ('{"phase": "device"}\nnot json\n', {}, "log.jsonl line 2 is not a JSON object: 'not json'"),
    ("[1, 2]\n", {}, "log.jsonl line 1 is not a JSON object: '[1, 2]'"),
    (None, {}, "No such file or directory"),
])
def test_check_run_turns_a_broken_run_folder_into_a_reason(log, report, reason, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    if log is not None:
        (folder / "log.jsonl").write_text(log)
    result = gpu_check.RunResult("clip", "retrieval", "fp32", 1)
    gpu_check.check_run(result, folder, "cpu")
    assert not result.ok and reason in result.reason


@pytest.mark.parametrize("code,timeout,reason", [
    ("import sys; print('Traceback', file=sys.stderr); sys.exit('upop: error: no such folder')", 60,
     "exit code 1: upop: error: no such folder"),
    ("import time; time.sleep(30)", 0.5, "timed out after 0.5 s"),
], ids=["crash", "timeout"])
def test_a_crashing_or_hanging_run_is_recorded_with_a_reason(code, timeout, reason, tmp_path, monkeypatch):
    """A run's failure becomes its reason (the other runs go on); the command is replaced by a
    tiny stand-in so that no model is trained."""
    monkeypatch.setattr(gpu_check, "compress_command", lambda *args: [sys.executable, "-c", code])
    result = gpu_check.RunResult("vit", "classification", "fp32", 1)
    gpu_check.run_one(result, tmp_path / "model", tmp_path / "data", tmp_path, "cpu", dict(os.environ), timeout)
    assert (result.ok, result.reason, result.phases) == (False, reason, {})
    assert result.wall_seconds > 0


@pytest.mark.parametrize("processes,launcher", [
    (1, [sys.executable, "-m", "upop"]),
    (2, [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "upop"]),
])
def test_compress_command_launches_one_or_several_processes(processes, launcher, tmp_path):
    cmd = gpu_check.compress_command(tmp_path / "m", tmp_path / "d", tmp_path / "o", "vqa", "fp16", processes)
    assert cmd[:len(launcher)] == launcher
    rest = cmd[len(launcher):]
    assert rest[:9] == ["compress", "--model", str(tmp_path / "m"), "--task", "vqa", "--data", str(tmp_path / "d"),
                        "--out", str(tmp_path / "o")]
    assert rest[rest.index("--precision") + 1] == "fp16" and rest[rest.index("--search-epochs") + 1] == "1"


@pytest.mark.parametrize("text,expected", [
    ("Traceback\n  File x\nRuntimeError: boom\n\n", "RuntimeError: boom"),
    ("bad\x1b[31m red\x00", "bad\\x1b[31m red\\x00"),
    ("", "(no output)"),
    ("x" * 400, "x" * 300 + "..."),
])
def test_one_line_keeps_the_last_line_escaped(text, expected):
    assert gpu_check.one_line(text) == expected


@pytest.mark.parametrize("argv,message", [
    (["--families", "clip,gpt2"], "--families 'clip,gpt2': unknown or empty ('gpt2')"),
    (["--families", ","], "--families ',': unknown or empty (none given)"),
    (["--precisions", "fp8"], "--precisions 'fp8': unknown or empty ('fp8'); choose from: fp32, bf16, fp16"),
    (["--timeout", "0"], "--timeout 0.0: need a positive number of seconds"),
])
def test_bad_options_fail_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()[-1]) < 300


def test_defaults_cover_every_family_with_a_task_and_the_cpu_runs_fp32_and_bf16():
    from upop.models.folders import FAMILIES
    from upop.tasks import TASKS

    assert set(gpu_check.FAMILY_TASKS) == set(FAMILIES) and set(gpu_check.FAMILY_TASKS.values()) == set(TASKS)
    assert gpu_check.parse_args([]).precisions == ["fp32", "bf16", "fp16"]
    assert gpu_check.parse_args(["--cpu"]).precisions == ["fp32", "bf16"]
