"""Measured latency per unit, for ``cost="latency"``: the budget follows time, not multiply-adds.

A channel of a layer that is memory- or launch-bound saves less time than one of a compute-bound
layer with the same FLOPs. For every distinct group shape (kind, widths around it, heads, tokens)
the group's own computation is timed alone on the run's device, batch and dtype at several kept
widths (for attention: Q, K, V projections, scaled-dot-product attention with the kept head
dimension, output projection; for an MLP: fc1, GELU, fc2), in interleaved rounds, the fastest
round per width (load on a shared machine only adds time). The time of one unit is the
least-squares slope of time over width (floored at a small positive share so that no unit is
free). Layers with the same shape share one measurement, so a 12-layer tower costs the time of one.

The table is built once per run, on the main process while the others wait (every process gets
its numbers, so all choose the same plan), at the run's ``latency_batch_size`` (``auto``: 32 on a
GPU, where batch 1 is launch-bound; 1 on the CPU) with the device's clock (CUDA events on a GPU,
:mod:`upop.measure.timing`), and cached as ``state/latency-table.json``; a resumed run reuses it
when device, clock, dtype, batch and the group shapes are the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from upop.arch.groups import Group
from upop.errors import ConfigError

TABLE_FILE = "latency-table.json"
VERSION = 1


def _signature(model: nn.Module, g: Group) -> tuple:
    """What the time of ``g``'s computation depends on (layers with equal signatures share a timing)."""
    producers = [model.get_submodule(name) for name in g.producers]
    consumer = model.get_submodule(g.consumer)
    in_q = producers[0].in_features
    in_kv = producers[-1].in_features
    return (g.kind, g.num_units, g.num_heads, in_q, in_kv, consumer.out_features, g.tokens_q, g.tokens_kv)


def _widths(num_units: int, round_to: int) -> list[int]:
    """Kept widths to time: full, 3/4, 1/2, 1/4 and the smallest allowed, rounded to ``round_to``."""
    step = max(1, round_to)
    out = set()
    for share in (1.0, 0.75, 0.5, 0.25):
        w = max(step, int(round(num_units * share / step)) * step)
        out.add(min(w, num_units))
    out.add(min(step, num_units))
    return sorted(out)


def _workload(sig: tuple, width: int, batch: int, device, dtype) -> Callable[[], torch.Tensor]:
    """A closure running the group computation of signature ``sig`` at kept width ``width`` (its
    ``kind`` and ``width`` attributes say which)."""
    kind, _, heads, in_q, in_kv, out, tq, tkv = sig
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    xq = rand(batch, tq, in_q)
    if kind == "mlp":
        w1, b1, w2 = rand(width, in_q), rand(width), rand(out, width)

        def mlp():
            return F.linear(F.gelu(F.linear(xq, w1, b1)), w2)

        mlp.kind, mlp.width = kind, width
        return mlp
    xkv = xq if (tkv == tq and in_kv == in_q) else rand(batch, tkv, in_kv)
    inner = heads * width
    wq, wk, wv, wo = rand(inner, in_q), rand(inner, in_kv), rand(inner, in_kv), rand(out, inner)

    def attention():
        q = F.linear(xq, wq).view(batch, tq, heads, width).transpose(1, 2)
        k = F.linear(xkv, wk).view(batch, tkv, heads, width).transpose(1, 2)
        v = F.linear(xkv, wv).view(batch, tkv, heads, width).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        return F.linear(a.transpose(1, 2).reshape(batch, tq, inner), wo)

    attention.kind, attention.width = kind, width
    return attention


def _time_ms(fn: Callable[[], torch.Tensor], device: torch.device, seconds: float) -> float:
    """Median milliseconds of ``fn()`` on ``device`` after one untimed call: CUDA event pairs around
    each call on a GPU (:func:`upop.measure.timing.time_calls`: no host wait between calls, so a
    launch-bound width is not timed as the host's launch gap), ``torch.utils.benchmark`` on the CPU."""
    import statistics

    from torch.utils import benchmark

    from upop.measure.timing import EVENTS, clock_name, time_calls

    fn()
    if clock_name(device) == EVENTS:
        return statistics.median(time_calls(fn, seconds, device))
    timer = benchmark.Timer(stmt="call()", globals={"call": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=seconds).median * 1e3


@torch.no_grad()
def check_timeable(groups: list[Group]) -> None:
    """Refuse groups the table would time wrongly: it times plain attention (as many K/V heads as query
    heads, channels one at a time) and plain MLPs, not rotary pairs, grouped-query heads or a gated
    MLP (decoder LLMs), whose times it would give silently wrong."""
    odd = next((g for g in groups if g.grouped or g.masked), None)
    if odd is not None:
        what = "rotary pairs or grouped-query heads" if odd.grouped else "a gated MLP"
        raise ConfigError(f"cost='latency' cannot time group {odd.name!r} ({what}): the latency table times plain "
                          "attention and MLPs only; use --cost params or --cost flops for this model")


def measure_table(model: nn.Module, groups: list[Group], batch: int, device, dtype=torch.float32,
                  round_to: int = 1, rounds: int = 3, seconds: float = 0.02,
                  timer: Callable[[Callable, torch.device, float], float] = _time_ms) -> dict:
    """Time every distinct group shape of ``model`` at several widths; return the table (JSON-able).

    ``table["per_unit_ms"][group name]`` is the milliseconds one unit of that group costs.
    ``timer(fn, device, seconds)`` times one closure (injectable for tests).
    """
    check_timeable(groups)
    device = torch.device(device)
    sigs = {g.name: _signature(model, g) for g in groups}
    shapes = sorted(set(sigs.values()))
    points: dict[tuple, dict[int, list[float]]] = {
        s: {w: [] for w in _widths(s[1], round_to)} for s in shapes
    }
    work = {(s, w): _workload(s, w, batch, device, dtype) for s in shapes for w in points[s]}
    for _ in range(rounds):  # interleaved: a burst of load hits every width alike
        for (s, w), fn in work.items():
            points[s][w].append(timer(fn, device, seconds))
    slope: dict[tuple, float] = {}
    timings = []
    for s in shapes:
        ws = sorted(points[s])
        ts = [min(points[s][w]) for w in ws]  # load on a shared machine only ever adds time
        timings.append({"signature": list(s), "widths": ws, "ms": ts})
        # no unit is free: at least 5% of its share of the dense time (a flat or falling fit means
        # the layer is launch-bound at this size; its units then save little, but not nothing)
        slope[s] = max(_slope(ws, ts), 0.05 * ts[-1] / ws[-1])
    per_unit = {g.name: slope[sigs[g.name]] for g in groups}
    return {"version": VERSION, "key": table_key(model, groups, batch, device, dtype, round_to),
            "per_unit_ms": per_unit, "timings": timings}


def _slope(widths: list[int], times: list[float]) -> float:
    """Least-squares slope of ``times`` over ``widths`` (ms per unit); 0 for a single width."""
    n = len(widths)
    if n < 2:
        return times[0] / max(widths[0], 1)
    mw, mt = sum(widths) / n, sum(times) / n
    var = sum((w - mw) ** 2 for w in widths)
    return sum((w - mw) * (t - mt) for w, t in zip(widths, times)) / var


def table_key(model: nn.Module, groups: list[Group], batch: int, device, dtype, round_to: int) -> dict:
    """What a cached table must match to be reused."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    from upop.measure.timing import clock_name

    return {"device": name, "timer": clock_name(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "round_to": round_to,
            "shapes": sorted({json.dumps(_signature(model, g)) for g in groups}),
            "groups": sorted(g.name for g in groups)}


def load_or_measure(path: Path | None, model: nn.Module, groups: list[Group], batch: int, device,
                    dtype=torch.float32, round_to: int = 1, write: bool = True, **kw) -> tuple[dict, bool]:
    """The cached table at ``path`` if it matches this run, else a new measurement (written to
    ``path`` atomically when ``write``). Returns ``(table, reused)``."""
    from upop.runs.rundir import write_json_atomic

    check_timeable(groups)
    key = table_key(model, groups, batch, device, dtype, round_to)
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = None
        if (isinstance(cached, dict) and cached.get("version") == VERSION and cached.get("key") == key
                and set(cached.get("per_unit_ms", {})) == {g.name for g in groups}):
            return cached, True
    table = measure_table(model, groups, batch, device, dtype, round_to, **kw)
    if path is not None and write:
        write_json_atomic(path, table)
    return table, False
