"""The benchmarks' --quick variants run and write their results (to a temporary folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

QUICK = {
    "speed": ["benchmarks/speed.py", "--quick", "--seconds", "0.02", "--rounds", "1"],
    "overhead": ["benchmarks/overhead.py", "--quick", "--steps", "1", "--models", "clip-vit-b16"],
    "ablations": ["benchmarks/ablations.py", "--quick", "--tasks", "retrieval", "--cache", "{tmp}/rows"],
    "scaling": ["benchmarks/scaling.py", "--quick"],
    "dataloading": ["benchmarks/dataloading.py", "--quick"],
    # NLVR2 starts from the VQA model: both, to cover that path
    "blip_tasks": ["benchmarks/blip_tasks.py", "--quick", "--tasks", "vqa", "nlvr"],
    "vision_ratios": ["benchmarks/vision_ratios.py", "--quick", "--tasks", "classification"],
    "profile_batch1": ["benchmarks/profile_batch1.py", "--quick"],
    "distill_default": ["benchmarks/distill_default.py", "--quick"],
    "startup": ["benchmarks/startup.py", "--quick"],
    "llava_vqa": ["benchmarks/llava_vqa.py", "--quick"],
}


@pytest.mark.slow  # CI runs these in its second stage (.ci/run): ~4 minutes on 2 cores
@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_benchmark_writes_results(name, tmp_path):
    env = {**os.environ, "UPOP_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [a.replace("{tmp}", str(tmp_path)) for a in QUICK[name]]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / f"{name}-quick.json").read_text())
    assert data["rows"] and data["machine"]["cpu_count"] and data["command"].startswith("python benchmarks/")
    md = (tmp_path / f"{name}-quick.md").read_text()
    assert "Command:" in md and "|" in md


def test_results_page_is_the_results_files():
    """docs/results.md's tables equal what summarize.py builds from benchmarks/results (no hand
    edits), they hold every full-size results file with its command line, summarize.py writes
    that page, and the README links to it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    assert summarize.PAGE == ROOT / "docs" / "results.md"
    text = summarize.PAGE.read_text()
    section = text.split(summarize.START, 1)[1].split(summarize.END, 1)[0].strip()
    assert section == summarize.section().strip()
    full = [p for p in (ROOT / "benchmarks" / "results").glob("*.md") if not p.stem.endswith("quick")]
    assert full and section.count("Command:") == len(full)
    readme = (ROOT / "README.md").read_text()
    assert "(docs/results.md" in readme and summarize.START not in readme  # no second, stale copy


def test_ablation_row_log_resumes(tmp_path):
    """benchmarks/ablations.py logs each finished row; --resume reuses them (a line cut by a kill
    is recomputed), and a run without --resume starts the log afresh."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ablations

    path = tmp_path / "rows.jsonl"
    log, rows, calls = ablations.RowLog(path, resume=False), [], []
    row = {"task": "retrieval", "method": "upop", "ratio": 0.5, "seed": 1, "metric": 42.0}
    log.add(rows, lambda: calls.append(1) or row)
    with path.open("a") as fh:
        fh.write('{"task": "retrieval", "method": "uniform", "ra')  # killed mid-write
    again = ablations.RowLog(path, resume=True)
    assert again.has("retrieval", "upop", 0.5, 1) and not again.has("retrieval", "uniform", 0.5, 1)
    assert not again.has("retrieval", "upop", 0.5, 0)
    rows2: list[dict] = []
    again.add(rows2, again.saved[("retrieval", "upop", 0.5, 1)])
    assert rows2 == [row] and calls == [1] and path.read_text().count("\n") == 1  # reused, not re-logged
    fresh = ablations.RowLog(path, resume=False)
    assert not fresh.saved and not path.exists()


def test_speed_fixed_part_bound():
    """benchmarks/speed.py's Amdahl bound: no speedup for the dense FLOPs, dense / floor for the
    floor's, and the floor plus the kept share of the prunable time in between."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    dense, floor = {"ms": 100.0, "flops": 1000}, {"ms": 20.0, "flops": 200}
    assert speed.bound(1000, dense, floor) == pytest.approx(1.0)
    assert speed.bound(200, dense, floor) == pytest.approx(5.0)
    assert speed.bound(400, dense, floor) == pytest.approx(100.0 / (20.0 + 80.0 * 0.25))
