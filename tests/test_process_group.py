"""The command line ends the process group a run made (torchrun: Accelerate's, in ``compress``), on
success and on error, and leaves one its caller made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import upop.cli.main as cli
from upop.errors import ConfigError

ARGS = ["compress", "--model", "m", "--task", "lm", "--data", "d", "--out", "o"]

#: what the stand-in command does after making the group, and the exit code main returns (None: raises)
OUTCOMES = {"success": (lambda: 0, 0), "user error": (ConfigError("bad value"), 2),
            "unexpected error": (RuntimeError("a bug"), None)}


def _group(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=(tmp_path / "group").as_uri(), rank=0, world_size=1)


@pytest.fixture
def no_group():
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():  # a failed test must not leave its group to the next one
        dist.destroy_process_group()


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_a_group_the_run_made_is_destroyed(outcome, tmp_path, monkeypatch, capsys, no_group):
    then, code = OUTCOMES[outcome]
    seen = []

    def command(args) -> int:
        _group(tmp_path)
        seen.append(dist.is_initialized())
        if isinstance(then, BaseException):
            raise then
        return then()

    monkeypatch.setitem(cli.COMMANDS, "compress", command)
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            cli.main(ARGS)
    else:
        assert cli.main(ARGS) == code
    assert seen == [True] and not dist.is_initialized()


def test_a_group_the_caller_made_is_left_to_the_caller(tmp_path, monkeypatch, no_group):
    monkeypatch.setitem(cli.COMMANDS, "compress", lambda args: 0)
    _group(tmp_path)
    assert cli.main(ARGS) == 0
    assert dist.is_initialized()


SCRIPT = """
import sys
import torch.distributed as dist
import upop.cli.main as cli

def command(args):
    from accelerate import PartialState  # as compress makes its group
    PartialState(cpu=True)
    assert dist.is_initialized() and dist.get_world_size() == 2
    return 0

cli.COMMANDS["compress"] = command
code = cli.main(sys.argv[1:])
print(f"code={code} group={dist.is_initialized()}", flush=True)
sys.exit(code)
"""


def test_under_torchrun_every_process_ends_the_group(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29717", str(script), *ARGS],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("code=0 group=False") == 2, proc.stdout
