"""GPU check: a fixed list of short runs on one GPU, each asserting what came out, not only that it ran.

    python scripts/gpu_check.py [--out gpu-check.json]    # on a CUDA machine (make gpu-check), about 5 minutes
    python scripts/gpu_check.py --cpu                     # the same list on the CPU (the test suite runs it)
    python scripts/gpu_check.py --only resume,evaluate    # a subset

Each check (:data:`CHECKS`) runs something, reads what it produced (``report.json``, ``log.jsonl``,
``upop_plan.json``, the commands' output) into its *measured* values, and judges them:

- ``vit-fp16-clip``: tiny ViT, ``--precision fp16 --max-grad-norm 1.0``: every phase on the device,
  training in fp16, metrics and logged losses finite, achieved ratio within 0.01 of ``--ratio``,
  fewer parameters, every search step logged with a finite loss, and the search's count of skipped
  (non-finite, fp16-overflow) steps, ``skipped_steps`` of its summary record in ``log.jsonl``, is
  present and a count of those steps.
- ``clip-latency``: CLIP in bf16, ``--cost latency --latency-batch-size 32``: the report's budget is
  latency, its latency was timed at batch 32, and its speedup is finite and > 1. On a GPU the CLIP
  is base-size at 224 px: a tiny one is launch-bound there, as fast pruned as dense.
- ``resume``: SIGTERM right after the search's first checkpoint, then ``--resume``: the run stopped
  in the search, resumed from the saved step, and its plan (kept units of every group) and its
  report's metrics equal those of the same run uninterrupted. The three runs go through a small
  stand-in for upop's CLI (:data:`RESUME_WRAPPER`) that sends the signal and, on CUDA, asks for
  deterministic kernels (two uninterrupted runs must agree before a resumed one can be compared).
- ``evaluate``: ``upop evaluate`` of a run's compressed folder gives the report's metrics (+-1e-4).
- ``export``: ``export_onnx`` of a compressed model loaded on the device passes its ONNX Runtime
  parity check, and leaves the model where it was (device, dtype). Skipped without onnxruntime.
- ``trainer``: 20 steps of ``transformers.Trainer`` with ``add_upop`` (bf16) on a tiny ViT: the model
  ends pruned, with finite losses.
- ``throughput``: steps per second of plain fine-tuning, the UPop search and retraining of a
  ViT-Base (batch 32, 224 px, bf16), on upop's step loop (:class:`upop.engine.loop.StepLoop`);
  the search must keep within 1.10x of fine-tuning's step time.
- ``registry``: every (tiny model, task) pair the registry declares (:func:`upop.arch.pairs`)
  compresses in bf16 with every phase on the device, finite metrics and fewer parameters (run
  ``--jobs`` at a time: a tiny run is mostly interpreter start-up).
- ``multi-gpu`` (2+ GPUs): DINOv2 classification and BLIP retrieval under ``torchrun
  --nproc_per_node 2``: finite metrics, 2 processes, and every process held the same masks, plan
  and weights (the log's ``*_identical`` records).

``--cpu`` runs the same list on the CPU (runs see no GPU) with tiny models and the rules a CPU can
keep (:data:`CPU`): bf16 instead of fp16, fp32 elsewhere, and no speed rules: the speedup must only
be finite and > 0 and the step rates positive, since a tiny model on a shared CPU is timed mostly
in Python overhead and other processes' noise, faster pruned or not. ``multi-gpu`` is skipped
without 2 GPUs (``--multi`` runs it anyway, with ``--cpu`` as 2 CPU processes over gloo). The
hidden ``--plant CHECK`` plants a fault in that check's measured outcome before it is judged (the
tests prove every check can fail).

Writes ``--out`` (per check: name, ok, skipped, reason, seconds, measured values; the device, the
torch and transformers versions, the GPU count) after every check, prints one table, and exits 1
if a check failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


def _family_tasks() -> dict[str, str]:
    from upop.arch import TINY

    return {tiny.name: tiny.data_task for tiny in TINY.values()}


FAMILY_TASKS: dict[str, str] = _family_tasks()
"""Every registered tiny model with the task of its Shapes data (bert: the label-free task)."""

PHASES = ("dense_eval", "search", "retrain", "final_eval", "latency")
"""The phases of a run that must each report their device (log.jsonl ``device`` records)."""

TRAINING_PHASES = ("search", "retrain")
"""The phases that run at the requested precision (evaluation and latency run in fp32)."""

IMAGE_SIZE = 32
DATA_SIZES = {"train": 32, "val": 10, "test": 16}  # val 10: every Shapes class has a validation image
RATIO = 0.5
RATIO_TOLERANCE = 0.01
EVAL_BATCH = 8
EVALUATE_TOLERANCE = 1e-4
MAX_SEARCH_SLOWDOWN = 1.10
TRAINER_STEPS = 20
COMPRESS_OPTIONS = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--eval-batch-size",
                    str(EVAL_BATCH), "--ratio", str(RATIO), "--no-progress"]
MULTI_GPU_PAIRS = (("dinov2", "classification"), ("blip-retrieval", "retrieval"))
EVALUATED = ("vit", "classification")
"""The registry run whose compressed folder ``evaluate`` and ``export`` use."""


@dataclass(frozen=True)
class Profile:
    """The machine the checks run on and the rules that differ between a GPU and the CPU."""

    name: str
    device: str  # the device type every phase must report: "cuda" or "cpu"
    precision: str  # registry, resume and multi-gpu runs
    half: str  # vit-fp16-clip's --precision
    clip_precision: str
    latency_model: tuple[str, int]  # (size, image size) of clip-latency's CLIP
    latency_time: float  # --latency-time of the runs
    min_speedup: float  # clip-latency: the report's speedup must exceed this
    trainer_precision: str
    throughput: tuple[str, int, int]  # (size, image size, batch) of the throughput ViT
    throughput_steps: tuple[int, int, int]  # warm-up steps, rounds, steps per round
    max_search_slowdown: float | None  # search steps/s >= fine-tune steps/s / this (None: recorded only)
    jobs: int  # registry runs at a time


GPU = Profile(name="gpu", device="cuda", precision="bf16", half="fp16", clip_precision="bf16",
              # a base-size CLIP: a tiny one is launch-bound on a GPU, as fast pruned as dense
              latency_model=("base", 224), latency_time=0.5, min_speedup=1.0, trainer_precision="bf16",
              throughput=("base", 224, 32), throughput_steps=(3, 5, 5), max_search_slowdown=MAX_SEARCH_SLOWDOWN,
              jobs=4)
CPU = Profile(name="cpu", device="cpu", precision="fp32", half="bf16", clip_precision="fp32",
              # tiny models on a shared CPU: timings are noise, so only their sanity is judged
              latency_model=("tiny", IMAGE_SIZE), latency_time=0.02, min_speedup=0.0, trainer_precision="bf16",
              throughput=("tiny", IMAGE_SIZE, 8), throughput_steps=(2, 3, 4), max_search_slowdown=None, jobs=1)
PROFILES = {p.name: p for p in (GPU, CPU)}


class Skip(Exception):
    """A check that cannot run here (no onnxruntime, one GPU); its message says why."""


# --- runs: command lines, subprocesses, what a run folder says ----------------------------------------------


def one_line(text: str, limit: int = 300) -> str:
    """The last non-blank line of ``text`` (where a traceback or ``upop: error`` says what went
    wrong), with control characters escaped and cut to ``limit`` characters."""
    lines = [line for line in text.splitlines() if line.strip()]
    line = lines[-1].strip() if lines else "(no output)"
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def read_log(path: Path) -> list[dict]:
    """The records of a run's ``log.jsonl``; ValueError naming the first line that is not a JSON object."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path.name} line {number} is not a JSON object: {one_line(line, 80)!r}")
        records.append(record)
    return records


def summarize_log(records: list[dict]) -> dict:
    """What a run's log says: per phase of :data:`PHASES` the devices and precisions it ran at,
    seconds, steps, steps/s and peak memory (a phase without records is absent); the training
    losses logged and how many were not finite; the processes' agreement records (``*_identical``)
    and how many said no; the search's count of skipped steps (None where the log has none)."""
    phases: dict[str, dict] = {}
    for phase in PHASES:
        starts = [r for r in records if r.get("phase") == "device" and r.get("of") == phase]
        ends = [r for r in records if r.get("phase") == "phase_end" and r.get("of") == phase]
        if not starts and not ends:
            continue
        seconds = sum(float(r.get("seconds", 0.0)) for r in ends)
        counted = [r["steps"] for r in ends if r.get("steps") is not None]
        steps = sum(counted) if counted else None
        peaks = [float(r["peak_memory_mb"]) for r in ends if r.get("peak_memory_mb") is not None]
        phases[phase] = {
            "devices": sorted({str(r.get("device")) for r in starts}),
            "precisions": sorted({str(r.get("precision")) for r in starts}),
            "ended": bool(ends), "seconds": round(seconds, 4), "steps": steps,
            "steps_per_s": round(steps / seconds, 3) if steps and seconds > 0 else None,
            "peak_memory_mb": round(max(peaks), 1) if peaks else None,
        }
    losses = [r["loss"] for r in records if r.get("phase") in TRAINING_PHASES and "loss" in r]
    agreement = [bool(r[k]) for r in records for k in ("masks_identical", "plans_identical", "weights_identical")
                 if k in r]
    skipped = [r["skipped_steps"] for r in records if "skipped_steps" in r]
    return {"phases": phases,
            "losses": len(losses), "nonfinite_losses": sum(not _finite(v) for v in losses),
            "search_steps_logged": len({r.get("step") for r in records if r.get("phase") == "search" and "loss" in r}),
            "agreement_records": len(agreement), "disagreements": agreement.count(False),
            "skipped_steps": skipped[-1] if skipped else None}


def read_report(path: Path) -> dict:
    """The values of ``report.json`` the checks judge."""
    report = json.loads(path.read_text())
    dense, compressed = report.get("dense") or {}, report.get("compressed") or {}
    latency = report.get("latency") or {}
    return {"device": report.get("device"), "processes": report.get("processes"),
            "target_ratio": report.get("target_ratio"), "achieved_ratio": report.get("achieved_ratio"),
            "cost": report.get("cost"), "dense_params": dense.get("params"),
            "compressed_params": compressed.get("params"),
            "dense_metrics": dense.get("metrics") or {}, "compressed_metrics": compressed.get("metrics") or {},
            "speedup": report.get("speedup"), "latency_noisy": report.get("latency_noisy"),
            "latency_batch": latency.get("batch"), "skipped_steps": report.get("skipped_steps")}


def read_run(out: Path) -> dict:
    """The log summary and report values of the run folder ``out``; ``log_error`` / ``report_error``
    say what could not be read."""
    outcome: dict = {"folder": str(out)}
    try:
        outcome.update(summarize_log(read_log(out / "log.jsonl")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        outcome["log_error"] = one_line(str(exc))
    try:
        outcome["report"] = read_report(out / "report.json")
    except (OSError, ValueError, AttributeError) as exc:
        outcome["report_error"] = one_line(str(exc))
    return outcome


def compress_command(model: Path, data: Path, out: Path, task: str, extra: list[str], processes: int = 1,
                     script: Path | None = None) -> list[str]:
    """The ``upop compress`` command line of one run: ``python -m upop`` (or ``script``, a stand-in
    for upop's CLI), through torchrun for several processes."""
    entry = [str(script)] if script is not None else ["-m", "upop"]
    if processes == 1:
        launcher = [sys.executable, *entry]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        launcher = [torchrun, "--standalone", "--nproc_per_node", str(processes), *entry]
    return [*launcher, "compress", "--model", str(model), "--task", task, "--data", str(data), "--out", str(out),
            *COMPRESS_OPTIONS, *extra]


def run_process(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run ``cmd`` in its own process group (a timeout kills torchrun's workers with it); its exit
    code (None: timed out), output and seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        code = None
    return {"exit": code, "stdout": stdout, "stderr": stderr, "seconds": round(time.perf_counter() - start, 2),
            "error": f"timed out after {timeout:g} s" if code is None else
            ("" if code == 0 else f"exit code {code}: {one_line(stderr or stdout)}")}


class Workspace:
    """The folder of one check session: Shapes data per task, model folders, and compress runs,
    each made once and shared by the checks that use them."""

    def __init__(self, root: Path, profile: Profile, env: dict, timeout: float, jobs: int, gpus: int = 0,
                 multi: bool = False):
        self.root, self.profile, self.env, self.timeout, self.jobs = root, profile, env, timeout, jobs
        self.gpus, self.multi = gpus, multi
        self.runs: dict[str, dict] = {}

    def data(self, task: str) -> Path:
        """Tiny Shapes data of ``task`` (reused when complete)."""
        from upop.data import shapes_writer

        folder = self.root / "data" / task
        shapes_writer(task)(folder, image_size=IMAGE_SIZE, seed=0, **DATA_SIZES)
        return folder

    def model(self, tiny: str, size: str = "tiny", image_size: int = IMAGE_SIZE) -> Path:
        """A random model folder of the registered tiny model ``tiny`` at ``size``."""
        from transformers.utils import logging as hf_logging

        from upop.models.folders import make_model_folder

        hf_logging.disable_progress_bar()
        folder = self.root / "models" / f"{tiny}-{size}-{image_size}"
        if not (folder / "config.json").is_file():
            make_model_folder(tiny, folder, size=size, image_size=image_size)
        return folder

    def compress(self, key: str, tiny: str, task: str, extra: list[str], *, model: Path | None = None,
                 processes: int = 1, script: Path | None = None, env: dict | None = None,
                 folder: str | None = None) -> dict:
        """Run ``upop compress`` of ``tiny`` on ``task``'s data into ``runs/key`` (once per ``key``;
        ``folder``: into the existing ``runs/folder`` instead, e.g. for ``--resume``) and return its
        outcome: exit code, error line, output, seconds and :func:`read_run`."""
        if key in self.runs:
            return self.runs[key]
        out = self.root / "runs" / (folder or key)
        if folder is None:
            shutil.rmtree(out, ignore_errors=True)
        model = model or self.model(tiny)
        cmd = compress_command(model, self.data(task), out, task,
                               [*extra, "--latency-time", str(self.profile.latency_time)], processes, script)
        proc = run_process(cmd, {**self.env, **(env or {})}, self.timeout)
        outcome = {"pair": f"{tiny}/{task}", "exit": proc["exit"], "error": proc["error"],
                   "wall_seconds": proc["seconds"], "output": proc["stdout"] + proc["stderr"]}
        outcome.update(read_run(out))
        self.runs[key] = outcome
        return outcome

    def registry_run(self, tiny: str, task: str) -> dict:
        """The registry check's run of ``(tiny, task)``, at the profile's precision."""
        return self.compress(f"registry-{tiny}-{task}", tiny, task, ["--precision", self.profile.precision])


def compact(outcome: dict) -> dict:
    """What the JSON keeps of a run's outcome: all but its output, of which a failed run keeps the
    end (where the error is)."""
    kept = {k: v for k, v in outcome.items() if k != "output"}
    if outcome.get("exit") != 0:
        kept["output_tail"] = outcome.get("output", "")[-4000:]
    return kept


# --- judging -------------------------------------------------------------------------------------------------


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def judge_run(run: dict, profile: Profile, precision: str, processes: int = 1) -> str:
    """Why the run ``run`` (a :meth:`Workspace.compress` outcome) failed, or "": it exited 0, its
    log shows every phase on the profile's device and the training phases at ``precision``, no
    logged loss is non-finite, its report names the device and ``processes``, every metric is
    finite and the compressed model has fewer parameters."""
    if run.get("exit") != 0:
        return run.get("error") or f"exit code {run.get('exit')}"
    for key in ("log_error", "report_error"):
        if run.get(key):
            return run[key]
    for phase in PHASES:
        seen = run["phases"].get(phase)
        if seen is None or not seen["devices"]:
            return f"log.jsonl has no device record for phase {phase!r}"
        if not seen["ended"]:
            return f"log.jsonl has no phase_end record for phase {phase!r}"
        wrong = [d for d in seen["devices"] if not d.startswith(profile.device)]
        if wrong:
            return f"phase {phase!r} ran on {wrong[0]!r}, expected {profile.device!r}"
        if phase in TRAINING_PHASES and seen["precisions"] != [precision]:
            return f"phase {phase!r} ran at precision {', '.join(seen['precisions'])}, expected {precision!r}"
    if run["nonfinite_losses"]:
        return f"{run['nonfinite_losses']} of {run['losses']} logged training losses are not finite"
    report = run["report"]
    if not str(report["device"]).startswith(profile.device):
        return f"report.json device is {report['device']!r}, expected {profile.device!r}"
    if report["processes"] != processes:
        return f"report.json processes is {report['processes']!r}, expected {processes}"
    for which in ("dense", "compressed"):
        metrics = report[f"{which}_metrics"]
        if not metrics:
            return f"report.json has no {which} metrics"
        bad = [k for k, v in metrics.items() if not _finite(v)]
        if bad:
            return f"report.json {which} metric {bad[0]} is {metrics[bad[0]]!r}, not finite"
    if not (_finite(report["compressed_params"]) and _finite(report["dense_params"])
            and report["compressed_params"] < report["dense_params"]):
        return (f"the compressed model has {report['compressed_params']!r} parameters, the dense one "
                f"{report['dense_params']!r}: not fewer")
    return ""


def _first(*rules: Callable[[], str]) -> str:
    """The reason of the first rule that fails (the later ones may assume the earlier ones held)."""
    for rule in rules:
        reason = rule()
        if reason:
            return reason
    return ""


def judge_vit_half(m: dict, profile: Profile) -> str:
    """The run passes :func:`judge_run` at the half precision, lands within 0.01 of the ratio, and logged
    every search step and counted its skipped steps (a count of them)."""
    report = m.get("report") or {}

    def ratio() -> str:
        achieved, target = report.get("achieved_ratio"), report.get("target_ratio")
        if not (_finite(achieved) and _finite(target) and abs(achieved - target) <= RATIO_TOLERANCE):
            return f"achieved ratio {achieved!r} is not within {RATIO_TOLERANCE} of the target {target!r}"
        return ""

    def steps() -> str:
        planned = (m["phases"].get("search") or {}).get("steps")
        if m["search_steps_logged"] != planned:
            return f"{m['search_steps_logged']} search steps logged, {planned!r} run"
        skipped = m.get("skipped_steps")
        if not (isinstance(skipped, int) and not isinstance(skipped, bool) and 0 <= skipped <= planned):
            return f"skipped steps {skipped!r} is not a count of 0..{planned} search steps"
        return ""

    return _first(lambda: judge_run(m, profile, profile.half), ratio, steps)


def judge_clip_latency(m: dict, profile: Profile) -> str:
    """The run passes :func:`judge_run`; its report is in latency, timed at batch 32, and faster pruned."""
    def latency() -> str:
        report = m["report"]
        if report["cost"] != "latency":
            return f"report.json cost is {report['cost']!r}, expected 'latency'"
        if report["latency_batch"] != 32:
            return f"report.json latency batch is {report['latency_batch']!r}, expected 32"
        if not (_finite(report["speedup"]) and report["speedup"] > profile.min_speedup):
            return f"speedup {report['speedup']!r} is not a finite number above {profile.min_speedup:g}"
        return ""

    return _first(lambda: judge_run(m, profile, profile.clip_precision), latency)


def judge_resume(m: dict, profile: Profile) -> str:
    """Both finished runs pass :func:`judge_run`; the interrupted one stopped by SIGTERM in the search and
    the resumed one went on from the saved step to the uninterrupted run's plan and metrics."""
    def stop() -> str:
        stopped = m["interrupted"]
        if stopped["exit"] != 128 + signal.SIGTERM:
            return f"the interrupted run exited {stopped['exit']!r}, not {128 + signal.SIGTERM} (stopped by SIGTERM)"
        if "stopped by SIGTERM after search step" not in stopped["message"]:
            return f"the interrupted run did not stop in the search: {stopped['message']!r}"
        total = (m["reference"]["phases"].get("search") or {}).get("steps") or 0
        if not (isinstance(m["resumed_at"], int) and 0 < m["resumed_at"] < total):
            return f"the resumed run did not continue the search from a saved step (at {m['resumed_at']!r} of {total})"
        return ""

    def same() -> str:
        ref, res = m["kept"]["reference"], m["kept"]["resumed"]
        differ = sorted(g for g in set(ref) | set(res) if ref.get(g) != res.get(g))
        if differ:
            return f"the resumed plan differs from the uninterrupted one in {len(differ)} group(s), first {differ[0]}"
        a, b = m["reference"]["report"]["compressed_metrics"], m["resumed"]["report"]["compressed_metrics"]
        if a != b:
            return f"the resumed run's metrics {b} differ from the uninterrupted run's {a}"
        return ""

    return _first(lambda: judge_run(m["reference"], profile, profile.precision), stop,
                  lambda: judge_run(m["resumed"], profile, profile.precision), same)


def judge_evaluate(m: dict, profile: Profile) -> str:
    """``upop evaluate`` gave the same metric names as the report, each within :data:`EVALUATE_TOLERANCE`."""
    if m["run"].get("exit") != 0:
        return f"the run to evaluate failed: {m['run'].get('error')}"
    if m["evaluate"].get("error"):
        return f"upop evaluate failed: {m['evaluate']['error']}"
    report, evaluated = m["report_metrics"], m["evaluate"]["metrics"]
    if not report or set(report) != set(evaluated):
        return f"upop evaluate gave metrics {sorted(evaluated)}, report.json {sorted(report)}"
    for k in report:
        if not (_finite(evaluated[k]) and _finite(report[k]) and abs(evaluated[k] - report[k]) <= EVALUATE_TOLERANCE):
            return (f"upop evaluate's {k} is {evaluated[k]!r}, report.json's {report[k]!r} "
                    f"(tolerance {EVALUATE_TOLERANCE:g})")
    return ""


def judge_export(m: dict, profile: Profile) -> str:
    """Every parity check within the tolerance, the model left on its device and dtype, a file written."""
    if m["run"].get("exit") != 0:
        return f"the run to export failed: {m['run'].get('error')}"
    if not m["parity"]:
        return "the export reported no parity check"
    for p in m["parity"]:
        if not (_finite(p["relative"]) and p["relative"] <= m["tolerance"]):
            return (f"ONNX Runtime differs from PyTorch by {p['relative']!r} of the output scale at batch {p['batch']} "
                    f"(tolerance {m['tolerance']:g})")
    if (m["device_after"], m["dtype_after"]) != (m["device_before"], m["dtype_before"]):
        return (f"exporting moved the model from {m['device_before']} {m['dtype_before']} to {m['device_after']} "
                f"{m['dtype_after']}")
    if not m["device_before"].startswith(profile.device):
        return f"the model was exported from {m['device_before']}, expected {profile.device!r}"
    if not m["file_bytes"]:
        return "no ONNX file was written"
    return ""


def judge_trainer(m: dict, profile: Profile) -> str:
    """All steps ran on the device, the model ends pruned (fewer parameters), every logged loss finite."""
    if m["steps"] != TRAINER_STEPS:
        return f"the Trainer ran {m['steps']!r} steps, expected {TRAINER_STEPS}"
    if not m["device"].startswith(profile.device):
        return f"the Trainer trained on {m['device']!r}, expected {profile.device!r}"
    if not m["pruned"] or not m["params_after"] < m["params_dense"]:
        return f"the Trainer's model was not pruned: {m['params_after']} parameters, dense {m['params_dense']}"
    if not m["losses"] or m["nonfinite_losses"]:
        return f"{m['nonfinite_losses']} of {m['losses']} logged losses are not finite"
    return ""


def judge_throughput(m: dict, profile: Profile) -> str:
    """Three positive rates; under the GPU's rules the search within :data:`MAX_SEARCH_SLOWDOWN` of fine-tuning."""
    rates = {k: m[f"{k}_steps_per_s"] for k in ("finetune", "search", "retrain")}
    bad = [k for k, v in rates.items() if not (_finite(v) and v > 0)]
    if bad:
        return f"{bad[0]} steps/s is {rates[bad[0]]!r}, not a positive number"
    limit = profile.max_search_slowdown
    if limit is not None and rates["search"] < rates["finetune"] / limit:
        return (f"the search ran {rates['search']:.2f} steps/s, fine-tuning {rates['finetune']:.2f}: more than "
                f"{limit:.2f}x slower")
    return ""


def judge_registry(m: dict, profile: Profile) -> str:
    """The pairs run are the registry's, and each passes :func:`judge_run`."""
    from upop.arch import pairs

    declared = [f"{t}/{task}" for t, task in pairs()]
    if sorted(m["pairs"]) != sorted(declared):
        return f"the pairs run ({len(m['pairs'])}) are not the registry's ({len(declared)})"
    failed = [(pair, judge_run(run, profile, profile.precision)) for pair, run in m["pairs"].items()]
    failed = [(pair, why) for pair, why in failed if why]
    return f"{len(failed)} of {len(m['pairs'])} pairs failed; {failed[0][0]}: {failed[0][1]}" if failed else ""


def judge_multi_gpu(m: dict, profile: Profile) -> str:
    """Each pair passes :func:`judge_run` with 2 processes, which logged agreement and never disagreed."""
    for pair, run in m["pairs"].items():
        why = judge_run(run, profile, profile.precision, processes=2)
        if not why and (not run["agreement_records"] or run["disagreements"]):
            why = (f"{run['disagreements']} of {run['agreement_records']} records say the processes held different "
                   "masks, plans or weights")
        if why:
            return f"{pair}: {why}"
    return ""


# --- planted faults (the tests prove each check fails on a wrong outcome) ------------------------------------
# Each returns the measured values with one wrong outcome in them, of the kind its check exists to catch.


def plant_vit_half(m: dict, profile: Profile) -> dict:
    m["report"]["achieved_ratio"] += 0.05
    return m


def plant_clip_latency(m: dict, profile: Profile) -> dict:
    m["report"]["speedup"] = float("nan") if profile.min_speedup <= 0 else 0.95 * profile.min_speedup
    return m


def plant_resume(m: dict, profile: Profile) -> dict:
    kept = m["kept"]["resumed"]
    group = sorted(kept)[0]
    units = kept[group]
    spare = next(u for u in range(max(units, default=0) + 2) if u not in units)
    kept[group] = sorted(units[:-1] + [spare])  # one unit swapped for one that was pruned
    return m


def plant_evaluate(m: dict, profile: Profile) -> dict:
    metrics = m["evaluate"]["metrics"]
    first = sorted(metrics)[0]
    metrics[first] += 0.01
    return m


def plant_export(m: dict, profile: Profile) -> dict:
    m["parity"][0]["relative"] = 10 * m["tolerance"]
    return m


def plant_trainer(m: dict, profile: Profile) -> dict:
    m["params_after"] = m["params_dense"]  # the model left dense
    return m


def plant_throughput(m: dict, profile: Profile) -> dict:
    if profile.max_search_slowdown is None:
        m["search_steps_per_s"] = 0.0
    else:
        m["search_steps_per_s"] = m["search_steps_per_s"] / 2
    return m


def plant_registry(m: dict, profile: Profile) -> dict:
    run = m["pairs"][sorted(m["pairs"])[0]]
    metrics = run["report"]["compressed_metrics"]
    metrics[sorted(metrics)[0]] = float("nan")
    return m


def plant_multi_gpu(m: dict, profile: Profile) -> dict:
    run = m["pairs"][sorted(m["pairs"])[0]]
    run["disagreements"] = 1
    return m


# --- the checks ----------------------------------------------------------------------------------------------


def measure_vit_half(ws: Workspace) -> dict:
    run = ws.compress("vit-half", "vit", "classification", ["--precision", ws.profile.half, "--max-grad-norm", "1.0"])
    return compact(run)  # skipped_steps: the search summary's count in log.jsonl


def measure_clip_latency(ws: Workspace) -> dict:
    size, image = ws.profile.latency_model
    model = ws.model("clip", size=size, image_size=image)
    run = ws.compress("clip-latency", "clip", "retrieval", ["--precision", ws.profile.clip_precision, "--cost",
                                                             "latency", "--latency-batch-size", "32"], model=model)
    return {**compact(run), "model_size": size, "image_size": image}


RESUME_WRAPPER = '''"""upop compress for gpu_check's resume check. On CUDA the kernels are made deterministic, so
that two runs can be compared value for value; with GPU_CHECK_SIGTERM set the process sends
itself SIGTERM once, right after the search wrote its first checkpoint (a preemption between steps)."""
import os, signal, sys

import torch

if torch.cuda.is_available():
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

import upop.engine.phases as phases
from upop.engine.runtime import STATE_FILE

if os.environ.get("GPU_CHECK_SIGTERM"):
    step_end, sent = phases._Checkpoints.step_end, []

    def step_end_then_sigterm(self, done, stop):
        step_end(self, done, stop)
        if self.phase == "search" and not sent and (self.run.state_dir / STATE_FILE).is_file():
            sent.append(done)
            os.kill(os.getpid(), signal.SIGTERM)

    phases._Checkpoints.step_end = step_end_then_sigterm

from upop.cli.main import main

sys.exit(main(sys.argv[1:]))
'''
RESUME_OPTIONS = ["--checkpoint-every", "2"]
RESUME_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS (no effect on the CPU)


def kept_units(folder: Path) -> dict[str, list[int]]:
    """Group name -> kept unit indices of the plan in ``folder`` (empty if it cannot be read)."""
    try:
        plan = json.loads((folder / "upop_plan.json").read_text())
        return {name: list(g["kept"]) for name, g in plan["groups"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def measure_resume(ws: Workspace) -> dict:
    script = ws.root / "resume_wrapper.py"
    script.write_text(RESUME_WRAPPER)
    options = ["--precision", ws.profile.precision, *RESUME_OPTIONS]
    reference = ws.compress("resume-reference", "vit", "classification", options, script=script, env=RESUME_ENV)
    stopped = ws.compress("resume-interrupted", "vit", "classification", options, script=script,
                          env={**RESUME_ENV, "GPU_CHECK_SIGTERM": "1"})
    resumed = ws.compress("resume-resumed", "vit", "classification", [*options, "--resume"], script=script,
                          env=RESUME_ENV, folder="resume-interrupted")
    at = re.search(r"resuming the search at step (\d+)/", resumed["output"])
    said = [line for line in stopped["output"].splitlines() if "stopped by" in line]
    return {"reference": compact(reference), "resumed": compact(resumed),
            "interrupted": {"exit": stopped["exit"], "message": one_line(said[-1] if said else stopped["output"])},
            "resumed_at": int(at.group(1)) if at else None,
            "kept": {"reference": kept_units(Path(reference["folder"]) / "compressed"),
                     "resumed": kept_units(Path(resumed["folder"]) / "compressed")}}


def measure_evaluate(ws: Workspace) -> dict:
    tiny, task = EVALUATED
    run = ws.registry_run(tiny, task)
    measured = {"run": compact(run), "report_metrics": (run.get("report") or {}).get("compressed_metrics") or {},
                "evaluate": {"metrics": {}, "error": ""}}
    if run.get("exit") != 0:
        return measured
    cmd = [sys.executable, "-m", "upop", "evaluate", "--model", str(Path(run["folder"]) / "compressed"), "--task", task,
           "--data", str(ws.data(task)), "--batch-size", str(EVAL_BATCH)]
    proc = run_process(cmd, ws.env, ws.timeout)
    measured["evaluate"]["error"] = proc["error"]
    if proc["exit"] == 0:
        try:
            measured["evaluate"]["metrics"] = json.loads(proc["stdout"])
        except ValueError:
            measured["evaluate"]["error"] = f"its output is not JSON: {one_line(proc['stdout'])}"
    return measured


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def measure_export(ws: Workspace) -> dict:
    from upop.errors import ConfigError
    from upop.export.onnx import export_onnx, require_onnx

    try:
        require_onnx()
    except ConfigError as exc:
        raise Skip(str(exc)) from None
    import upop

    run = ws.registry_run(*EVALUATED)
    measured: dict = {"run": compact(run)}
    if run.get("exit") != 0:
        return measured
    model = upop.load_compressed(Path(run["folder"]) / "compressed", device=ws.profile.device,
                                 dtype=_dtype(ws.profile.precision))
    param = next(model.parameters())
    measured.update(device_before=str(param.device), dtype_before=str(param.dtype))
    out = ws.root / "export" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = export_onnx(model, out, overwrite=True)
    param = next(model.parameters())
    measured.update(device_after=str(param.device), dtype_after=str(param.dtype), exporter=result.exporter,
                    opset=result.opset, tolerance=result.tolerance, provider=result.provider,
                    parity=[{"batch": p.batch, "max_abs_diff": p.max_abs_diff, "relative": p.relative}
                            for p in result.parity],
                    file_bytes=out.stat().st_size if out.is_file() else 0)
    del model
    _release(ws.profile)
    return measured


def _release(profile: Profile) -> None:
    """Give the GPU memory of an in-process check back (the next runs are other processes)."""
    import gc

    import torch

    gc.collect()
    if profile.device == "cuda":
        torch.cuda.empty_cache()


class _RandomImages:
    """``n`` random 32x32 images with labels of 10 classes, the same every time (a map-style dataset)."""

    def __init__(self, n: int = 32, image_size: int = IMAGE_SIZE):
        import torch

        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, image_size, image_size, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def measure_trainer(ws: Workspace) -> dict:
    import transformers

    import upop
    from upop.integrations.transformers.callback import add_upop
    from upop.models.folders import make_model

    transformers.logging.set_verbosity_error()
    model = make_model("vit")
    dense = upop.count_params(model)
    args = transformers.TrainingArguments(
        output_dir=str(ws.root / "trainer"), report_to=[], use_cpu=ws.profile.device == "cpu", max_steps=TRAINER_STEPS,
        per_device_train_batch_size=8, learning_rate=1e-3, seed=0, disable_tqdm=True, logging_steps=1,
        save_strategy="no", bf16=ws.profile.trainer_precision == "bf16")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_RandomImages())
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the losses stay in log_history
    callback = add_upop(trainer, ratio=RATIO)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    measured = {"steps": trainer.state.global_step, "search_steps": callback.search_steps,
                "precision": ws.profile.trainer_precision, "device": str(next(trainer.model.parameters()).device),
                "pruned": callback.plan is not None,
                "achieved_ratio": callback.plan.achieved_ratio.get("params") if callback.plan else None,
                "params_dense": dense, "params_after": upop.count_params(trainer.model),
                "losses": len(losses), "nonfinite_losses": sum(not _finite(v) for v in losses),
                "last_loss": losses[-1] if losses else None}
    del trainer, model
    _release(ws.profile)
    return measured


def measure_throughput(ws: Workspace) -> dict:
    """Steps/s of fine-tuning, searching and retraining one ViT on upop's step loop, on a fixed
    batch on the device (no data loading: the step itself is measured), under autocast at the
    profile's precision, with the one host sync per step that a run's forward makes (the loss
    read back). Fine-tuning and the search alternate in rounds (same machine state); the
    retraining runs after them on a model the search pruned. Each rate is the timed steps over
    their time (not a median over rounds: the search's occasional mask update is part of its cost;
    its interval is a run's default, the steps per 1% of compression, of a 1000-step search)."""
    import torch

    from upop.arch import find_groups
    from upop.engine.callback import UPopCallback
    from upop.engine.loop import Pending, StepLoop
    from upop.models.folders import make_model
    from upop.pruning.masks import attach_masks
    from upop.search.mask_search import UPopSearch, resolve_round_to

    p = ws.profile
    size, image, batch = p.throughput
    warmup, rounds, per_round = p.throughput_steps
    device = torch.device(p.device)
    dtype = _dtype(p.precision)
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(batch, 3, image, image, generator=g).to(device),
              "labels": torch.randint(0, 10, (batch,), generator=g).to(device)}

    def forward(compute, step):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, task_loss = compute()
        # read after backward with the step's other values, as upop's runs do (one sync a step)
        return loss, Pending(task_loss.detach().float().reshape(1), lambda host: (float(host[0]), False))

    def loop(model, callbacks=()) -> StepLoop:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        return StepLoop("throughput", model.train(), optimizer, lambda m, b: (m(**b).loss, None),
                        callbacks=list(callbacks), forward=forward, log_lr=False)

    def searcher(model, total: int, interval: int) -> UPopCallback:
        groups = find_groups(model)
        masks = attach_masks(model, groups)
        masks.to(device)
        round_to, _ = resolve_round_to("auto", groups, device.type, "unified")
        return UPopCallback(masks, UPopSearch(masks, RATIO, total, interval, score="taylor", round_to=round_to))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(step_loop: StepLoop, start: int, n: int) -> float:
        """Seconds of steps ``start .. start + n - 1``."""
        sync()
        t = time.perf_counter()
        for i in range(n):
            step_loop.step(start + i, inputs)
        sync()
        return time.perf_counter() - t

    def build():
        return make_model("vit", size=size, image_size=image, num_labels=10).to(device)

    def params(model) -> int:
        return sum(t.numel() for t in model.parameters())

    dense, searched = build(), build()
    dense_params = params(dense)
    search = searcher(searched, 1000, max(1, int(1000 / (100 * RATIO))))
    loops = {"finetune": loop(dense), "search": loop(searched, [search])}
    seconds = dict.fromkeys([*loops, "retrain"], 0.0)
    for step_loop in loops.values():
        timed(step_loop, 0, warmup)
    for r in range(rounds):
        for name, step_loop in loops.items():
            seconds[name] += timed(step_loop, warmup + r * per_round, per_round)
    del loops, dense, searched, search
    _release(p)
    pruned = build()
    short = searcher(pruned, 2, 1)
    loop(pruned, [short]).run(0, 2, [inputs, inputs])
    short.prune(pruned)
    retrain = loop(pruned)
    timed(retrain, 0, warmup)
    seconds["retrain"] = timed(retrain, warmup, rounds * per_round)
    pruned_params = params(pruned)
    del retrain, pruned, short
    _release(p)
    rates = {k: rounds * per_round / v for k, v in seconds.items()}
    return {"model": f"vit {size}, {image}px", "batch": batch, "precision": p.precision, "device": str(device),
            "steps_timed": rounds * per_round, "dense_params": dense_params, "pruned_params": pruned_params,
            **{f"{k}_steps_per_s": round(v, 3) for k, v in rates.items()},
            "search_vs_finetune": round(rates["finetune"] / rates["search"], 3),
            "max_search_slowdown": p.max_search_slowdown}


def registry_pairs() -> list[tuple[str, str]]:
    """The registry check's pairs: every (tiny model, task) pair the registry declares."""
    from upop.arch import pairs

    return pairs()


def measure_registry(ws: Workspace) -> dict:
    todo = registry_pairs()
    for tiny, task in todo:  # written once, before the runs share them
        ws.model(tiny)
        ws.data(task)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, ws.jobs)) as pool:
        runs = list(pool.map(lambda pair: ws.registry_run(*pair), todo))
    return {"precision": ws.profile.precision,
            "pairs": {f"{t}/{task}": compact(run) for (t, task), run in zip(todo, runs)}}


def measure_multi_gpu(ws: Workspace) -> dict:
    if ws.gpus < 2 and not ws.multi:
        raise Skip(f"needs 2 GPUs, {ws.gpus} visible" + (" (--multi runs it with 2 CPU processes)"
                                                          if ws.profile.device == "cpu" else ""))
    runs = {f"{t}/{task}": ws.compress(f"multi-{t}-{task}", t, task, ["--precision", ws.profile.precision], processes=2)
            for t, task in MULTI_GPU_PAIRS}
    return {"processes": 2, "pairs": {k: compact(r) for k, r in runs.items()}}


@dataclass(frozen=True)
class Check:
    """One named check: ``measure(workspace)`` runs it and returns the measured values (raising
    :class:`Skip` where it cannot run); ``judge(measured, profile)`` says why they are wrong ("" if
    right); ``plant(measured, profile)`` puts a fault into them (``--plant``); ``example(profile)``
    builds an outcome that passes there, for the tests of ``judge`` and ``plant``; ``headline``
    says in short what was measured, for the table."""

    name: str
    proves: str
    measure: Callable[[Workspace], dict]
    judge: Callable[[dict, Profile], str]
    plant: Callable[[dict, Profile], dict]
    example: Callable[[Profile], dict]
    headline: Callable[[dict, Profile], str]


def _example_run(profile: Profile, precision: str, processes: int = 1, **report) -> dict:
    """A run outcome that passes :func:`judge_run` under ``profile``."""
    device = "cuda:0" if profile.device == "cuda" else "cpu"
    phases = {phase: {"devices": [device], "precisions": [precision if phase in TRAINING_PHASES else "fp32"],
                      "ended": True, "seconds": 1.0, "steps": 8 if phase in TRAINING_PHASES else None,
                      "steps_per_s": 8.0 if phase in TRAINING_PHASES else None, "peak_memory_mb": 100.0}
              for phase in PHASES}
    return {"pair": "vit/classification", "exit": 0, "error": "", "wall_seconds": 9.0, "folder": "runs/x",
            "phases": phases, "losses": 16, "nonfinite_losses": 0, "search_steps_logged": 8,
            "agreement_records": 3 if processes > 1 else 0, "disagreements": 0, "skipped_steps": 0,
            "report": {"device": device, "processes": processes, "target_ratio": RATIO, "achieved_ratio": 0.505,
                       "cost": "params", "dense_params": 24234, "compressed_params": 15760,
                       "dense_metrics": {"top1": 18.75, "top5": 43.75},
                       "compressed_metrics": {"top1": 12.5, "top5": 50.0},
                       "speedup": 1.3, "latency_noisy": False, "latency_batch": 1, "skipped_steps": None, **report}}


def _example_resume(profile: Profile) -> dict:
    run = _example_run(profile, profile.precision)
    kept = {"vision.0.attention": [0, 1, 4, 5], "vision.0.mlp": [2, 3, 7]}
    return {"reference": run, "resumed": copy.deepcopy(run),
            "interrupted": {"exit": 128 + signal.SIGTERM,
                            "message": "upop: stopped by SIGTERM after search step 3/8; the run is saved in runs/x"},
            "resumed_at": 3, "kept": {"reference": kept, "resumed": copy.deepcopy(kept)}}


def _headline_run(m: dict, profile: Profile | None = None) -> str:
    report = m.get("report") or {}
    metrics = report.get("compressed_metrics") or {}
    main = next(iter(metrics.items()), None)
    return (f"ratio {_num(report.get('achieved_ratio'))}, params {report.get('dense_params')} -> "
            f"{report.get('compressed_params')}" + (f", {main[0]} {_num(main[1])}" if main else "")
            + f", search {_num((m.get('phases', {}).get('search') or {}).get('steps_per_s'))} steps/s")


def _num(value, spec: str = ".3g") -> str:
    return format(value, spec) if _finite(value) else str(value)


def _example_export(profile: Profile) -> dict:
    device = f"{profile.device}:0"
    return {"run": _example_run(profile, profile.precision), "device_before": device, "dtype_before": "torch.bfloat16",
            "device_after": device, "dtype_after": "torch.bfloat16", "exporter": "dynamo", "opset": 18,
            "tolerance": 1e-3, "provider": "CPUExecutionProvider", "file_bytes": 100_000,
            "parity": [{"batch": 2, "max_abs_diff": 1e-6, "relative": 1e-6},
                       {"batch": 3, "max_abs_diff": 1e-6, "relative": 1e-6}]}


def _example_trainer(profile: Profile) -> dict:
    return {"steps": TRAINER_STEPS, "search_steps": TRAINER_STEPS // 2, "precision": "bf16",
            "device": f"{profile.device}:0", "pruned": True, "achieved_ratio": 0.51, "params_dense": 24234,
            "params_after": 15760, "losses": TRAINER_STEPS, "nonfinite_losses": 0, "last_loss": 2.3}


def _example_pairs(profile: Profile, pairs, processes: int = 1) -> dict:
    return {f"{t}/{task}": _example_run(profile, profile.precision, processes) for t, task in pairs}


def _headline_export(m: dict, profile: Profile) -> str:
    parity = ", ".join(_num(x["relative"], ".1e") for x in m.get("parity", []))
    return f"{m.get('exporter')} exporter, parity {parity} (limit {_num(m.get('tolerance'), 'g')})"


def _headline_throughput(m: dict, profile: Profile) -> str:
    rates = ", ".join(f"{k} {_num(m[f'{k}_steps_per_s'])}" for k in ("finetune", "search", "retrain"))
    return f"steps/s: {rates} ({m['model']}, batch {m['batch']})"


CHECKS: dict[str, Check] = {c.name: c for c in (
    Check("vit-fp16-clip", "fp16 (CPU: bf16) with gradient clipping: finite, on ratio, smaller",
          measure_vit_half, judge_vit_half, plant_vit_half, lambda p: _example_run(p, p.half),
          lambda m, p: _headline_run(m) + f", skipped steps {m.get('skipped_steps')}"),
    Check("clip-latency", "a latency budget at batch 32 gives a real speedup",
          measure_clip_latency, judge_clip_latency, plant_clip_latency,
          lambda p: {**_example_run(p, p.clip_precision, cost="latency", latency_batch=32, speedup=1.4),
                     "model_size": p.latency_model[0], "image_size": p.latency_model[1]},
          lambda m, p: f"speedup {_num(m['report']['speedup'])} at batch {m['report']['latency_batch']} "
                       f"({m.get('model_size')} CLIP)"),
    Check("resume", "SIGTERM after the first checkpoint, then --resume: the uninterrupted plan and metrics",
          measure_resume, judge_resume, plant_resume, _example_resume,
          lambda m, p: f"resumed at search step {m['resumed_at']}, plans "
                       f"{'equal' if m['kept']['reference'] == m['kept']['resumed'] else 'DIFFER'}"),
    Check("evaluate", "upop evaluate repeats the report's metrics",
          measure_evaluate, judge_evaluate, plant_evaluate,
          lambda p: {"run": _example_run(p, p.precision), "report_metrics": {"top1": 12.5, "top5": 50.0},
                     "evaluate": {"metrics": {"top1": 12.5, "top5": 50.0}, "error": ""}},
          lambda m, p: f"evaluate {m['evaluate']['metrics']}, report {m['report_metrics']}"),
    Check("export", "ONNX export of the model on the device passes its parity check",
          measure_export, judge_export, plant_export, _example_export, _headline_export),
    Check("trainer", f"{TRAINER_STEPS} Trainer steps with add_upop end pruned, losses finite",
          measure_trainer, judge_trainer, plant_trainer, _example_trainer,
          lambda m, p: f"params {m['params_dense']} -> {m['params_after']}, last loss {_num(m['last_loss'])}"),
    Check("throughput", f"search steps/s within {MAX_SEARCH_SLOWDOWN:.2f}x of plain fine-tuning (GPU)",
          measure_throughput, judge_throughput, plant_throughput,
          lambda p: {"model": "vit base, 224px", "batch": 32, "finetune_steps_per_s": 10.0,
                     "search_steps_per_s": 9.5, "retrain_steps_per_s": 14.0},
          _headline_throughput),
    Check("registry", "every registered (tiny model, task) pair compresses on the device",
          measure_registry, judge_registry, plant_registry,
          lambda p: {"precision": p.precision, "pairs": _example_pairs(p, registry_pairs())},
          lambda m, p: f"{sum(not judge_run(r, p, m['precision']) for r in m['pairs'].values())}/"
                       f"{len(m['pairs'])} pairs ok"),
    Check("multi-gpu", "DINOv2 and BLIP retrieval under torchrun x2 agree across processes",
          measure_multi_gpu, judge_multi_gpu, plant_multi_gpu,
          lambda p: {"processes": 2, "pairs": _example_pairs(p, MULTI_GPU_PAIRS, processes=2)},
          lambda m, p: "; ".join(f"{k}: {_headline_run(r)}" for k, r in m["pairs"].items())),
)}
"""The checks, in the order they run."""


# --- one session ---------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """One check's outcome in ``gpu-check.json``."""

    name: str
    ok: bool = False
    skipped: bool = False
    reason: str = ""
    seconds: float = 0.0
    planted: bool = False
    measured: dict = field(default_factory=dict)


def run_check(check: Check, ws: Workspace, plant: bool = False) -> CheckResult:
    """Measure and judge ``check`` (with ``plant``, a fault planted first); a crash of the check
    itself is a failure with its exception as the reason."""
    result = CheckResult(check.name, planted=plant)
    start = time.perf_counter()
    try:
        measured = check.measure(ws)
    except Skip as exc:
        result.skipped, result.reason = True, str(exc)
        result.ok = not plant  # a planted fault must never pass unjudged
        if plant:
            result.reason = f"skipped ({exc}), so the planted fault was not judged"
    except Exception as exc:  # noqa: BLE001 - the check broke: recorded, the others still run
        traceback.print_exc()
        result.reason = f"the check raised {type(exc).__name__}: {one_line(str(exc))}"
    else:
        if plant:
            measured = check.plant(copy.deepcopy(measured), ws.profile)
        result.measured = measured
        try:
            result.reason = check.judge(measured, ws.profile)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            result.reason = f"the outcome is incomplete: {type(exc).__name__}: {one_line(str(exc))}"
        result.ok = not result.reason
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def table(results: list[CheckResult], profile: Profile) -> str:
    """One row per check: its name, result, seconds and what it measured (in short)."""
    rows = [["check", "result", "seconds", "measured"]]
    for r in results:
        if r.skipped and r.ok:
            state = f"skipped: {r.reason}"
        else:
            state = "ok" if r.ok else f"FAILED: {r.reason}"
        try:
            values = CHECKS[r.name].headline(r.measured, profile) if r.measured else ""
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            values = "(incomplete)"
        rows.append([r.name, state, f"{r.seconds:.1f}", values])
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)


def _names(parser: argparse.ArgumentParser, text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        parser.error(f"--{what} {text!r}: unknown or empty ({', '.join(map(repr, unknown)) or 'none given'}); "
                     f"choose from: {', '.join(CHECKS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check.json", help="JSON file of the results (default: gpu-check.json)")
    parser.add_argument("--cpu", action="store_true",
                        help="run the checks on the CPU (the runs see no GPU), with the CPU's rules")
    parser.add_argument("--only", default=",".join(CHECKS),
                        help=f"comma-separated checks to run (default: all: {', '.join(CHECKS)})")
    parser.add_argument("--plant", default=None, help=argparse.SUPPRESS)  # tests: a fault in that check's outcome
    parser.add_argument("--multi", action="store_true",
                        help="run multi-gpu without 2 GPUs (with --cpu: 2 CPU processes through torchrun and gloo)")
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"registry runs at a time (default: {GPU.jobs} on a GPU, {CPU.jobs} on the CPU)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take (default: 300)")
    parser.add_argument("--work", default=None, help="folder for models, data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    args.only = _names(parser, args.only, "only")
    if args.plant is not None and args.plant not in args.only:
        parser.error(f"--plant {args.plant!r}: not one of the checks run ({', '.join(args.only)})")
    if args.timeout <= 0:
        parser.error(f"--timeout {args.timeout!r}: need a positive number of seconds")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs!r}: need an integer >= 1")
    return args


def machine(cpu: bool) -> tuple[Profile, int, dict, str]:
    """(profile, visible GPUs, environment of the runs, device name). Without ``cpu`` a CUDA
    device is required; with it the runs see no GPU (``CUDA_VISIBLE_DEVICES`` empty)."""
    import torch

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        return CPU, 0, {**env, "CUDA_VISIBLE_DEVICES": ""}, "cpu"
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA device visible to torch {torch.__version__}; run it on a GPU machine with a "
                 "CUDA build of torch, or pass --cpu for the dry run")
    return GPU, torch.cuda.device_count(), env, torch.cuda.get_device_name(0)


def write_json(path: Path, results: list[CheckResult], header: dict, started: float) -> None:
    """Write the results so far (after every check: an interrupted session keeps what it measured)."""
    payload = {**header, "seconds": round(time.perf_counter() - started, 1),
               "ok": all(r.ok for r in results), "checks": [asdict(r) for r in results]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile, gpus, env, device_name = machine(args.cpu)
    import torch
    import transformers

    jobs = args.jobs or profile.jobs
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # parallel runs share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    header = {"device": device_name, "profile": profile.name, "gpus": gpus, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "plant": args.plant}
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="upop-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ws = Workspace(work, profile, env, args.timeout, jobs, gpus=gpus, multi=args.multi)
    results: list[CheckResult] = []
    try:
        for name in args.only:
            result = run_check(CHECKS[name], ws, plant=name == args.plant)
            results.append(result)
            state = "skipped" if result.skipped and result.ok else ("ok" if result.ok else "FAILED: " + result.reason)
            print(f"{name}: {state} ({result.seconds:.1f} s)", flush=True)
            write_json(out, results, header, started)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nGPU check on {device_name} ({profile.name} rules), {time.perf_counter() - started:.0f} s")
    print(table(results, profile))
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results) - failed}/{len(results)} checks ok; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
