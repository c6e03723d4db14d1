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
    "ablations": ["benchmarks/ablations.py", "--quick", "--tasks", "retrieval"],
    "scaling": ["benchmarks/scaling.py", "--quick"],
}


@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_benchmark_writes_results(name, tmp_path):
    env = {**os.environ, "UPOP_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *QUICK[name]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / f"{name}-quick.json").read_text())
    assert data["rows"] and data["machine"]["cpu_count"] and data["command"].startswith("python benchmarks/")
    md = (tmp_path / f"{name}-quick.md").read_text()
    assert "Command:" in md and "|" in md


def test_summarize_rebuilds_the_readme_section(tmp_path):
    text = (ROOT / "README.md").read_text()
    assert "<!-- results:start -->" in text and "<!-- results:end -->" in text
