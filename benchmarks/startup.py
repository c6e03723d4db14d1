"""Start-up time of the command line and the package: what a user waits for before anything runs.

    python benchmarks/startup.py            # 9 runs of each command
    python benchmarks/startup.py --quick    # 2 runs, for CI

Each command runs in a fresh interpreter (as a user runs it); the table gives the median and the
range of the wall time over the runs, and whether the command imported torch (the bulk of the
cost: ``upop --help`` and ``import upop`` should not). Goal: ``upop --help`` under 1.5 s on the
2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

PY = sys.executable
#: name -> (argv, python code that prints whether torch got imported, or None for a CLI command)
COMMANDS = {
    "upop --help": ([PY, "-m", "upop", "--help"], None),
    "upop compress --help": ([PY, "-m", "upop", "compress", "--help"], None),
    "upop make-model --help": ([PY, "-m", "upop", "make-model", "--help"], None),
    "import upop": ([PY, "-c", "import sys, upop; print('torch' in sys.modules)"], "import"),
    "import upop; upop.UPopConfig": ([PY, "-c", "import sys, upop; upop.UPopConfig; print('torch' in sys.modules)"],
                                     "import"),
    "import upop; upop.compress": ([PY, "-c", "import sys, upop; upop.compress; print('torch' in sys.modules)"],
                                   "import"),
}
GOAL_S = 1.5


def _torch_in_cli(argv: list[str]) -> bool:
    """Whether the CLI command imports torch (its parser runs, then the check exits)."""
    code = ("import sys, runpy; sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('upop', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "sys.stdout = sys.__stdout__; print('torch' in sys.modules)").format(argv=["upop", *argv[3:]])
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=False).stdout.split()
    return bool(out) and out[-1] == "True"


def measure(runs: int) -> dict[str, dict]:
    rows = {}
    for name, (argv, kind) in COMMANDS.items():
        times, out = [], ""
        for _ in range(runs):
            start = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - start)
            out = proc.stdout
        torch_loaded = out.split()[-1] == "True" if kind == "import" else _torch_in_cli(argv)
        rows[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                      "runs": runs, "imports_torch": torch_loaded}
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["| command | median (s) | range (s) | imports torch |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| `{name}` | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
                     f"{'yes' if r['imports_torch'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="2 runs of each command")
    args = parser.parse_args()
    rows = measure(2 if args.quick else args.runs)
    help_s = rows["upop --help"]["median_s"]
    text = (f"## Start-up time\n\nWall time of each command in a fresh interpreter. `upop --help`: {help_s:.2f} s "
            f"(goal: under {GOAL_S} s: {'met' if help_s < GOAL_S else 'not met'}).\n\n" + table(rows) + "\n")
    print(text)
    write_results("startup-quick" if args.quick else "startup", {"rows": rows, "goal_s": GOAL_S}, text)


if __name__ == "__main__":
    main()
