"""GPU check: every family's task compresses on the GPU, at every precision, end to end.

    python scripts/gpu_check.py [--out gpu-check.json] [--families clip,vit] [--precisions fp32,bf16]
    python scripts/gpu_check.py --cpu          # dry run of this script on a machine without a GPU

For each family with a task (clip, siglip, blip-retrieval, blip-vqa, blip-caption, blip-nlvr, vit,
deit, dinov2, segmenter) it writes a tiny random model and a tiny Shapes data set once, then runs
``python -m upop compress`` (1 search epoch, 1 retrain epoch, a few steps) once per precision,
and once more per precision under ``torchrun`` with 2 processes when 2 or more GPUs are visible
(``--multi`` / ``--no-multi`` to choose). Each run is a subprocess, so a crash is recorded and
the other runs still go. A run passes if it exits 0, its ``log.jsonl`` says that every phase
(dense_eval, search, retrain, final_eval, latency) ran on the expected device, search and
retrain at the requested precision, and its ``report.json`` names that device and the number
of processes.

The JSON (``--out``) holds per run: family, task, precision, processes, per-phase seconds, steps,
steps/s and peak GPU memory, ok and the reason of a failure. A table is printed; the exit code
is 1 if any run failed. Meant to take under 10 minutes on one GPU (24 runs of a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

def _family_tasks() -> dict[str, str]:
    from upop.arch import TINY

    return {tiny.name: tiny.data_task for tiny in TINY.values()}


FAMILY_TASKS: dict[str, str] = _family_tasks()
"""Every registered tiny model with the task of its Shapes data (bert: the label-free task)."""

PHASES = ("dense_eval", "search", "retrain", "final_eval", "latency")
"""The phases of a run that must each report their device (log.jsonl ``device`` records)."""

TRAINING_PHASES = ("search", "retrain")
"""The phases that run at the requested precision (evaluation and latency run in fp32)."""

PRECISIONS = ("fp32", "bf16", "fp16")
CPU_PRECISIONS = ("fp32", "bf16")
IMAGE_SIZE = 32
DATA_SIZES = {"train": 32, "val": 10, "test": 16}  # val 10: every Shapes class has a validation image
COMPRESS_OPTIONS = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--eval-batch-size", "8",
                    "--latency-time", "0.02", "--no-progress"]


@dataclass
class RunResult:
    """One compress run of the check and what its log and report showed."""

    family: str
    task: str
    precision: str
    processes: int
    ok: bool = False
    reason: str = ""
    wall_seconds: float = 0.0
    device: str | None = None
    peak_memory_mb: float | None = None
    phases: dict[str, dict] = field(default_factory=dict)


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


def phase_summary(records: list[dict], device: str, precision: str) -> dict[str, dict]:
    """Per phase of :data:`PHASES`: its device, dtype and precision, seconds, steps, steps/s and
    peak memory, from the ``device`` and ``phase_end`` records. ValueError (one line) if a phase
    is missing, ran on another device type (``device``: ``"cuda"`` or ``"cpu"``), or is a
    training phase that ran at another precision than ``precision``."""
    summary: dict[str, dict] = {}
    for phase in PHASES:
        starts = [r for r in records if r.get("phase") == "device" and r.get("of") == phase]
        ends = [r for r in records if r.get("phase") == "phase_end" and r.get("of") == phase]
        if not starts or not ends:
            raise ValueError(f"log.jsonl has no {'device' if not starts else 'phase_end'} record for phase {phase!r}")
        for r in starts:
            if not str(r.get("device", "")).startswith(device):
                raise ValueError(f"phase {phase!r} ran on {r.get('device')!r}, expected {device!r}")
            if phase in TRAINING_PHASES and r.get("precision") != precision:
                raise ValueError(f"phase {phase!r} ran at precision {r.get('precision')!r}, expected {precision!r}")
        seconds = sum(float(r["seconds"]) for r in ends)
        counted = [r["steps"] for r in ends if r.get("steps") is not None]
        steps = sum(counted) if counted else None
        peaks = [float(r["peak_memory_mb"]) for r in ends if r.get("peak_memory_mb") is not None]
        summary[phase] = {
            "device": starts[0]["device"], "dtype": starts[0].get("dtype"), "precision": starts[0].get("precision"),
            "seconds": round(seconds, 4),
            "steps": steps, "steps_per_s": round(steps / seconds, 3) if steps and seconds > 0 else None,
            "peak_memory_mb": round(max(peaks), 1) if peaks else None,
        }
    return summary


def check_run(result: RunResult, out: Path, device: str) -> None:
    """Fill ``result`` from the run folder ``out``: phases, device, peak memory; ``ok`` only if the
    log and report show every phase on ``device``, training at the requested precision, and the
    requested number of processes."""
    try:
        result.phases = phase_summary(read_log(out / "log.jsonl"), device, result.precision)
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        result.reason = one_line(str(exc))
        return
    result.device = report.get("device")
    peaks = [p["peak_memory_mb"] for p in result.phases.values() if p["peak_memory_mb"] is not None]
    result.peak_memory_mb = max(peaks) if peaks else None
    if not str(result.device).startswith(device):
        result.reason = f"report.json device is {result.device!r}, expected {device!r}"
    elif report.get("processes") != result.processes:
        result.reason = f"report.json processes is {report.get('processes')!r}, expected {result.processes}"
    else:
        result.ok = True


def compress_command(model: Path, data: Path, out: Path, task: str, precision: str, processes: int) -> list[str]:
    """The ``upop compress`` command line of one run (through torchrun for several processes)."""
    if processes == 1:
        launcher = [sys.executable, "-m", "upop"]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        launcher = [torchrun, "--standalone", "--nproc_per_node", str(processes), "-m", "upop"]
    return [*launcher, "compress", "--model", str(model), "--task", task, "--data", str(data), "--out", str(out),
            "--precision", precision, *COMPRESS_OPTIONS]


def prepare(work: Path, family: str) -> tuple[Path, Path]:
    """Write (or reuse) the tiny model of ``family`` and the Shapes data of its task under ``work``."""
    from transformers.utils import logging as hf_logging

    from upop.data import shapes_writer
    from upop.models.folders import make_model_folder

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars between the table rows
    task = FAMILY_TASKS[family]
    data, model = work / "data" / task, work / "models" / family
    shapes_writer(task)(data, image_size=IMAGE_SIZE, seed=0, **DATA_SIZES)  # reuses a complete folder
    if not (model / "config.json").is_file():
        make_model_folder(family, model, size="tiny", image_size=IMAGE_SIZE)
    return model, data


def run_one(result: RunResult, model: Path, data: Path, work: Path, device: str, env: dict, timeout: float) -> None:
    """Run one compress as a subprocess and check it; a crash or a timeout becomes ``reason``."""
    out = work / "runs" / f"{result.family}-{result.precision}-{result.processes}p"
    shutil.rmtree(out, ignore_errors=True)
    cmd = compress_command(model, data, out, result.task, result.precision, result.processes)
    start = time.perf_counter()
    # its own process group: on a timeout torchrun's workers are killed with it, not left behind
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        result.reason = f"timed out after {timeout:g} s"
        return
    finally:
        result.wall_seconds = round(time.perf_counter() - start, 2)
    if proc.returncode != 0:
        result.reason = f"exit code {proc.returncode}: {one_line(stderr or stdout)}"
        return
    check_run(result, out, device)


def _cell(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[RunResult]) -> str:
    """A plain-text table: one row per run, seconds (and steps/s) per phase, peak memory, outcome."""
    head = ["family", "task", "prec", "procs", *PHASES, "peak MB", "result"]
    rows = [head]
    for r in results:
        cells = []
        for phase in PHASES:
            p = r.phases.get(phase, {})
            rate = f" ({p['steps_per_s']:.1f}/s)" if p.get("steps_per_s") else ""
            cells.append(_cell(p.get("seconds"), ".2f") + rate)
        rows.append([r.family, r.task, r.precision, str(r.processes), *cells, _cell(r.peak_memory_mb, ".0f"),
                     "ok" if r.ok else f"FAILED: {r.reason}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def _choices(parser: argparse.ArgumentParser, text: str, allowed, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(f"--{what} {text!r}: unknown or empty ({', '.join(map(repr, unknown)) or 'none given'}); "
                     f"choose from: {', '.join(allowed)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check.json", help="JSON file of the results (default: gpu-check.json)")
    parser.add_argument("--families", default=",".join(FAMILY_TASKS),
                        help="comma-separated families to check (default: all with a task)")
    parser.add_argument("--precisions", default=None,
                        help=f"comma-separated precisions (default: {','.join(PRECISIONS)}; with --cpu: "
                        f"{','.join(CPU_PRECISIONS)})")
    parser.add_argument("--cpu", action="store_true",
                        help="dry run without a GPU: the same runs on the CPU, expecting every phase on 'cpu'")
    parser.add_argument("--multi", action=argparse.BooleanOptionalAction, default=None,
                        help="also run with 2 processes through torchrun (needs 2 GPUs, or --cpu; default: when 2 or "
                        "more GPUs are visible)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take (default: 300)")
    parser.add_argument("--work", default=None, help="folder for models, data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    args.families = _choices(parser, args.families, tuple(FAMILY_TASKS), "families")
    args.precisions = _choices(parser, args.precisions or ",".join(CPU_PRECISIONS if args.cpu else PRECISIONS),
                               PRECISIONS, "precisions")
    if args.timeout <= 0:
        parser.error(f"--timeout {args.timeout!r}: need a positive number of seconds")
    return args


def machine(cpu: bool) -> tuple[str, int, dict]:
    """(expected device type, visible GPUs, environment of the runs). Without ``cpu`` a CUDA
    device is required; with it the runs see no GPU (``CUDA_VISIBLE_DEVICES`` empty)."""
    import torch

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        return "cpu", 0, {**env, "CUDA_VISIBLE_DEVICES": ""}
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA device visible to torch {torch.__version__}; run it on a GPU machine with a "
                 "CUDA build of torch, or pass --cpu for the dry run")
    return "cuda", torch.cuda.device_count(), env


def write_json(path: Path, results: list[RunResult], device_name: str, started: float) -> None:
    """Write the results so far (after every run: an interrupted check keeps what it measured)."""
    import torch

    payload = {"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
               "seconds": round(time.perf_counter() - started, 1), "ok": all(r.ok for r in results),
               "runs": [asdict(r) for r in results]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, gpus, env = machine(args.cpu)
    multi = args.multi if args.multi is not None else gpus >= 2
    import torch

    device_name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="upop-gpu-check-"))
    results: list[RunResult] = []
    try:
        for family in args.families:
            runs = [RunResult(family, FAMILY_TASKS[family], precision, processes)
                    for processes in ((1, 2) if multi else (1,)) for precision in args.precisions]
            try:
                model, data = prepare(work, family)
            except Exception as exc:  # recorded for each of its runs; the other families still run
                for r in runs:
                    r.reason = f"preparing the model or data failed: {type(exc).__name__}: {one_line(str(exc))}"
                results += runs
                continue
            for r in runs:
                run_one(r, model, data, work, device, env, args.timeout)
                results.append(r)
                print(f"{r.family} {r.precision} x{r.processes}: {'ok' if r.ok else 'FAILED: ' + r.reason} "
                      f"({r.wall_seconds:.1f} s)", flush=True)
                write_json(out, results, device_name, started)
        write_json(out, results, device_name, started)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nGPU check on {device_name}, {time.perf_counter() - started:.0f} s; per phase: seconds (steps/s)")
    print(table(results))
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results) - failed}/{len(results)} runs ok; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
