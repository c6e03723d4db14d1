"""The stage API cannot fail silently: prune refuses unfinished masks, the search refuses a
schedule that is not progressive, and the per-step path reads nothing back from the device."""

from __future__ import annotations

import io
import math

import pytest
import torch

import upop
from upop.errors import ConfigError
from upop.search.mask_search import UPopSearch

from ._families import FAMILIES


def _model_and_masks():
    torch.manual_seed(0)
    model = FAMILIES["clip"][0]()
    return model, upop.attach_masks(model)


def _fake_grads(masks, step: int, bad: float | None = None) -> None:
    """Deterministic mask gradients for ``step`` (the first unit of the first group set to ``bad``)."""
    g = torch.Generator().manual_seed(step)
    for name, p in masks.items():
        p.grad = torch.randn(p.shape, generator=g).to(p.device)
    if bad is not None:
        p = masks[masks.groups[0].name]
        p.grad[0] = bad


def _run(search, steps, **step_kwargs) -> None:
    for t in steps:
        _fake_grads(search.masks, t)
        search.step(t, **step_kwargs)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- prune


def _stopped_early(masks):
    search = UPopSearch(masks, ratio=0.5, total_steps=6, interval=2)
    _run(search, range(3))  # the loop ran 3 of 6 steps: the prune set sits at 1 - p_t / p
    assert not search.done
    return next(g.name for g in masks.groups if ((masks[g.name] != 0) & (masks[g.name] != 1)).any())


def _fraction_in_last_group(masks):
    for g in masks.groups[:-1]:  # the earlier groups are valid and would prune
        masks[g.name].data[:2] = 0.0
    last = masks.groups[-1].name
    masks[last].data[5] = 0.25
    return last


def _nan_mask(masks):
    name = masks.groups[1].name
    masks[name].data[3] = math.nan
    return name


def _whole_group_zero(masks):
    masks[masks.groups[0].name].data[:1] = 0.0
    last = masks.groups[-1].name
    masks[last].data[:] = 0.0
    return last


REFUSED = {
    "search stopped early": (_stopped_early, "UPopSearch.done is True"),
    "a fraction in the last group only": (_fraction_in_last_group, "unit 5 = 0.25"),
    "NaN mask": (_nan_mask, "unit 3 = nan"),
    "a whole group at 0": (_whole_group_zero, "keep at least one unit"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_prune_refuses_masks_not_exactly_0_or_1_and_changes_nothing(case):
    make, needle = REFUSED[case]
    model, masks = _model_and_masks()
    group = make(masks)
    before = _snapshot(model)
    inputs = {"input_ids": torch.randint(9, 100, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        masked = model(**inputs).logits_per_image
    with pytest.raises(ConfigError) as info:
        upop.prune(model, masks)
    message = str(info.value)
    assert "\n" not in message and repr(group) in message and needle in message
    # the first offending group is named, not a later one
    assert all(repr(g.name) not in message for g in masks.groups if g.name != group)
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # the masks are still attached: the model computes what it computed before the call
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits_per_image, masked, rtol=0, atol=0, equal_nan=True)
    assert getattr(model, "upop_plan", None) is None


@pytest.mark.parametrize("method", ["upop", "one-shot"])
def test_masks_of_a_finished_search_prune(method):
    model, masks = _model_and_masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=6, interval=2, method=method)
    _run(search, range(6))
    assert search.done
    pruned = {g.name: int((masks[g.name] == 0).sum()) for g in masks.groups}
    plan = upop.prune(model, masks)
    assert sum(pruned.values()) > 0
    assert {n: gp.dense_units - len(gp.kept) for n, gp in plan.groups.items()} == pruned


def test_hand_set_binary_masks_prune():
    model, masks = _model_and_masks()
    for g in masks.groups:
        masks[g.name].data[: g.num_units // 2] = 0.0
    plan = upop.prune(model, masks)
    assert all(len(gp.kept) == gp.dense_units - gp.dense_units // 2 for gp in plan.groups.values())


# ------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("method, total, interval, allowed", [
    ("upop", 10, 9, True),
    ("upop", 2, 1, True),
    ("upop", 10, 10, False),
    ("upop", 10, 1000, False),
    ("upop", 1, 1, False),
    ("one-shot", 10, 10, True),
    ("one-shot", 10, 1000, True),
    ("one-shot", 1, 1, True),
])
def test_interval_must_be_below_total_steps_for_the_progressive_search(method, total, interval, allowed):
    _, masks = _model_and_masks()
    if allowed:
        UPopSearch(masks, ratio=0.5, total_steps=total, interval=interval, method=method)
        return
    with pytest.raises(ConfigError) as info:
        UPopSearch(masks, ratio=0.5, total_steps=total, interval=interval, method=method)
    message = str(info.value)
    assert "\n" not in message
    assert f"interval={interval}" in message and f"total_steps={total}" in message
    assert "interval < total_steps" in message and "one-shot" in message


@pytest.mark.parametrize("field, value, shown", [
    ("ratio", "0.5", "'0.5'"),
    ("ratio", "0.5\n\x00", r"'0.5\n\x00'"),
    ("ratio", None, "None"),
    ("ratio", True, "True"),
    ("ratio", math.nan, "nan"),
    ("ratio", 1.0, "1.0"),
    ("total_steps", 0, "0"),
    ("total_steps", 2.5, "2.5"),
    ("total_steps", "10", "'10'"),
    ("interval", 0, "0"),
    ("interval", True, "True"),
    ("interval", 1.0, "1.0"),
])
def test_bad_numbers_are_one_line_errors(field, value, shown):
    _, masks = _model_and_masks()
    args = {"ratio": 0.5, "total_steps": 10, "interval": 2, field: value}
    with pytest.raises(ConfigError) as info:
        UPopSearch(masks, **args)
    message = str(info.value)
    assert "\n" not in message and "\x00" not in message
    assert message.startswith(field) and message.endswith(f"got {shown}")


# ------------------------------------------------------------------------------- no host reads


def test_non_update_steps_read_nothing_back_from_the_device():
    """On the "meta" device a tensor holds no data: any read to the host (.item(), .cpu(),
    bool(), float(), .tolist()) raises. Non-update steps run there; the update step reads."""
    _, masks = _model_and_masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=8, interval=4)
    masks.to("meta")  # the sums follow the masks
    assert {s.device.type for s in masks.grad_sum.values()} == {"meta"}
    assert all(s.dtype == torch.float64 for s in masks.grad_sum.values())
    fp16 = {"grad_scale": torch.tensor(256.0, device="meta"), "skip_nonfinite": True}
    for t in range(3):
        for name, p in masks.items():
            p.grad = torch.empty(p.shape, device="meta")
        assert search.step(t, **(fp16 if t % 2 else {})) is None
        assert search.step_count == t + 1
    for name, p in masks.items():
        p.grad = torch.empty(p.shape, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        search.step(3)  # an update step: selection reads the sums


HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_per_step_path_makes_no_host_read_calls(monkeypatch):
    """The same on the CPU: count the Tensor methods that read a value, per kind of step."""
    _, masks = _model_and_masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=8, interval=4)
    calls: list[str] = []
    counting = [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if counting[0]:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def counted_step(t, bad=None, **kwargs):
        _fake_grads(masks, t, bad)
        counting[0] = True
        try:
            return search.step(t, **kwargs)
        finally:
            counting[0] = False

    counted_step(0)
    counted_step(1, math.inf, grad_scale=1024.0, skip_nonfinite=True)
    counted_step(2, math.nan)
    assert calls == []
    with pytest.raises(FloatingPointError, match="search step 2 "):
        counted_step(3)
    assert calls  # the update step reads the flag back: the spies do catch reads


# ------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("scale", [65536.0, torch.tensor(65536.0)])
def test_fp16_overflow_steps_are_skipped(scale):
    _, masks = _model_and_masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=8, interval=4)
    _run(search, range(2), grad_scale=scale, skip_nonfinite=True)
    before = {n: s.clone() for n, s in masks.grad_sum.items()}
    _fake_grads(masks, 2, bad=math.inf)
    assert search.step(2, grad_scale=scale, skip_nonfinite=True) is None
    assert all(torch.equal(masks.grad_sum[n], before[n]) for n in before)  # nothing of step 2 added
    assert search.skipped_steps == 1
    _fake_grads(masks, 3)
    assert search.step(3, grad_scale=scale, skip_nonfinite=True) is not None  # the update runs
    assert all(torch.isfinite(s).all() for s in masks.grad_sum.values())


@pytest.mark.parametrize("check", ["update step", "state_dict"])
def test_non_finite_without_scaler_raises_by_the_next_check(check):
    _, masks = _model_and_masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=8, interval=4)
    _run(search, range(1))
    _fake_grads(masks, 1, bad=math.nan)
    assert search.step(1) is None  # not read back at this step ...
    _run(search, range(2, 3))
    assert all(torch.isfinite(s).all() for s in masks.grad_sum.values())  # ... and never added
    with pytest.raises(FloatingPointError, match="search step 1 ") as info:
        if check == "update step":
            _run(search, range(3, 4))
        else:
            search.state_dict()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- resume


def _resumed_masks(stop: int | None, device: str = "cpu"):
    """Masks after 8 steps (skipped step 2, update every 3), resumed from a saved state after ``stop``."""
    _, masks = _model_and_masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=8, interval=3)
    for t in range(8):
        if t == stop:
            buffer = io.BytesIO()
            torch.save(search.state_dict(), buffer)
            buffer.seek(0)
            state = torch.load(buffer, map_location="cpu", weights_only=True)
            assert {s.device.type for s in state["masks"]["grad_sum"].values()} == {"cpu"}
            _, masks = _model_and_masks()
            search = UPopSearch(masks, ratio=0.5, total_steps=8, interval=3)
            search.load_state_dict(state)
            assert search.step_count == stop and search.skipped_steps == 1
        _fake_grads(masks, t, bad=math.inf if t == 2 else None)
        search.step(t, skip_nonfinite=True)
    assert search.done and search.skipped_steps == 1
    return masks


@pytest.mark.parametrize("stop", [3, 5])
def test_resume_gives_the_same_masks_and_sums(stop):
    full, resumed = _resumed_masks(None), _resumed_masks(stop)
    for name, m in full.items():
        assert torch.equal(m, resumed[name])
        assert torch.equal(full.grad_sum[name], resumed.grad_sum[name])


def test_loaded_state_lands_on_the_masks_device():
    _, masks = _model_and_masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=8, interval=3)
    _run(search, range(2))
    state = search.state_dict()
    _, other = _model_and_masks()
    other.to("meta")
    UPopSearch(other, ratio=0.5, total_steps=8, interval=3).load_state_dict(state)
    assert {s.device.type for s in other.grad_sum.values()} == {"meta"}
    assert {p.device.type for _, p in other.items()} == {"meta"}
