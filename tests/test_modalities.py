"""``modalities`` (``--modalities``): the search ranks only the groups of the named modalities; the
others get no mask and stay dense, and the ratio is a share of the searched groups' cost.

Table-driven over the registry's tiny models whose groups span two modalities or more (one task each,
from :func:`upop.arch.pairs`): the first in the default suite, the others ``slow`` (a short compress each).
"""

from __future__ import annotations

import pytest

import upop
from upop.arch import find_groups, pairs
from upop.arch.groups import MODALITIES
from upop.cli.main import main
from upop.config import MODALITY_NAMES, UPopConfig
from upop.engine.resume import differences, fingerprint
from upop.errors import ConfigError
from upop.models.folders import load_any, make_model
from upop.pruning.prune import removed_cost
from upop.tasks import get_task

from .test_kill_resume import folders  # noqa: F401 (the fixture: tiny models and Shapes data, shared)

RATIO = 0.5
SETTINGS = dict(ratio=RATIO, search_epochs=1, retrain_epochs=1, batch_size=4, lr=1e-3, interval=1,
                latency_time=0.02, eval_batch_size=8)


def _modalities(name: str) -> list[str]:
    """The modalities of tiny model ``name``'s groups, in model order."""
    return list(dict.fromkeys(g.modality for g in find_groups(make_model(name, image_size=32))))


def _cases() -> list:
    """(tiny model, its first task, the modality to search: that of its last group) per tiny model of
    two modalities or more; the first in the default suite, the rest slow."""
    seen, cases = set(), []
    for name, task in pairs():
        if name in seen or len(mods := _modalities(name)) < 2:
            continue
        seen.add(name)
        marks = [] if not cases else [pytest.mark.slow]
        cases.append(pytest.param(name, task, mods[-1], marks=marks, id=f"{name}-{task}-{mods[-1]}"))
    return cases


CASES = _cases()


def test_the_table_is_not_empty_and_the_names_are_the_groups():
    assert CASES, "no tiny model of the registry has groups of two modalities"
    assert set(MODALITY_NAMES) == set(MODALITIES)  # config.py keeps a torch-free copy

@pytest.mark.parametrize("name, task, modality", CASES)
def test_only_the_named_modality_is_pruned_to_the_ratio_of_its_cost(name, task, modality, folders, tmp_path):
    model_dir, data = folders(name, task)
    model, processor = load_any(model_dir)
    every = find_groups(model)
    dense_shapes = {g.name: [tuple(model.get_submodule(p).weight.shape) for p in g.producers] for g in every}
    result = upop.compress(model, task, data, processor=processor, config=UPopConfig(modalities=modality, **SETTINGS),
                           out_dir=tmp_path / "run", progress=False, log=lambda m: None)
    plan, compressed = result.plan, result.model
    searched = [g for g in every if g.modality == modality]
    others = [g for g in every if g.modality != modality]
    assert searched and others
    for g in others:  # every unit kept, the loaded model's weights of the dense shapes
        assert g.name not in plan.groups or plan.groups[g.name].kept == list(range(g.num_units)), g.name
        assert [tuple(compressed.get_submodule(p).weight.shape) for p in g.producers] == dense_shapes[g.name]
    kept = {g.name: len(plan.groups[g.name].kept) for g in searched}
    assert any(kept[g.name] < g.num_units for g in searched)
    removed, total = removed_cost(searched, kept, "params")
    assert plan.achieved_ratio["params"] == pytest.approx(removed / total)
    assert removed / total == pytest.approx(RATIO, abs=0.05)  # the ratio, of the searched groups' cost
    removed_all, total_all = removed_cost(every, {**{g.name: g.num_units for g in others}, **kept}, "params")
    assert removed_all == removed and removed_all / total_all < removed / total
    assert plan.search["modalities"] == modality
    assert f"of the {modality} groups only" in (tmp_path / "run" / "report.md").read_text()
    assert f"of the {modality} groups: the search ranked those only" in \
        (tmp_path / "run" / "compressed" / "README.md").read_text()


@pytest.mark.parametrize("name, task, modality", CASES[:1])
def test_a_bad_value_and_a_modality_the_model_lacks_are_refused_in_one_line(name, task, modality, folders, tmp_path,
                                                                             capsys):
    with pytest.raises(ConfigError, match=r"^modalities='audio' is not allowed; modalities must be all or a comma "
                                          r"list of text, vision, fusion, decoder, each once$"):
        UPopConfig(modalities="audio")
    model_dir, data = folders(name, task)
    base = ["compress", "--model", str(model_dir), "--task", task, "--data", str(data), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main([*base, "--modalities", "text,audio"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "modalities='text,audio' is not allowed" in err
    have = _modalities(name)
    lacking = [m for m in MODALITY_NAMES if m not in have]
    if lacking:  # checked once the groups are known, before the run's folder is touched
        assert main([*base, "--modalities", f"{have[0]},{lacking[0]}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"has modalities {', '.join(have)}; {lacking[0]} selects no group" in err, err
        assert not (tmp_path / "o").exists()


def test_compress_help_lists_the_setting(capsys):
    assert main(["compress", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--modalities MODALITIES" in out and "share of the searched groups' cost" in out


def test_resume_compares_it_and_a_run_from_before_it_resumes():
    model = make_model(CASES[0].values[0], image_size=32)

    def fp(**settings):
        resolved = UPopConfig(**settings).resolve(get_task("retrieval"), search_steps=40)
        return fingerprint(task="retrieval", settings=resolved, model=model, datasets={}, processes=1)

    assert differences(fp(), fp(modalities="text")) == ["modalities ('all' -> 'text')"]
    older = fp()
    older["settings"] = {k: v for k, v in older["settings"].items() if k != "modalities"}  # before the setting
    assert differences(older, fp()) == []
    assert differences(older, fp(modalities="vision")) == ["modalities ('all' -> 'vision')"]
