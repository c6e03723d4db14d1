"""Cost accounting: parameters, FLOPs (``torch.utils.flop_counter``) and CPU/GPU latency
(``torch.utils.benchmark``) of a model on given inputs."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from upop.arch.groups import Group


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def prunable_cost(groups: list[Group], kind: str = "params") -> int:
    """Total cost of every unit of every group (the denominator of the ratio); an attention module
    found at granularity ``"both"`` (a channel group and a head group) is counted once
    (:func:`upop.arch.groups.exact_cost`)."""
    from upop.arch.groups import exact_cost

    return int(round(exact_cost(groups, None, kind)))


def _call(model: nn.Module, inputs: Any, forward: Callable | None):
    if forward is not None:
        return forward(model, inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _cpu_attention_formulas() -> dict:
    """The CPU fused attention kernel is missing from torch's flop table: count it like the
    other fused SDPA kernels (the two matrix products of attention)."""
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = _sdpa_flops
    return ops


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any, forward: Callable | None = None) -> int:
    """FLOPs of one forward on ``inputs`` (dict of tensors, or what ``forward(model, inputs)`` takes).

    Counted by ``torch.utils.flop_counter`` (matrix products and attention; 2 FLOPs per MAC).
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        _call(model, inputs, forward)
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    model: nn.Module, inputs: Any, forward: Callable | None = None, min_run_time: float = 1.0, threads: int | None = None
) -> float:
    """Median latency of one forward in milliseconds (``torch.utils.benchmark``, after warm-up)."""
    from torch.utils import benchmark

    was_training = model.training
    model.eval()
    for _ in range(2):
        _call(model, inputs, forward)
    timer = benchmark.Timer(
        stmt="call(model, inputs, forward)",
        globals={"call": _call, "model": model, "inputs": inputs, "forward": forward},
        num_threads=threads or torch.get_num_threads(),
    )
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    model.train(was_training)
    return measurement.median * 1e3
