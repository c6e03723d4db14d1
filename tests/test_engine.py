"""Engine tests, table-driven over every supported family (tests/_families.py)."""

from __future__ import annotations

import collections
import json

import pytest
import torch

import upop
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.checkpoint.hub import own_model_type
from upop.errors import CheckpointError, UnsupportedModelError

from ._families import FAMILIES, edit_plan, prunable_params, save_pruned_clip

NAMES = sorted(FAMILIES)


def _random_masks(masks, seed=1, drop=0.4):
    """Random 0/1 masks: every group keeps a unit and, from two units on, loses one (the one after
    the unit it keeps, where the draw kept them all)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in masks.items():
            keep = (torch.rand(m.numel(), generator=g) >= drop).float()
            kept = int(torch.randint(m.numel(), (1,), generator=g))
            keep[kept] = 1.0
            if keep.all() and m.numel() > 1:
                keep[(kept + 1) % m.numel()] = 0.0
            m.copy_(keep)


@pytest.mark.parametrize("family", NAMES)
def test_groups_and_costs(family):
    build, _, expected = FAMILIES[family]
    model = build()
    groups = upop.find_groups(model)
    assert collections.Counter((g.kind, g.modality) for g in groups) == expected
    assert len({g.name for g in groups}) == len(groups)
    assert upop.prunable_cost(groups, "params") == prunable_params(model, groups)
    for g in groups:
        assert g.param_cost > 0 and g.flop_cost > 0
        # tiny: width 32, 4 heads of 8 channels (rotary pairs: 4 units), MLP 64
        assert g.num_units == ((32 // 4) // (2 if g.rope else 1) if g.kind == "attention" else 64)


@pytest.mark.parametrize("family", NAMES)
def test_masked_equals_pruned(family):
    build, forward, _ = FAMILIES[family]
    model = build()
    dense_params = upop.count_params(model)
    with torch.no_grad():
        dense = forward(model)
    masks = upop.attach_masks(model)
    _random_masks(masks)
    removed = sum(g.param_cost * int((masks[g.name] == 0).sum()) for g in masks.groups)
    with torch.no_grad():
        masked = forward(model)
        # the masks really act: the masked outputs differ from the dense ones
        assert max((a - b).abs().max().item() for a, b in zip(dense, masked)) > 1e-4
        plan = upop.prune(model, masks)
        pruned = forward(model)
    for a, b in zip(masked, pruned):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5
    assert upop.count_params(model) == dense_params - removed
    assert all(len(gp.kept) < gp.dense_units for gp in plan.groups.values())
    assert 0.2 < plan.achieved_ratio["params"] < 0.6


@pytest.mark.parametrize("family", NAMES)
def test_round_trip(family, tmp_path):
    build, forward, _ = FAMILIES[family]
    model = build()
    masks = upop.attach_masks(model)
    _random_masks(masks, seed=3)
    upop.prune(model, masks)
    upop.save_compressed(model, tmp_path / "ckpt")
    loaded = upop.load_compressed(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    with torch.no_grad():
        for a, b in zip(forward(model), forward(loaded)):
            assert torch.equal(a, b)
    # the folder records upop's own model type (plain transformers then asks for trust_remote_code);
    # the loaded model's config has the dense one
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"]
    assert saved == own_model_type(type(model.config)) and saved.startswith("upop_")
    assert loaded.config.model_type == model.config.model_type
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def test_plan_json_is_sorted_and_versioned(tmp_path):
    model = FAMILIES["clip"][0]()
    masks = upop.attach_masks(model)
    _random_masks(masks)
    upop.prune(model, masks)
    upop.save_compressed(model, tmp_path / "c")
    text = (tmp_path / "c" / "upop_plan.json").read_text()
    data = json.loads(text)
    assert data["format_version"] == 1 and data["model_class"] == "CLIPModel"
    assert text == json.dumps(data, indent=1, sort_keys=True) + "\n"


def _saved(tmp_path):
    return save_pruned_clip(tmp_path, _random_masks)


TAMPER = {
    "kept index out of range": (lambda d: d["groups"][next(iter(d["groups"]))]["kept"].append(10_000), "outside"),
    "different kept count": (lambda d: d["groups"][next(iter(d["groups"]))]["kept"].pop(), "shape"),
    "unsorted kept": (lambda d: d["groups"][next(iter(d["groups"]))]["kept"].reverse(), "sorted"),
    "unknown group": (lambda d: d["groups"].update({"nope.attn": d["groups"][next(iter(d["groups"]))]}), "nope.attn"),
    "missing group": (lambda d: d["groups"].pop(next(iter(d["groups"]))), "missing"),
    "bad version": (lambda d: d.update(format_version=99), "format_version 99"),
    "unknown class": (lambda d: d.update(model_class="os.system"), "os.system"),
    "wrong dense size": (lambda d: d["groups"][next(iter(d["groups"]))].update(dense_units=5), "dense_units 5"),
    "model type mismatch": (lambda d: d.update(model_type="vit"), "does not match"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_plan_is_a_clear_error(case, tmp_path):
    path = _saved(tmp_path)
    edit, needle = TAMPER[case]
    edit_plan(path, edit)
    with pytest.raises(CheckpointError) as info:
        upop.load_compressed(path)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_tampered_weights_are_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    state = load_file(str(path / WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=key):
        upop.load_compressed(path)
    (path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        upop.load_compressed(path)
    (path / "upop_plan.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        upop.load_compressed(path)


def test_unsupported_model_names_supported_types():
    import transformers

    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(UnsupportedModelError) as info:
        upop.find_groups(model)
    assert "gpt2" in str(info.value) and "clip" in str(info.value) and "blip" in str(info.value)


def test_user_spec(tmp_path):
    """A spec of the user's own prunes a model the registry does not know."""
    import transformers
    from upop.arch import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)).eval()
    spec = ArchSpec(
        name="my-clip-text",
        model_types=("custom",),
        towers=(
            Tower(
                ("encoder.layers",),
                "text",
                (AttentionSite(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.out_proj"),),
                MlpSite("mlp.fc1", "mlp.fc2"),
            ),
        ),
        set_head_dim=set_attrs(head_dim=lambda new, dense, heads: new),
    )
    clip_text = FAMILIES["clip-text"][0]()
    groups = upop.find_groups(clip_text, spec=spec)
    assert len(groups) == 4
    with pytest.raises(UnsupportedModelError):
        upop.find_groups(model, spec=spec)
    # prune with it, save, and load back: with the spec given, or with a one-line error naming the fix
    masks = upop.attach_masks(clip_text, groups, spec=spec)
    for g in masks.groups:
        masks[g.name].data[: g.num_units // 2] = 0.0
    plan = upop.prune(clip_text, masks)
    assert plan.spec == "my-clip-text"
    upop.save_compressed(clip_text, tmp_path / "c", plan=plan)
    with pytest.raises(CheckpointError, match="spec=your_spec"):
        upop.load_compressed(tmp_path / "c")
    loaded = upop.load_compressed(tmp_path / "c", spec=spec)
    ids = torch.randint(5, 60, (2, 7))
    assert torch.allclose(loaded(input_ids=ids).last_hidden_state, clip_text(input_ids=ids).last_hidden_state, atol=1e-6)
