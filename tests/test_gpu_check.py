"""scripts/gpu_check.py: its checks pass on the CPU, each check fails on a wrong outcome (a planted
fault), and the helpers read a run's log and report as they should."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load_script():
    """The script as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()

#: the checks too long for the fast suite (each several compress runs), with what they cost; every
#: other check runs in the module's session, so a new check is tested end to end by default
HEAVY = {"resume": "3 runs", "registry": "one run per registered pair", "multi-gpu": "2 runs under torchrun"}
CHEAP = [name for name in gpu_check.CHECKS if name not in HEAVY]


def _onnx_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One CPU session of every cheap check: (process, gpu-check.json, measured values by check)."""
    root = tmp_path_factory.mktemp("gpu-check")
    out = root / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--only", ",".join(CHEAP), "--out", str(out),
           "--work", str(root / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text()) if out.is_file() else {}
    return proc, result, {c["name"]: c["measured"] for c in result.get("checks", [])}


def test_every_cheap_check_passes_on_the_cpu(session):
    proc, result, measured = session
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import torch
    import transformers

    assert (result["device"], result["profile"], result["gpus"], result["plant"]) == ("cpu", "cpu", 0, None)
    assert (result["torch"], result["transformers"]) == (torch.__version__, transformers.__version__)
    assert result["ok"] is True and [c["name"] for c in result["checks"]] == CHEAP
    for check in result["checks"]:
        skipped_ok = check["name"] == "export" and not _onnx_installed()
        assert check["ok"] is True and check["skipped"] is skipped_ok and check["planted"] is False, check
        assert check["seconds"] > 0
        assert check["reason"] == "" or skipped_ok
    # one table row per check (name, result, seconds, values), then the count
    lines = [line.split() for line in proc.stdout.splitlines()]
    rows = {words[0]: words[1] for words in lines if words and words[0] in CHEAP}  # "name: ok" lines excluded
    assert rows == {name: "skipped:" if name == "export" and not _onnx_installed() else "ok" for name in CHEAP}
    assert f"{len(CHEAP)}/{len(CHEAP)} checks ok" in proc.stdout


def test_the_cpu_session_measured_what_the_checks_claim(session):
    """The values behind the verdicts: bf16 training on the CPU, the latency batch, the evaluate
    metrics, a pruned Trainer model, three positive step rates."""
    _, _, measured = session
    half = measured["vit-fp16-clip"]
    assert half["phases"]["search"]["precisions"] == ["bf16"] == half["phases"]["retrain"]["precisions"]
    assert half["search_steps_logged"] == half["phases"]["search"]["steps"] == 8  # 32 images / batch 4
    assert half["skipped_steps"] == 0  # bf16 has fp32's range: no step overflows
    latency = measured["clip-latency"]["report"]
    assert latency["cost"] == "latency" and latency["latency_batch"] == 32 and latency["speedup"] > 0
    evaluate = measured["evaluate"]
    tolerance = gpu_check.EVALUATE_TOLERANCE
    assert evaluate["evaluate"]["metrics"] == pytest.approx(evaluate["report_metrics"], abs=tolerance)
    trainer = measured["trainer"]
    assert trainer["steps"] == gpu_check.TRAINER_STEPS and trainer["params_after"] < trainer["params_dense"]
    assert trainer["search_steps"] == gpu_check.TRAINER_STEPS // 2
    rates = measured["throughput"]
    assert all(rates[f"{k}_steps_per_s"] > 0 for k in ("finetune", "search", "retrain"))
    assert rates["pruned_params"] < rates["dense_params"]
    if _onnx_installed():
        export = measured["export"]
        assert export["device_after"] == export["device_before"] == "cpu" and export["file_bytes"] > 0
        assert all(p["relative"] <= export["tolerance"] for p in export["parity"])


@pytest.mark.parametrize("profile", list(gpu_check.PROFILES))
@pytest.mark.parametrize("name", list(gpu_check.CHECKS))
def test_each_check_fails_on_its_planted_fault(name, profile):
    """Every check under both rule sets: its example outcome passes, the same outcome with the
    check's planted fault fails (the GPU's rules: a speedup <= 1, a search 2x slower...)."""
    check, rules = gpu_check.CHECKS[name], gpu_check.PROFILES[profile]
    good = check.example(rules)
    assert check.judge(copy.deepcopy(good), rules) == ""
    assert check.judge(check.plant(copy.deepcopy(good), rules), rules) != ""
    assert check.headline(good, rules)


@pytest.mark.parametrize("name", CHEAP)
def test_each_check_fails_on_its_fault_planted_in_a_real_outcome(name, session):
    """The session's real CPU outcomes, judged again: right as measured, wrong once planted."""
    _, _, measured = session
    check = gpu_check.CHECKS[name]
    if name == "export" and not _onnx_installed():
        pytest.skip("onnxruntime is not installed: the export check was skipped")
    assert check.judge(copy.deepcopy(measured[name]), gpu_check.CPU) == ""
    why = check.judge(check.plant(copy.deepcopy(measured[name]), gpu_check.CPU), gpu_check.CPU)
    assert why != ""


def test_plant_fails_the_check_and_the_exit_code(tmp_path, capsys):
    """``--plant`` end to end (the cheapest check, in this process)."""
    out = tmp_path / "check.json"
    code = gpu_check.main(["--cpu", "--only", "throughput", "--plant", "throughput", "--out", str(out),
                           "--work", str(tmp_path / "work")])
    assert code == 1
    [check] = json.loads(out.read_text())["checks"]
    assert check["ok"] is False and check["planted"] is True
    assert check["reason"] == "search steps/s is 0.0, not a positive number"
    assert "FAILED: search steps/s is 0.0" in capsys.readouterr().out


def test_a_planted_fault_in_a_skipped_check_is_a_failure(tmp_path):
    """A skipped check passes, but a fault planted into it must not: it was never judged."""
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu", "--only", "multi-gpu", "--out", str(out), "--work", str(tmp_path / "a")]) == 0
    [check] = json.loads(out.read_text())["checks"]
    assert check["skipped"] is True and check["ok"] is True and "needs 2 GPUs, 0 visible" in check["reason"]
    assert gpu_check.main(["--cpu", "--only", "multi-gpu", "--plant", "multi-gpu", "--out", str(out),
                           "--work", str(tmp_path / "b")]) == 1
    [check] = json.loads(out.read_text())["checks"]
    assert check["ok"] is False and "so the planted fault was not judged" in check["reason"]


def _fake_check(measure, judge=lambda m, p: ""):
    return gpu_check.Check("fake", "a stand-in", measure, judge, lambda m, p: m, lambda p: {}, lambda m, p: "")


def test_a_check_that_breaks_is_a_failure_with_its_reason(tmp_path):
    ws = gpu_check.Workspace(tmp_path, gpu_check.CPU, dict(os.environ), 10.0, 1)

    def boom(ws):
        raise RuntimeError("boom\nsecond line")

    result = gpu_check.run_check(_fake_check(boom), ws)
    assert (result.ok, result.reason) == (False, "the check raised RuntimeError: second line")
    result = gpu_check.run_check(_fake_check(lambda ws: {}, lambda m, p: m["missing"]), ws)
    assert (result.ok, result.reason) == (False, "the outcome is incomplete: KeyError: 'missing'")


# --- reading a run: log, report, judge ----------------------------------------------------------------------


def _log(device: str = "cuda:0", precision: str = "bf16") -> list[dict]:
    records = []
    for phase in gpu_check.PHASES:
        ran_at = precision if phase in gpu_check.TRAINING_PHASES else "fp32"  # evaluation runs in fp32
        records.append({"phase": "device", "of": phase, "device": device, "dtype": "torch.float32",
                        "precision": ran_at})
        if phase in gpu_check.TRAINING_PHASES:
            records += [{"phase": phase, "step": s, "loss": 2.0 + s} for s in range(4)]
        records.append({"phase": "phase_end", "of": phase, "seconds": 0.5,
                        "steps": 4 if phase in gpu_check.TRAINING_PHASES else None,
                        "peak_memory_mb": 12.5 if device.startswith("cuda") else None})
    return records


REPORT = {"device": "cuda:0", "processes": 1, "target_ratio": 0.5, "achieved_ratio": 0.505, "cost": "params",
          "dense": {"params": 100, "metrics": {"top1": 20.0}}, "compressed": {"params": 60, "metrics": {"top1": 15.0}},
          "speedup": 1.2, "latency_noisy": False, "latency": {"batch": 1}}


def _run_folder(folder: Path, records: list[dict], report: dict | None) -> Path:
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    return folder


def _drop(phase, kind):
    return lambda rs: [r for r in rs if not (r["phase"] == kind and r.get("of") == phase)]


def _set(phase, **values):
    return lambda rs: [{**r, **values} if r["phase"] == "device" and r["of"] == phase else r for r in rs]


def _report(**changes):
    return lambda report: {**report, **changes}


def _compressed(**changes):
    return lambda report: {**report, "compressed": {**report["compressed"], **changes}}


# (case, change to a good CUDA log, change to its report, expected reason; "" = passes)
RUNS = [
    ("good", lambda rs: rs, lambda r: r, ""),
    ("phase on the cpu", _set("latency", device="cpu"), lambda r: r, "phase 'latency' ran on 'cpu', expected 'cuda'"),
    ("no phase_end", _drop("final_eval", "phase_end"), lambda r: r,
     "log.jsonl has no phase_end record for phase 'final_eval'"),
    ("no device record", _drop("dense_eval", "device"), lambda r: r,
     "log.jsonl has no device record for phase 'dense_eval'"),
    ("other precision", _set("retrain", precision="fp32"), lambda r: r,
     "phase 'retrain' ran at precision fp32, expected 'bf16'"),
    ("a NaN loss", lambda rs: rs + [{"phase": "retrain", "step": 9, "loss": float("nan")}], lambda r: r,
     "1 of 9 logged training losses are not finite"),
    ("report on the cpu", lambda rs: rs, _report(device="cpu"), "report.json device is 'cpu', expected 'cuda'"),
    ("one process of two", lambda rs: rs, _report(processes=2), "report.json processes is 2, expected 1"),
    ("a NaN metric", lambda rs: rs, _compressed(metrics={"top1": float("nan")}),
     "report.json compressed metric top1 is nan, not finite"),
    ("no metrics", lambda rs: rs, _compressed(metrics={}), "report.json has no compressed metrics"),
    ("not smaller", lambda rs: rs, _compressed(params=100),
     "the compressed model has 100 parameters, the dense one 100: not fewer"),
]


@pytest.mark.parametrize("change,report,reason", [c[1:] for c in RUNS], ids=[c[0] for c in RUNS])
def test_judge_run_reads_the_log_and_report_of_a_run_folder(change, report, reason, tmp_path):
    outcome = {"exit": 0, **gpu_check.read_run(_run_folder(tmp_path / "run", change(_log()), report(REPORT)))}
    assert gpu_check.judge_run(outcome, gpu_check.GPU, "bf16") == reason
    if not reason:
        assert outcome["phases"]["search"] == {"devices": ["cuda:0"], "precisions": ["bf16"], "ended": True,
                                               "seconds": 0.5, "steps": 4, "steps_per_s": 8.0, "peak_memory_mb": 12.5}
        assert outcome["phases"]["final_eval"]["precisions"] == ["fp32"]
        assert (outcome["losses"], outcome["search_steps_logged"], outcome["skipped_steps"]) == (8, 4, None)


def test_summarize_log_counts_agreement_and_skipped_steps():
    records = _log() + [{"phase": "search", "step": 1, "masks_identical": True, "loss": 2.0},
                        {"phase": "prune", "plans_identical": False},
                        {"phase": "sync", "weights_identical": True},
                        {"phase": "phase_end", "of": "search", "seconds": 0.0, "steps": 0, "skipped_steps": 3}]
    summary = gpu_check.summarize_log(records)
    assert (summary["agreement_records"], summary["disagreements"], summary["skipped_steps"]) == (3, 1, 3)


@pytest.mark.parametrize("log,report,reason", [
    ('{"phase": "device"}\nnot json\n', {}, "log.jsonl line 2 is not a JSON object: 'not json'"),
    ("[1, 2]\n", {}, "log.jsonl line 1 is not a JSON object: '[1, 2]'"),
    (None, {}, "No such file or directory"),
])
def test_a_broken_run_folder_becomes_a_reason(log, report, reason, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    if log is not None:
        (folder / "log.jsonl").write_text(log)
    outcome = {"exit": 0, **gpu_check.read_run(folder)}
    assert reason in gpu_check.judge_run(outcome, gpu_check.CPU, "fp32")


@pytest.mark.parametrize("code,timeout,reason", [
    ("import sys; print('Traceback', file=sys.stderr); sys.exit('upop: error: no such folder')", 60,
     "exit code 1: upop: error: no such folder"),
    ("import time; time.sleep(30)", 0.5, "timed out after 0.5 s"),
], ids=["crash", "timeout"])
def test_a_crashing_or_hanging_process_is_recorded_with_a_reason(code, timeout, reason):
    proc = gpu_check.run_process([sys.executable, "-c", code], dict(os.environ), timeout)
    assert proc["error"] == reason and proc["exit"] != 0 and proc["seconds"] > 0
    assert gpu_check.judge_run({"exit": proc["exit"], "error": proc["error"]}, gpu_check.CPU, "fp32") == reason


@pytest.mark.parametrize("processes,script,launcher", [
    (1, None, [sys.executable, "-m", "upop"]),
    (1, Path("wrap.py"), [sys.executable, "wrap.py"]),
    (2, None, [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "upop"]),
])
def test_compress_command_launches_one_or_several_processes(processes, script, launcher, tmp_path):
    cmd = gpu_check.compress_command(tmp_path / "m", tmp_path / "d", tmp_path / "o", "vqa", ["--precision", "fp16"],
                                     processes, script)
    assert cmd[:len(launcher)] == launcher
    rest = cmd[len(launcher):]
    assert rest[:9] == ["compress", "--model", str(tmp_path / "m"), "--task", "vqa", "--data", str(tmp_path / "d"),
                        "--out", str(tmp_path / "o")]
    assert rest[-2:] == ["--precision", "fp16"] and rest[rest.index("--ratio") + 1] == str(gpu_check.RATIO)


def test_resume_judge_needs_a_stop_in_the_search_and_a_resume_from_it():
    good = gpu_check.CHECKS["resume"].example(gpu_check.GPU)
    for change, reason in [
        (lambda m: m["interrupted"].update(exit=0), f"the interrupted run exited 0, not {128 + signal.SIGTERM}"),
        (lambda m: m["interrupted"].update(message="upop: stopped by SIGTERM after the retraining"),
         "did not stop in the search"),
        (lambda m: m.update(resumed_at=None), "did not continue the search from a saved step"),
        (lambda m: m["resumed"]["report"].update(compressed_metrics={"top1": 1.0}), "metrics"),
    ]:
        m = copy.deepcopy(good)
        change(m)
        assert reason in gpu_check.judge_resume(m, gpu_check.GPU)


@pytest.mark.parametrize("text,expected", [
    ("Traceback\n  File x\nRuntimeError: boom\n\n", "RuntimeError: boom"),
    ("bad\x1b[31m red\x00", "bad\\x1b[31m red\\x00"),
    ("", "(no output)"),
    ("x" * 400, "x" * 300 + "..."),
])
def test_one_line_keeps_the_last_line_escaped(text, expected):
    assert gpu_check.one_line(text) == expected


@pytest.mark.parametrize("argv,message", [
    (["--only", "resume,gpt2"], "--only 'resume,gpt2': unknown or empty ('gpt2'); choose from: vit-fp16-clip"),
    (["--only", ","], "--only ',': unknown or empty (none given)"),
    (["--only", "trainer", "--plant", "resume"], "--plant 'resume': not one of the checks run (trainer)"),
    (["--timeout", "0"], "--timeout 0.0: need a positive number of seconds"),
    (["--jobs", "0"], "--jobs 0: need an integer >= 1"),
])
def test_bad_options_fail_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()[-1]) < 400


def test_defaults_run_every_check():
    assert gpu_check.parse_args([]).only == list(gpu_check.CHECKS)
    assert gpu_check.parse_args([]).plant is None


def test_the_registry_check_runs_every_registered_pair():
    from upop.arch import TINY, pairs

    assert gpu_check.registry_pairs() == pairs()
    made_for = [t for t in TINY.values() if t.data_task is not None]  # the others serve no task yet
    assert {tiny for tiny, _ in gpu_check.registry_pairs()} == {t.name for t in made_for}
    assert {(t.name, t.data_task) for t in made_for} <= set(gpu_check.registry_pairs())
    # a session that ran fewer pairs than the registry declares fails
    m = gpu_check.CHECKS["registry"].example(gpu_check.GPU)
    m["pairs"].popitem()
    assert "are not the registry's" in gpu_check.judge_registry(m, gpu_check.GPU)


@pytest.mark.slow
def test_resume_registry_and_multi_gpu_pass_on_the_cpu(tmp_path):
    """The heavy checks end to end on the CPU: SIGTERM and --resume, every registered pair, and the
    two-process runs (torchrun with gloo)."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--multi", "--only", ",".join(HEAVY), "--jobs", "2",
           "--out", str(out), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert list(checks) == list(HEAVY) and all(c["ok"] and not c["skipped"] for c in checks.values()), checks
    resume = checks["resume"]["measured"]
    assert resume["interrupted"]["exit"] == 143 and 0 < resume["resumed_at"] < 8
    assert resume["kept"]["reference"] == resume["kept"]["resumed"] != {}
    assert len(checks["registry"]["measured"]["pairs"]) == len(gpu_check.registry_pairs())
    assert all(r["report"]["processes"] == 2 and r["agreement_records"] > 0
               for r in checks["multi-gpu"]["measured"]["pairs"].values())
