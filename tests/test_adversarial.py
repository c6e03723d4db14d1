"""The adversarial table: what a careless or hostile user does, and what upop must do about it.

Every row is one command (or one API call) set up in a fresh folder. Each asserts:

- the exit code (2 for a user mistake: one line ``upop: error: ...``; 0 where the command must
  simply work, e.g. data written at the smallest sizes),
- the one line (no traceback, a text the message must contain),
- that every folder the user had is byte-for-byte unchanged (a digest before and after) —
  ``watch`` names the folders of the row, the shared tiny world is always watched.

The rows live in per-area modules (``tests/_adversarial_*.py``) so that each area's setup helpers
stay beside its rows; this module only collects them and runs the one assertion every row shares.
"""

from __future__ import annotations

import pytest

from upop.cli.main import main

from ._adversarial_common import Row, one_line, sums, world  # noqa: F401 (world: the fixture)
from ._adversarial_folders import ROWS as FOLDERS
from ._adversarial_inputs import ROWS as INPUTS
from ._adversarial_loading import ROWS as LOADING
from ._adversarial_runs import ROWS as RUNS

ROWS: dict[str, Row] = {}
for _area in (FOLDERS, INPUTS, LOADING, RUNS):
    for _name, _row in _area.items():
        assert _name not in ROWS, f"two adversarial rows named {_name!r}"
        ROWS[_name] = _row


def test_the_table_covers_the_issue():
    """At least the 19 cases the round-three issue found, plus our own."""
    assert len(ROWS) >= 30


@pytest.mark.parametrize("name", sorted(ROWS))
def test_adversarial(name, world, tmp_path, capsys, monkeypatch):
    row = ROWS[name]
    monkeypatch.chdir(tmp_path)
    argv = row.setup(world, tmp_path)
    watched = [world, *(tmp_path / w for w in row.watch)]
    before = sums(*watched)
    capsys.readouterr()
    if callable(argv):  # an API call: a typed one-line error
        with pytest.raises(row.error) as info:
            argv()
        text = str(info.value)
        assert "\n" not in text and row.needle in text, text
    else:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse refusals
            code = exc.code
        out = capsys.readouterr()
        assert "Traceback" not in out.err, out.err
        assert code == row.code, (code, out.err[-2000:])
        if row.code != 0:
            line = one_line(out.err)
            assert line.startswith("upop: error:") and row.needle in line, line
    assert sums(*watched) == before, "a file the user had was changed"
    if row.after is not None:
        row.after(world, tmp_path)
