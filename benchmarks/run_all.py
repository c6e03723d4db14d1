"""Run every benchmark and refresh the README's results section.

    python benchmarks/run_all.py            # everything, full size (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # every benchmark in its CI-sized variant
    python benchmarks/run_all.py --only speed overhead

Each benchmark writes results/NAME.json and results/NAME.md; then summarize.py rebuilds the
README's results section from the full-size results files.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = {
    "speed": ["speed.py"],
    "overhead": ["overhead.py"],
    "ablations-retrieval": ["ablations.py", "--tasks", "retrieval", "--name", "ablations-retrieval"],
    "ablations-classification": ["ablations.py", "--tasks", "classification", "--name", "ablations-classification"],
    "vision_ratios": ["vision_ratios.py"],
    "blip_tasks": ["blip_tasks.py"],
    "scaling": ["scaling.py"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS))
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's results section")
    args = parser.parse_args()
    failed = []
    for name in args.only or BENCHMARKS:
        script = HERE / BENCHMARKS[name][0]
        if not script.is_file():
            print(f"== {name}: {script.name} not found, skipped")
            continue
        cmd = [sys.executable, str(script), *BENCHMARKS[name][1:], *(["--quick"] if args.quick else [])]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.time() - start:.0f} s", flush=True)
    if not args.quick and not args.no_readme:
        subprocess.run([sys.executable, str(HERE / "summarize.py")], check=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
