"""Settings resolved once (:class:`upop.config.ResolvedSettings`): every ``auto`` / unset default
decided with a reason for every task, frozen, written to ``run.json`` and the report, compared on
resume (versioned: an unversioned run migrates, a newer one is refused), and one validation shared
by ``UPopConfig`` and the Trainer callback."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from upop.api import compress, run_settings
from upop.config import (AS_SET, DECIDED, INT_RANGES, SETTINGS_VERSION, ResolvedSettings, UPopConfig,
                         config_fields)
from upop.engine.resume import DISTILL_ONLY, FREE_SETTINGS, MIGRATIONS, check_same_run, differences, fingerprint
from upop.errors import ConfigError
from upop.integrations.transformers.callback import UPopTrainerCallback
from upop.models.folders import load_any
from upop.search.settings import DISTILL_MODES
from upop.tasks import get_task, task_names

from ._families import FAMILIES, clip_world

#: (device type, processes) a run may resolve for
DEVICES = [("cpu", 1), ("cuda", 1), ("cuda", 4)]

#: a value set by hand for every decided setting (a new decided setting needs its row)
SET = {"distill": "none", "ranking": "score", "interval": 3, "retrain_lr": 1e-4, "workers": 2, "round_to": 4,
       "latency_batch_size": 16}


def test_the_explicit_table_covers_every_decided_setting():
    assert set(SET) == set(DECIDED)


@pytest.mark.parametrize("device, processes", DEVICES)
@pytest.mark.parametrize("task", task_names())
def test_every_auto_setting_resolves_with_a_reason(task, device, processes):
    config = UPopConfig()
    assert all(config.to_dict()[name] in ("auto", None) for name in DECIDED)  # the defaults are all left to upop
    settings = config.resolve(get_task(task), device_type=device, processes=processes, search_steps=40)
    assert settings.version == SETTINGS_VERSION and settings.task == task and settings.search_steps == 40
    for name in DECIDED:
        assert settings.why[name].strip() and settings.why[name] != AS_SET, name
        assert settings.given[name] == config.to_dict()[name]
        if name != "round_to":  # needs the model's groups: the run decides it
            assert settings[name] not in ("auto", None), name
    assert settings["distill"] in DISTILL_MODES
    assert 1 <= settings["interval"] < 40
    assert settings.config().to_dict() == dict(settings.values)  # the decided values are valid settings
    explicit = UPopConfig(**SET).resolve(get_task(task), device_type=device, processes=processes, search_steps=40)
    assert {name: explicit[name] for name in DECIDED} == SET
    assert all(explicit.why[name] == AS_SET for name in DECIDED)


def test_resolved_settings_are_frozen_and_round_trip():
    settings = UPopConfig().resolve("retrieval", search_steps=40)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.version = 2
    with pytest.raises(TypeError):
        settings.values["ratio"] = 0.9
    with pytest.raises(TypeError):
        settings.why["distill"] = "mine"
    later = settings.decide("round_to", 8, "auto: multiples of 8")
    assert later["round_to"] == 8 and later.why["round_to"] == "auto: multiples of 8"
    assert settings["round_to"] == "auto"  # the object itself is unchanged
    with pytest.raises(ValueError, match="not a decided setting"):
        settings.decide("ratio", 0.9, "mine")
    data = json.loads(json.dumps(later.to_dict()))
    assert ResolvedSettings.from_dict(data) == later
    with pytest.raises(ConfigError, match="settings version 2 is not this upop's") as info:
        ResolvedSettings.from_dict({**data, "version": 2})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method, refused", [("upop", True), ("one-shot", False)])
def test_a_progressive_search_needs_more_steps_than_its_interval(method, refused):
    config = UPopConfig(interval=5, method=method)
    if refused:
        with pytest.raises(ConfigError, match=r"the search has 5 steps \(2 epochs\) and interval=5"):
            config.resolve("retrieval", search_steps=5, length="2 epochs")
    else:
        assert config.resolve("retrieval", search_steps=5)["interval"] == 5


# resume ------------------------------------------------------------------------------------------------

_FILL = {"retrain_lr": 1e-4, "max_grad_norm": 1.0, "answer_list": "answers.json"}  # unset floats and paths
_TEXT = {"modalities": "text"}  # free-text settings: another valid value


def _other(name: str, value):
    """A valid value of setting ``name`` other than ``value``."""
    choices = next(c for n, _, _, c in config_fields() if n == name)
    if choices:
        return [c for c in choices if c != value][-1]
    if isinstance(value, bool):
        return not value
    if value == "auto":  # round_to, latency_batch_size
        return 1
    if name in INT_RANGES:
        return 2 if value is None else value + 1
    if value is None:
        return _FILL[name]
    if isinstance(value, str):
        return _TEXT[name]
    return value / 2 if value else 0.5


@pytest.fixture(scope="module")
def model():
    return FAMILIES["clip"][0]()


def _fp(model, task="retrieval", **settings):
    resolved = UPopConfig(**settings).resolve(get_task(task), search_steps=40)
    return fingerprint(task=task, settings=resolved, model=model, datasets={}, processes=1)


#: the task that reads each task setting (``task=True``); every other setting is read by all
_READER = {f.name: next(t for t in task_names() if f.name in get_task(t).settings)
           for f in dataclasses.fields(UPopConfig) if f.metadata.get("task")}


@pytest.mark.parametrize("name", [n for n, *_ in config_fields()])
def test_resume_refuses_a_changed_computing_setting_and_accepts_a_free_one(model, name):
    base = {"distill": "logits"}  # distilling: the distillation settings compute too
    value = _other(name, UPopConfig(**base).to_dict()[name])
    task = _READER.get(name, "retrieval")
    diff = differences(_fp(model, task, **base), _fp(model, task, **{**base, name: value}))
    if name in FREE_SETTINGS:
        assert diff == []
    else:
        assert len(diff) == 1 and diff[0].startswith(f"{name} ("), diff
    if name in DISTILL_ONLY:  # without distillation they change nothing
        assert differences(_fp(model, distill="none"), _fp(model, distill="none", **{name: value})) == []
    if name in _READER:  # a task setting changes nothing in another task's run
        other = next(t for t in task_names() if name not in get_task(t).settings)
        assert differences(_fp(model, other, **base), _fp(model, other, **{**base, name: value})) == []


def test_an_unversioned_fingerprint_migrates_and_a_newer_one_is_refused(model):
    current = _fp(model)  # distill auto: logits on retrieval
    old = {k: v for k, v in current.items() if k not in ("settings_version", "auto")}  # as runs wrote it before
    old["settings"] = {k: v for k, v in old["settings"].items() if k != "ranking"}  # ... and before --ranking
    assert set(MIGRATIONS) == set(range(SETTINGS_VERSION))
    assert differences(old, current) == []
    check_same_run(old, current, "runs/x")
    with pytest.raises(ConfigError, match=r"version 7, which this upop does not know") as info:
        check_same_run({**current, "settings_version": 7}, current, "runs/x")
    assert "\n" not in str(info.value)


# one validation -------------------------------------------------------------------------------------

#: a value UPopConfig refuses, for every setting the Trainer callback shares with it
BAD = {"ratio": 1.5, "interval": 0, "cost": "time", "method": "greedy", "score": "random", "round_to": 0,
       "allocation": "even", "granularity": "heads", "w_attn": -1.0, "w_mlp": float("nan"), "distill": "kl",
       "distill_weight": -1.0, "distill_temperature": "hot", "teacher_precision": "fp16", "modalities": "audio"}
#: cross-field refusals of the same settings
BAD_TOGETHER = [{"distill": "logits", "distill_weight": 0}, {"allocation": "uniform", "round_to": 8},
                {"granularity": "head", "cost": "latency"}]


def test_the_bad_value_table_covers_every_shared_setting():
    shared = set(inspect.signature(UPopTrainerCallback).parameters) & {n for n, *_ in config_fields()}
    # the Trainer's search_epochs is its own: a share of the Trainer's dataloader epochs (a float)
    assert set(BAD) == shared - {"search_epochs"}


@pytest.mark.parametrize("kwargs", [{k: v} for k, v in BAD.items()] + BAD_TOGETHER, ids=str)
def test_the_trainer_callback_refuses_what_the_config_refuses_in_the_same_words(kwargs):
    with pytest.raises(ConfigError) as config_error:
        UPopConfig(**kwargs)
    with pytest.raises(ConfigError) as callback_error:
        UPopTrainerCallback(**kwargs)
    assert str(callback_error.value) == str(config_error.value)
    assert "\n" not in str(config_error.value)


# compress -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return clip_world(tmp_path_factory.mktemp("settings-run"), 48, 8, 8)


def _compress(world, out, **kw):
    model, processor = load_any(world / "model")
    config = UPopConfig(search_epochs=1, retrain_epochs=1, batch_size=8, checkpoint_every=1, latency_time=0.02)
    return compress(model, "retrieval", world / "data", processor=processor, config=config, out_dir=out,
                    progress=False, log=lambda msg: None, **kw)


def _as_version_0(fp: dict) -> dict:
    """``fp`` as upop wrote fingerprints before settings had a version (and before ``--ranking``)."""
    old = {k: v for k, v in fp.items() if k not in ("settings_version", "auto")}
    old["settings"] = {k: v for k, v in fp["settings"].items() if k != "ranking"}
    return old


@pytest.mark.slow
def test_compress_writes_its_settings_and_an_unversioned_run_resumes(world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _compress(world, out, stop_after=2)
    run = json.loads((out / "run.json").read_text())
    settings = ResolvedSettings.from_dict(run["settings"])
    assert settings.task == "retrieval" and settings.given == run["config"]
    assert settings["round_to"] != "auto" and settings.why["round_to"].startswith("auto")  # the run decided it
    assert run["fingerprint"]["settings_version"] == SETTINGS_VERSION
    # the run as an older upop wrote it: no resolved settings, an unversioned fingerprint (here and in its state)
    del run["settings"]
    run["fingerprint"] = _as_version_0(run["fingerprint"])
    (out / "run.json").write_text(json.dumps(run))
    state = torch.load(out / "state" / "run.pt", weights_only=True)
    state["fingerprint"] = _as_version_0(state["fingerprint"])
    torch.save(state, out / "state" / "run.pt")
    result = _compress(world, out, resume=True)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"] == run["config"]  # the settings as given, as before
    resolved = ResolvedSettings.from_dict(report["resolved_settings"])
    assert resolved == ResolvedSettings.from_dict(result.report["resolved_settings"]) == settings
    assert report["round_to"] == resolved.decisions()["round_to"]
    markdown = (out / "report.md").read_text()
    assert "Settings decided by upop" in markdown and resolved.why["interval"] in markdown
    assert run_settings(out / "compressed") is None  # this run.json predates resolved settings
    # evaluate reads a run's resolved settings; a run written by a newer upop is refused in one line
    run["settings"] = settings.to_dict()
    (out / "run.json").write_text(json.dumps(run))
    assert run_settings(out / "compressed") == settings and run_settings(world / "model") is None
    run["fingerprint"] = {**run["fingerprint"], "settings_version": SETTINGS_VERSION + 1}
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match=f"version {SETTINGS_VERSION + 1}, which this upop does not know") as info:
        _compress(world, out, resume=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("affinity, env, processes, expected", [
    (range(16), None, 1, 4),        # 16 cores, one process: capped at 4
    (range(4), None, 1, 3),         # taskset to 4 of the machine's cores: 4 - 1, not the machine's count
    (range(16), "8", 16, 1),        # two nodes of 8 processes: 16 cores / 8 on this node - 1
    (range(16), None, 8, 1),        # one node, no LOCAL_WORLD_SIZE: all processes share it
    (range(2), "bad", 2, 0),        # an unreadable LOCAL_WORLD_SIZE: the processes, never an error
])
def test_workers_beside_a_gpu_follow_the_usable_cores_of_this_node(monkeypatch, affinity, env, processes, expected):
    import os

    from upop.config import decide_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's count must not be what decides
    if env is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", env)
    workers, why = decide_workers(None, "cuda", processes)
    assert workers == expected, why
    assert "usable cores" in why and "on this node" in why
    assert decide_workers(None, "cpu", processes)[0] == 0 and decide_workers(2, "cuda", processes)[0] == 2
