"""Scheduling of the suite over pytest-xdist workers (``make test`` runs ``-n auto --dist loadfile``).

xdist hands whole test files to the workers in collection order, so a costly file collected last
keeps one worker busy while the others idle. The files are therefore collected costliest first,
by the seconds each took in a recorded run (``tests/test_costs.json``; a file not in it, e.g. a
new one, goes first, as if costly). The order of the tests inside a file is unchanged, and no test
depends on another file's. Record the costs again after adding heavy tests::

    UPOP_RECORD_TEST_COSTS=1 make test

(the controller process sums every test's setup, call and teardown seconds per file and writes the
file at the end of the run; record it from a whole run, not a selection).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

COSTS = Path(__file__).with_name("test_costs.json")
_RECORD = os.environ.get("UPOP_RECORD_TEST_COSTS") == "1"
_seconds: dict[str, float] = defaultdict(float)


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _costs() -> dict[str, float]:
    try:
        data = json.loads(COSTS.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def pytest_collection_modifyitems(session, config, items):
    costs = _costs()
    unknown = max(costs.values(), default=0.0) + 1.0
    order = {f: i for i, f in enumerate(dict.fromkeys(_file(item.nodeid) for item in items))}
    items.sort(key=lambda item: (-costs.get(_file(item.nodeid), unknown), order[_file(item.nodeid)]))


def pytest_runtest_logreport(report):
    if _RECORD:
        _seconds[_file(report.nodeid)] += report.duration


def pytest_sessionfinish(session, exitstatus):
    worker = hasattr(session.config, "workerinput")  # an xdist worker: the controller records
    if _RECORD and not worker and _seconds:
        COSTS.write_text(json.dumps({k: round(v, 1) for k, v in sorted(_seconds.items())}, indent=1) + "\n")
