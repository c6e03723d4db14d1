"""Run every benchmark and refresh docs/results.md.

    python benchmarks/run_all.py            # everything, full size (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # every benchmark in its CI-sized variant
    python benchmarks/run_all.py --only speed overhead
    python benchmarks/run_all.py --jobs 1   # strictly one after another

Two phases:

1. the *quality* benchmarks (ablations, vision ratios, BLIP tasks) train models and report
   metrics, not times, so they run ``--jobs`` at a time (default: one per core, up to 2), each
   with one torch thread;
2. the *timing* benchmarks (speed, overhead, scaling, data loading) then run one at a time on the otherwise
   idle machine, so their ratios are not disturbed by the training runs.

Each benchmark writes results/NAME.json and results/NAME.md; results/run_all.json records how
long each one and the whole command took; then summarize.py rebuilds docs/results.md from
the full-size results files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine  # noqa: E402

# the transfer benchmark: 5 seeds; at 2x and 8x only the compressing rows (4x has the references)
SEEDS = ["--seeds", "0", "1", "2", "3", "4"]
COMPRESSING = ["upop", "score", "granularity", "distill", "combined", "weight", "one-shot", "uniform", "magnitude", "random",
               "torch-pruning"]
# name -> (script and arguments, phase); the longest quality runs first so the lanes finish together
BENCHMARKS = {
    "ablations-retrieval": (["ablations.py", "--tasks", "retrieval", "--name", "ablations-retrieval"], "quality"),
    "ablations-classification": (["ablations.py", "--tasks", "classification", "--name", "ablations-classification"],
                                 "quality"),
    "blip_tasks": (["blip_tasks.py"], "quality"),
    "transfer-2x": (["transfer.py", "--ratios", "0.5", *SEEDS, "--name", "transfer-2x", "--methods", *COMPRESSING],
                    "quality"),
    "transfer-4x": (["transfer.py", "--ratios", "0.75", *SEEDS, "--name", "transfer-4x"], "quality"),
    "transfer-8x": (["transfer.py", "--ratios", "0.875", *SEEDS, "--name", "transfer-8x", "--methods", *COMPRESSING],
                    "quality"),
    "transfer-cost": (["transfer.py", "--cost"], "timing"),
    "distill_default": (["distill_default.py"], "quality"),
    "vision_ratios": (["vision_ratios.py"], "quality"),
    "speed": (["speed.py", "--seconds", "0.5"], "timing"),
    "profile_batch1": (["profile_batch1.py", "--modes", "inference_mode", "compiled"], "timing"),
    "overhead": (["overhead.py"], "timing"),
    "scaling": (["scaling.py"], "timing"),
    "dataloading": (["dataloading.py"], "timing"),
    "startup": (["startup.py"], "timing"),
    # trains, but times generate too: alone on the machine, with its 2 threads
    "llava_vqa": (["llava_vqa.py", "--threads", "2"], "timing"),
}


def _command(name: str, quick: bool) -> list[str]:
    script, *args = BENCHMARKS[name][0]
    return [sys.executable, str(HERE / script), *args, *(["--quick"] if quick else [])]


def run_phase(names: list[str], jobs: int, quick: bool, env: dict) -> dict[str, dict]:
    """Run ``names`` with at most ``jobs`` at a time; {name: {"seconds", "returncode"}}."""
    pending, running, done = list(names), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            cmd = _command(name, quick)
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            running[name] = (subprocess.Popen(cmd, env=env), time.time())
        time.sleep(0.5)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                done[name] = {"seconds": round(time.time() - start, 1), "returncode": proc.returncode}
                print(f"== {name}: {done[name]['seconds']:.0f} s{'' if proc.returncode == 0 else ', FAILED'}", flush=True)
                del running[name]
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="quality benchmarks run this many at a time (default: min(2, cores))")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/results.md")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    names = args.only or list(BENCHMARKS)
    start = time.time()
    quality = [n for n in names if BENCHMARKS[n][1] == "quality"]
    timing = [n for n in names if BENCHMARKS[n][1] == "timing"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run_phase(quality, args.jobs, args.quick, one_thread)
    done.update(run_phase(timing, 1, args.quick, dict(os.environ)))
    total = time.time() - start
    print(f"== all: {total / 60:.1f} min", flush=True)
    if not args.only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        record = {"command": "python benchmarks/run_all.py" + (" --quick" if args.quick else ""),
                  "jobs": args.jobs, "minutes": round(total / 60, 1), "benchmarks": done, "machine": machine(),
                  "date": time.strftime("%Y-%m-%d")}
        (RESULTS / ("run_all-quick.json" if args.quick else "run_all.json")).write_text(json.dumps(record, indent=1) + "\n")
    if not args.quick and not args.no_readme:
        subprocess.run([sys.executable, str(HERE / "summarize.py")], check=True)
    failed = [n for n, r in done.items() if r["returncode"] != 0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
