"""Rebuild the tables of docs/results.md from benchmarks/results/*.md (full-size runs only).

    python benchmarks/summarize.py

Every table between the page's markers is a results file written by a benchmark, with the exact
command and the machine it ran on under it; nothing is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
PAGE = ROOT / "docs" / "results.md"  # the README links to it; the README itself holds no results tables
ORDER = ["speed", "profile_batch1", "overhead", "ablations-retrieval", "ablations-classification", "transfer-2x", "transfer-4x",
         "transfer-8x", "transfer-cost", "distill_default", "vision_ratios", "blip_tasks", "scaling", "dataloading"]


def section() -> str:
    parts = []
    names = [n for n in ORDER if (RESULTS / f"{n}.md").is_file()]
    names += sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in ORDER and not p.stem.endswith("quick"))
    for name in names:
        text = (RESULTS / f"{name}.md").read_text().strip()
        text = "\n".join(("### " + line[2:]) if line.startswith("# ") else ("####" + line[2:]) if line.startswith("## ")
                         else line for line in text.splitlines())
        parts.append(text)
    if not parts:
        return "No results yet: run `make bench`."
    timing = RESULTS / "run_all.json"
    if timing.is_file():
        run = json.loads(timing.read_text())
        m = run["machine"]
        each = ", ".join(f"{n} {r['seconds'] / 60:.0f}" for n, r in run["benchmarks"].items())
        parts.insert(0, f"The last `{run['command']}` ({run['jobs']} quality benchmarks at a time) regenerated every "
                        f"table below in {run['minutes']:.0f} minutes on {m['cpu_count']} CPU cores ({m['processor']}), "
                        f"{run['date']}; minutes each: {each}.")
    return "\n\n".join(parts)


def main() -> None:
    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE.relative_to(ROOT)} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    print(f"{PAGE.relative_to(ROOT)} tables rebuilt from", RESULTS)


if __name__ == "__main__":
    main()
