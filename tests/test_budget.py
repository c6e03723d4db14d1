"""The run's "budget too small" estimate (upop.runs.budget): a task's quality bar, the power-law
fit of the validation curve, and the report entry of every task that declares a bar."""

from __future__ import annotations

import math

import pytest

from upop.runs.budget import budget_check, steps_to_reach
from upop.tasks import get_task
from upop.tasks.registry import task_names


def _curve(a: float, b: float, steps) -> list[dict]:
    return [{"step": s, "cosine": 100.0 - a * s ** b} for s in steps]


@pytest.mark.parametrize("a, b", [(60.0, -0.5), (40.0, -0.3), (80.0, -1.0)])
def test_a_power_law_curve_is_solved_exactly(a, b):
    bar = 90.0
    expected = (10.0 / a) ** (1 / b)
    got = steps_to_reach(_curve(a, b, [10, 20, 40]), "cosine", bar)
    assert got == math.ceil(expected - 1e-9) or got == math.ceil(expected)


@pytest.mark.parametrize("history", [
    [],                                                        # no validation
    [{"step": 10, "cosine": 50.0}],                            # one point
    [{"step": 10, "cosine": 50.0}, {"step": 10, "cosine": 55.0}],  # one step twice
    [{"step": 10, "cosine": 60.0}, {"step": 20, "cosine": 55.0}],  # getting worse
    [{"step": 0, "cosine": 10.0}, {"step": 10, "cosine": 60.0}],   # step 0 is not on the curve
])
def test_no_estimate_where_the_curve_cannot_tell(history):
    assert steps_to_reach(history, "cosine", 90.0) is None


def test_budget_entry_only_under_the_bar():
    hist = _curve(300.0, -0.5, [50, 100])  # 57.6, 70.0: 90 at step 900
    assert budget_check(task="distill", metric="cosine", bar=None, value=10.0, history=hist, retrain_steps=100,
                        retrain_epochs=2) is None
    assert budget_check(task="distill", metric="cosine", bar=90.0, value=91.0, history=hist, retrain_steps=100,
                        retrain_epochs=2) is None
    got = budget_check(task="distill", metric="cosine", bar=90.0, value=hist[-1]["cosine"], history=hist,
                       retrain_steps=100, retrain_epochs=2)
    assert got["steps_needed"] == steps_to_reach(hist, "cosine", 90.0) == 900
    assert got["epochs_needed"] == 18  # 50 steps per epoch
    assert "budget is too small" in got["message"] and "--retrain-epochs 18" in got["message"]
    assert "\n" not in got["message"]
    slow = budget_check(task="distill", metric="cosine", bar=90.0, value=50.0, retrain_steps=100, retrain_epochs=2,
                        history=[{"step": 50, "cosine": 50.0}, {"step": 100, "cosine": 55.0}])
    assert slow["steps_needed"] > 100 * 100 and slow["epochs_needed"] is None
    assert "too slowly" in slow["message"] and str(slow["steps_needed"]) not in slow["message"]
    worse = budget_check(task="distill", metric="cosine", bar=90.0, value=50.0, retrain_steps=100, retrain_epochs=2,
                         history=[{"step": 50, "cosine": 60.0}, {"step": 100, "cosine": 50.0}])
    assert worse["steps_needed"] is None and "did not improve" in worse["message"]


@pytest.mark.parametrize("name", task_names())
def test_every_bar_is_a_value_of_its_main_metric(name):
    """A task's bar is on the 0-100 scale of its main metric (the fit measures the gap to 100)."""
    task = get_task(name)
    assert task.quality_bar is None or (0 < task.quality_bar < 100 and task.main_metric)
