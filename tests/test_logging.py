"""Logging and tracking of a run: the standard ``upop`` logger (silent in a library, printed by the
CLI), the progress lines of a run without bars, the numbers of ``log.jsonl`` in an experiment tracker
(``--report-to``: TensorBoard's event files under ``OUT/tracking``), a missing tracker package refused
in one line, and ``compress --help`` in sections."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest

from upop.cli.main import main
from upop.cli.parser import COMPRESS_GROUPS, build_parser
from upop.config import TRACKER_PACKAGES, TRACKERS, UPopConfig, config_fields
from upop.engine.runtime import ProgressLog
from upop.errors import ConfigError

from ._families import clip_world

#: the cheapest run with a search, a retraining and a validation (4 steps per epoch)
CHEAP = {"search_epochs": 1, "retrain_epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_batch_size": 32,
         "latency_time": 0.02, "distill": "none"}
CHEAP_ARGS = [a for k, v in CHEAP.items() for a in ("--" + k.replace("_", "-"), str(v))]
STEPS = 4  # per phase: 32 training samples / batch 8

#: the lines every run says, in order (the CLI printed them before the logger existed)
SAID = ("evaluating the dense model on", "pruned: removed", "evaluating the compressed model on")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return clip_world(tmp_path_factory.mktemp("world"), train=32, val=8, test=8)


def _compress_argv(world: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
            "--out", str(out), *CHEAP_ARGS, *extra]


@pytest.fixture(scope="module")
def cli_run(world, tmp_path_factory):
    """One ``upop compress --no-progress --progress-every 1 --report-to tensorboard``: (out, stdout)."""
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install 'upop[tracking]')")
    out = tmp_path_factory.mktemp("cli") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(_compress_argv(world, out, "--no-progress", "--progress-every", "1", "--report-to", "tensorboard"))
    assert code == 0, printed.getvalue()[-2000:]
    return out, printed.getvalue()


def _in_order(text: str, needles) -> bool:
    at = 0
    for needle in needles:
        at = text.find(needle, at)
        if at < 0:
            return False
    return True


def test_the_logger_receives_a_run_and_the_library_prints_nothing(world, tmp_path, capsys, caplog):
    from upop.api import compress
    from upop.models.folders import load_any

    model, processor = load_any(world / "model")
    caplog.set_level(logging.INFO, logger="upop")
    capsys.readouterr()
    compress(model, "retrieval", world / "data", processor=processor, out_dir=tmp_path / "run",
             config=UPopConfig(**CHEAP, progress_every=3600), progress=False)
    printed = capsys.readouterr()
    messages = [r.getMessage() for r in caplog.records if r.name == "upop"]
    assert _in_order("\n".join(messages), SAID), messages
    # without bars, each phase says its first step through the logger (the next only after an hour)
    for phase in ("search", "retrain"):
        assert sum(m.startswith(f"{phase} step 1/{STEPS}, loss ") for m in messages) == 1, messages
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "upop")
    # the library itself prints nothing: its messages are the application's to show
    assert printed.out == "", printed.out
    assert not any(said in printed.err for said in SAID), printed.err


def test_the_cli_prints_the_run_and_progress_lines(cli_run):
    out, printed = cli_run
    lines = printed.splitlines()
    assert _in_order(printed, (*SAID, "Compressed model:")), printed
    for phase in ("search", "retrain"):
        steps = [line for line in lines if line.startswith(f"{phase} step ")]
        assert steps and steps[0].startswith(f"{phase} step 1/{STEPS}, loss "), lines
        assert all(", elapsed " in line for line in steps)
    # the CLI's handler is gone after the command: a library call in the same process prints nothing
    assert all(isinstance(h, logging.NullHandler) for h in logging.getLogger("upop").handlers)


def test_progress_lines_come_every_n_seconds(caplog):
    now = [0.0]
    caplog.set_level(logging.INFO, logger="upop")
    bar = ProgressLog(total=10, initial=2, desc="retrain", every=60, clock=lambda: now[0])
    for t in (1, 30, 60.5, 61, 120, 125, 190):
        now[0] = t
        bar.set_postfix(loss=f"{t / 100:.4f}")
        bar.update(1)
    bar.close()
    assert [r.getMessage() for r in caplog.records] == [
        "retrain step 3/10, loss 0.0100, elapsed 0:00:01",
        "retrain step 6/10, loss 0.6100, elapsed 0:01:01",
        "retrain step 8/10, loss 1.2500, elapsed 0:02:05",
        "retrain step 9/10, loss 1.9000, elapsed 0:03:10",
    ]


def test_report_to_tensorboard_writes_the_run_numbers(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = cli_run
    events = sorted((out / "tracking").rglob("events.out.tfevents.*"))
    assert events, list((out / "tracking").rglob("*"))
    scalars: dict[str, list] = {}
    for folder in sorted({e.parent for e in events}):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for phase in ("search", "retrain"):
        expected = {r["step"]: r["loss"] for r in log if r["phase"] == phase}
        assert len(expected) == STEPS
        written = {e.step: e.value for e in scalars[f"{phase}/loss"]}
        assert written == pytest.approx(expected, rel=1e-6)
    assert [e.value for e in scalars["retrain/lr"]] == pytest.approx([r["lr"] for r in log if r["phase"] == "retrain"])
    assert {e.step for e in scalars["val/r_mean"]} == {r["step"] for r in log if r["phase"] == "val"}
    for phase in ("dense_eval", "search", "retrain", "final_eval", "latency"):
        assert scalars[f"phase_end/{phase}/seconds"][0].value > 0


@pytest.mark.parametrize("tracker", [t for t in TRACKERS if t != "none"])
def test_a_tracker_not_installed_is_one_line_exit_2(tracker, world, tmp_path, capsys, monkeypatch):
    package = TRACKER_PACKAGES[tracker][0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_compress_argv(world, out, "--no-progress", "--report-to", tracker)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"upop: error: report_to='{tracker}'"), err
    assert "pip install" in err and package in err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="pip install"):  # the Python API refuses the same
        from upop.api import compress

        compress(None, "retrieval", config=UPopConfig(report_to=tracker))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_wandb(world, tmp_path, capsys):
    capsys.readouterr()
    assert main(_compress_argv(world, tmp_path / "run", "--report-to", "wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("upop: error: report_to='wandb' is not allowed here: the wandb package is not installed; install "
                   "it with pip install wandb, or use report_to none")


def _compress_parser():
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["compress"]


def test_compress_help_is_grouped_and_lists_every_option_once():
    compress = _compress_parser()
    text = compress.format_help()
    assert _in_order(text, [f"\n{title}:\n" for title in COMPRESS_GROUPS.values()]), text
    titles = {group.title: group for group in compress._action_groups}
    group_of = {f.name: f.metadata.get("group") for f in fields(UPopConfig)}
    assert set(group_of.values()) == set(COMPRESS_GROUPS), group_of
    for name, *_ in config_fields():
        flag = "--" + name.replace("_", "-")
        assert text.count(f"\n  {flag} ") + text.count(f"\n  {flag}\n") == 1, flag
        section = titles[COMPRESS_GROUPS[group_of[name]]]
        assert any(flag in action.option_strings for action in section._group_actions), (flag, section.title)
    for name, *_ in config_fields(task_only=True):  # task options stay with the data and the task
        assert group_of[name] == "data", name
    heads = [", ".join(action.option_strings) for action in compress._actions]  # "-h, --help", "--model"
    assert len(heads) == len(set(heads)) and len(heads) > len(list(config_fields()))
    for head in heads:  # every option is listed once, in one section
        assert text.count(f"\n  {head} ") + text.count(f"\n  {head}\n") == 1, head
