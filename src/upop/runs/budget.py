"""Whether a run's training budget was enough for the quality its task aims for.

A task may declare ``quality_bar`` (:class:`upop.tasks.base.Task`): the value of its main metric
below which the compressed model is not yet usable (the label-free task: a cosine of 90 with the
dense model's embeddings). When the test metric ends under the bar, the run says so and estimates
how many retraining steps would reach it, from the run's own validation curve: the gap to a
perfect score (``100 - metric``) is fitted as a power law of the retraining step,
``gap = a * step ** b``, through the validation points, and solved for the bar. It is an
extrapolation from this run, said as such; with fewer than two points, or a curve that does not
fall, it says what to change instead of a number.
"""

from __future__ import annotations

import math
from typing import Sequence

#: the perfect score of the metrics a bar is declared on (percentages)
PERFECT = 100.0
#: an estimate beyond this many times the run's retraining steps is said as "too slow", not as a
#: number of steps (an extrapolation that far from its points says little more than that)
FAR = 100


def steps_to_reach(history: Sequence[dict], metric: str, bar: float) -> int | None:
    """The retraining step at which the power-law fit of ``history`` (``{"step": s, metric: v}``
    rows) reaches ``bar``; None when it cannot tell (fewer than two usable points, or the gap does
    not shrink with the steps)."""
    points = [(float(h["step"]), PERFECT - float(h[metric])) for h in history
              if h.get("step", 0) > 0 and isinstance(h.get(metric), (int, float)) and h[metric] < PERFECT]
    if len({s for s, _ in points}) < 2 or bar >= PERFECT:
        return None
    xs = [math.log(s) for s, _ in points]
    ys = [math.log(g) for _, g in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope >= -1e-6:
        return None
    try:
        step = math.exp(mx + (math.log(PERFECT - bar) - my) / slope)
    except OverflowError:  # a curve this flat is said as not improving
        return None
    return int(math.ceil(step - 1e-6)) if math.isfinite(step) else None


def budget_check(*, task: str, metric: str, bar: float | None, value: float | None, history: Sequence[dict],
                 retrain_steps: int, retrain_epochs: int) -> dict | None:
    """The report's ``budget`` entry: None when the task declares no bar or the metric reached it;
    else the bar, the value, the estimate (``steps_needed``, ``epochs_needed``, or None; beyond
    :data:`FAR` times the run's steps the message says "too slow" instead of the number) and a
    ``message`` for the log."""
    if bar is None or value is None or value >= bar:
        return None
    needed = steps_to_reach(history, metric, bar)
    ran = f"{retrain_steps} retraining step{'s' if retrain_steps != 1 else ''}"
    head = (f"the budget is too small: {task}'s {metric} on the test split is {value:.1f}, under the {bar:g} "
            f"this task aims for, after {ran}")
    per_epoch = retrain_steps / retrain_epochs if retrain_epochs and retrain_steps else None
    epochs = int(math.ceil(needed / per_epoch)) if needed is not None and per_epoch else None
    if needed is not None and needed > FAR * max(1, retrain_steps):
        tail = (f"; its validation curve improves too slowly to get there (a power-law extrapolation of this run "
                f"puts {bar:g} beyond {FAR}x its steps): use a higher --lr or a lower --ratio")
        epochs = None
    elif needed is not None:
        more = f" (--retrain-epochs {epochs})" if epochs is not None else ""
        tail = (f"; this run's validation curve reaches {bar:g} at about {needed} retraining steps{more} "
                "(a power-law extrapolation of this run, an estimate), or use a lower --ratio")
    elif len([h for h in history if h.get("step", 0) > 0]) < 2:
        tail = "; too few validations to estimate the steps it needs: give it more retraining epochs or a lower --ratio"
    else:
        tail = "; its validation curve did not improve with more steps: use a higher --lr or a lower --ratio"
    return {"metric": metric, "bar": bar, "value": value, "retrain_steps": retrain_steps,
            "steps_needed": needed, "epochs_needed": epochs, "message": head + tail}
