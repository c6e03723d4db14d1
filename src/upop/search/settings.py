"""Settings of the UPop search: the allowed values, their checks, and the width multiple
(``round_to``; :func:`resolve_round_to`). Re-exported by :mod:`upop.search.mask_search`."""

from __future__ import annotations

import numbers

from typing import TYPE_CHECKING

from upop.errors import ConfigError, show
from upop.search.allocations import ALLOCATIONS, UnifiedAllocation, get_allocation  # noqa: F401
from upop.search.rankings import RANKING_SETTINGS, RANKINGS, resolve_ranking  # noqa: F401
from upop.search.scores import SCORES, get_score  # noqa: F401

if TYPE_CHECKING:  # annotations only: this module is read by the CLI's parser, which imports no torch
    from upop.arch.groups import Group

#: the distillation modes, and what ``UPopConfig.distill`` accepts: a mode, or ``"auto"``
#: (:func:`upop.distill.distiller.resolve`)
DISTILL_MODES = ("none", "logits", "logits+hidden")
DISTILL_SETTINGS = ("auto", *DISTILL_MODES)

METHODS = ("upop", "one-shot")
COSTS = ("params", "flops", "latency")
# SCORES (what a unit's score accumulates per step), RANKINGS (what orders the units) and ALLOCATIONS
# (how the budget is shared out over the groups) are the live names of their registries.


def _check_settings(ratio, total_steps, interval, cost, method, allocation, round_to) -> None:
    """Refuse settings the search cannot run as asked, each with a one-line :class:`ConfigError`."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio must be a number in (0, 1), e.g. 0.5 for 2x, got {show(ratio)}")
    for name, value in (("total_steps", total_steps), ("interval", interval)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {show(value)}")
    if cost not in COSTS:
        raise ConfigError(f"cost must be one of {', '.join(COSTS)}, got {show(cost)}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {show(method)}")
    if method == "upop" and interval >= total_steps:
        raise ConfigError(
            f"interval={show(interval)} with total_steps={show(total_steps)}: the progressive search needs "
            "interval < total_steps (else its only update is the last step, a one-shot cut); "
            "lower interval, raise total_steps, or ask for method='one-shot'"
        )
    if not get_allocation(allocation).rounds and round_to != 1:
        raise ConfigError(f"round_to={show(round_to)}: the {allocation} allocation does not round widths; use 1")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be an integer >= 1, got {show(round_to)}")


ROUND_TO_AUTO = 8
"""The multiple ``round_to="auto"`` aims for: on CUDA, fp16/bf16 tensor-core tiles and fused attention
kernels want widths (and head dims) that are multiples of 8; on CPU, ``benchmarks/speed.py`` measured
free widths realising 0.95-1.08 of the FLOPs reduction of CLIP-B/16's vision tower and whole forward
at batch 32 and multiples of 8 1.02-1.14 (the vector units work on 8 or 16 floats)."""


def resolve_round_to(round_to: int | str, groups: list[Group], device_type: str = "cpu",
                     allocation: str = UnifiedAllocation.name) -> tuple[int, str]:
    """The multiple every group's kept width is rounded to, and why, for the setting ``round_to``.

    An integer is used as given. ``"auto"`` takes :data:`ROUND_TO_AUTO` (8), halved until every group
    has at least 4 chunks of it (a group of 16 units would otherwise only keep 8 or 16), and 1 for the
    an allocation that does not round (the uniform one removes the same share everywhere). With whole-head
    attention units (``granularity="head"``) ``"auto"`` is 1: the multiple applies to every group, a
    head count needs no rounding (each head keeps its dense, kernel-friendly ``head_dim``), and
    rounding to 8 would leave a 12-head layer only 8 or 12 heads; MLP widths are then not rounded
    either (an integer ``round_to`` still rounds every group, head counts included). With
    ``granularity="both"`` the heads of a pair are never rounded, so ``"auto"`` follows the channel
    rule over the other groups (head-dim channels and MLP neurons).
    """
    if round_to != "auto":
        return int(round_to), "as set"
    if not get_allocation(allocation).rounds:
        return 1, f"auto: the {allocation} allocation does not round"
    if any(getattr(g, "granularity", "head-dim") == "head" and not getattr(g, "pair", "") for g in groups):
        return 1, "auto: whole-head units keep their dense head_dim and head counts are not rounded"
    device = "CUDA" if device_type == "cuda" else device_type.upper()
    n = ROUND_TO_AUTO
    smallest = min((g.num_units for g in groups if getattr(g, "granularity", "head-dim") != "head"), default=0)
    while n > 1 and smallest < 4 * n:
        n //= 2
    if n == ROUND_TO_AUTO:
        return n, f"auto: multiples of {n} suit {device} kernels"
    return n, f"auto: {ROUND_TO_AUTO} would leave the narrowest group ({smallest} units) under 4 choices; {n} used"
