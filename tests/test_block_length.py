"""The ``block_length`` setting of the ``lm`` task: a UPopConfig field and a ``--block-length``
option (compress and evaluate), checked in one line, in the run's fingerprint (a changed block length
is another run), and what the task's collator cuts documents at."""

from __future__ import annotations

import pytest

import upop
from upop.cli.main import build_parser, main
from upop.config import SETTINGS_VERSION, ResolvedSettings
from upop.data.tokenizer import build_shapes_tokenizer
from upop.engine.resume import check_same_run, compared_settings, differences
from upop.errors import ConfigError
from upop.tasks import get_task
from upop.tasks.lm import DEFAULT_BLOCK

REQUIRED = {"compress": ["--model", "m", "--task", "lm", "--data", "d", "--out", "o"],
            "evaluate": ["--model", "m", "--task", "lm", "--data", "d"]}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_the_option_is_parsed_and_listed_in_help(command, capsys):
    args = build_parser().parse_args([command, *REQUIRED[command], "--block-length", "64"])
    assert args.block_length == 64
    assert build_parser().parse_args([command, *REQUIRED[command]]).block_length is None  # unset: the task decides
    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--block-length" in help_text and "range 2..1048576" in help_text


@pytest.mark.parametrize("value", ["1", "0", "-3", "abc", "2.5", str(2**21)])
def test_a_bad_value_is_one_line_exit_2(value, capsys):
    assert main(["compress", *REQUIRED["compress"], "--block-length", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "block_length=" in err and "need an integer in [2," in err, err


@pytest.mark.parametrize("value", [1, 0, True, 2.5, "64", 2**21])
def test_the_config_refuses_a_bad_value_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^block_length=.* is not allowed; block_length must be an integer in "
                                          r"\[2, \d+\] \(or leave unset\)$"):
        upop.UPopConfig(block_length=value)


def test_config_round_trip(tmp_path):
    config = upop.UPopConfig(block_length=64)
    assert upop.UPopConfig.from_dict(config.to_dict()).block_length == 64
    (tmp_path / "c.yaml").write_text("block-length: '48'\n")
    assert upop.UPopConfig.from_yaml(tmp_path / "c.yaml").block_length == 48
    settings = config.resolve("lm")
    again = ResolvedSettings.from_dict(settings.to_dict())
    assert again["block_length"] == 64 and again.config().block_length == 64
    assert upop.UPopConfig().block_length is None


def _fingerprint(**given) -> dict:
    settings = upop.UPopConfig(**given).resolve("lm")
    return {"settings_version": SETTINGS_VERSION, "task": "lm", "processes": 1, "auto": [],
            "settings": compared_settings(settings), "model": "m", "data": "d"}


def test_a_changed_block_length_is_another_run(tmp_path):
    assert differences(_fingerprint(block_length=64), _fingerprint(block_length=32)) == ["block_length (64 -> 32)"]
    with pytest.raises(ConfigError, match=r"^--resume: .*block_length \(64 -> None\)"):
        check_same_run(_fingerprint(block_length=64), _fingerprint(), tmp_path)
    older = _fingerprint()  # a run started before the setting existed ran with the default
    del older["settings"]["block_length"]
    assert differences(older, _fingerprint()) == []


def test_the_lm_task_cuts_at_the_setting():
    tokenizer = build_shapes_tokenizer(model_max_length=4096)
    assert get_task("lm").configure(upop.UPopConfig()).collator(tokenizer).max_length == DEFAULT_BLOCK
    task = get_task("lm").configure(upop.UPopConfig(block_length=12))
    assert task.block_length == 12 and task.collator(tokenizer).max_length == 12
    batch = task.collator(tokenizer)([{"text": " ".join(["a red circle"] * 20)}])
    assert batch["input_ids"].shape[1] == 12
