"""The run report: ``report.json`` (stable schema), ``report.md`` and ``allocation.png``.

Schema of ``report.json`` (``schema_version`` 1)::

    task, model_class, base_model, target_ratio, cost,
    achieved_ratio                 removed share of the prunable cost (in the budget's unit; with the setting
                                   modalities other than "all", of the searched modalities' groups only)
    achieved_ratio_by_cost         {"params": .., "flops": ..}
    dense / compressed             {"params", "flops", "latency_ms" (median of the rounds), "metrics": {...}}
    speedup                        median over the rounds of dense / compressed latency (same run, same input)
    speedup_spread                 {"min", "max", "q1", "q3", "relative_iqr"} of the per-round speedups
    latency_noisy                  true when relative_iqr > 0.10 (NOISE_LIMIT): the machine was busy, re-time
    latency                        the paired measurement: rounds, seconds_per_round, dense_ms / compressed_ms
                                   (medians) and their *_per_round lists, speedup_per_round, device,
                                   device_name, dtype, autocast, tf32 (None on CPU), batch, threads, noise_rule,
                                   retime_command
    allocation                     {"by_modality": {modality: {kind: {"kept", "total", "kept_fraction"}}},
                                    "layers": [{"group", "modality", "kind", "layer", "kept", "total"}]}
    settings                       the UPopConfig of the run, as given
    resolved_settings              the settings the run ran with (upop.config.ResolvedSettings): {"version",
                                   "task", "search_steps", "given", "values" (every auto / unset default
                                   decided), "why" (the reason of each decision)}
    latency_input                  what the latency and FLOPs were measured on
    memory                         {"estimate_bytes": the training memory upop.measure.memory estimated,
                                    "available_bytes": the device's free memory, None on the CPU (not checked)}
    budget                         (only when the task's quality bar was missed) the value, the bar and the
                                   retraining steps estimated to reach it (upop.runs.budget)
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
from pathlib import Path
from typing import Any

from upop.pruning.prune import PruningPlan

SCHEMA_VERSION = 1

NOISE_LIMIT = 0.10
"""A latency measurement is noisy when the interquartile range of its per-round values (the
speedups of a pair, the latencies of a model timed alone) is wider than this share of their median."""

NOISE_RULE = (f"noisy when the interquartile range of the per-round values exceeds {NOISE_LIMIT:.0%} of their "
              "median")


def spread(values) -> dict[str, float | None]:
    """Min, max, quartiles (linear interpolation, as numpy's default) and interquartile range over
    the median (None if the median is not positive) of per-round values."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("no per-round values")
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    median = statistics.median(ordered)
    return {"min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3,
            "relative_iqr": (q3 - q1) / median if median > 0 else None}


def is_noisy(values_spread: dict) -> bool:
    """The noise rule (:data:`NOISE_LIMIT`) on a :func:`spread`."""
    rel = values_spread["relative_iqr"]
    return rel is None or rel > NOISE_LIMIT


def paired_summary(dense_ms: list[float], compressed_ms: list[float]) -> dict[str, Any]:
    """The fields of a paired latency measurement from each model's latency per round (ms): the
    median latency of each, the per-round speedups (dense / compressed), their median and spread,
    and the noise flag."""
    if not dense_ms or len(dense_ms) != len(compressed_ms):
        raise ValueError("need the same number (>= 1) of rounds for both models")
    speedups = [d / c for d, c in zip(dense_ms, compressed_ms)]
    speedup_spread = spread(speedups)
    return {"rounds": len(speedups), "dense_ms": statistics.median(dense_ms),
            "compressed_ms": statistics.median(compressed_ms), "speedup": statistics.median(speedups),
            "speedup_spread": speedup_spread, "noisy": is_noisy(speedup_spread), "noise_rule": NOISE_RULE,
            "dense_ms_per_round": list(dense_ms), "compressed_ms_per_round": list(compressed_ms),
            "speedup_per_round": speedups}


def describe_setup(latency: dict, split: str = "test") -> str:
    """What a latency was measured on, in words: batch, split, device, dtype, autocast, threads."""
    device = "CPU" if latency["device"] == "cpu" else f"{latency['device_name']} ({latency['device']})"
    autocast = f" with {latency['autocast']} autocast" if latency.get("autocast") else ""
    if latency.get("tf32") is not None:
        autocast += f", TF32 {'on' if latency['tf32'] else 'off'}"
    return (f"batch {latency['batch']} of the {split} split on {device}, {latency['dtype']}{autocast}, "
            f"{latency['threads']} CPU thread{'' if latency['threads'] == 1 else 's'}; median of "
            f"{latency['rounds']} interleaved rounds of "
            f"{1e3 * latency['seconds_per_round']:.0f} ms per model")


def retime_command(*, model: str | os.PathLike, baseline: str | os.PathLike | None, task: str,
                   data: str | os.PathLike, batch: int, seconds: float, precision: str = "fp32",
                   tf32: bool = True) -> str:
    """The ``upop evaluate --latency`` command that times ``model`` (against ``baseline``) again."""
    words = ["upop", "evaluate", "--latency", "--model", str(model)]
    if baseline:
        words += ["--baseline", str(baseline)]
    words += ["--task", task, "--data", str(data), "--latency-batch-size", str(batch), "--latency-time", f"{seconds:g}"]
    if precision != "fp32":
        words += ["--eval-precision", precision]
    if not tf32:
        words += ["--tf32", "false"]
    return " ".join(shlex.quote(w) for w in words)


def speedup_words(speedup: float | None) -> str:
    """The speedup in words: '1.23x faster', '0.87x (slower)' or 'n/a'."""
    if speedup is None:
        return "n/a"
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{speedup:.2f}x (slower)"


def allocation(plan: PruningPlan) -> dict[str, Any]:
    """Kept units per modality and kind, and per group (the allocation the search chose). Groups
    of whole heads (granularity ``head``, or the head half of ``both``) are their own kind,
    ``"attention heads"``, so heads and head-dim channels are never added together."""
    by: dict[str, dict[str, dict[str, float]]] = {}
    layers = []
    for name, g in plan.groups.items():
        kind = "attention heads" if g.granularity == "head" else g.kind
        cell = by.setdefault(g.modality, {}).setdefault(kind, {"kept": 0, "total": 0})
        cell["kept"] += len(g.kept)
        cell["total"] += g.dense_units
        layers.append({"group": name, "modality": g.modality, "kind": kind, "layer": g.layer,
                       "kept": len(g.kept), "total": g.dense_units})
    for kinds in by.values():
        for cell in kinds.values():
            cell["kept_fraction"] = cell["kept"] / cell["total"]
    return {"by_modality": by, "layers": layers}


def build_report(
    *, task: str, plan: PruningPlan, dense: dict, compressed: dict, target_ratio: float, cost: str,
    settings: dict, latency_input: str, latency: dict | None = None, resolved: dict | None = None,
) -> dict[str, Any]:
    """The report; ``latency`` is the paired measurement (:func:`paired_summary` fields and the
    setup); without it the speedup is the ratio of the two latencies. ``settings`` are the run's
    settings as given, ``resolved`` its resolved settings (``ResolvedSettings.to_dict()``)."""
    speed = dense["latency_ms"] / compressed["latency_ms"] if compressed.get("latency_ms") else None
    return {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "model_class": plan.model_class,
        "base_model": plan.base_model,
        "target_ratio": target_ratio,
        "cost": cost,
        "achieved_ratio": plan.achieved_ratio[cost],
        "achieved_ratio_by_cost": dict(plan.achieved_ratio),
        "dense": dense,
        "compressed": compressed,
        "speedup": latency["speedup"] if latency else speed,
        "speedup_spread": latency["speedup_spread"] if latency else None,
        "latency_noisy": bool(latency and latency["noisy"]),
        "latency": latency,
        "allocation": allocation(plan),
        "settings": settings,
        **({"resolved_settings": resolved} if resolved is not None else {}),
        "latency_input": latency_input,
    }


def searched_words(report: dict[str, Any]) -> str:
    """What the ratio is a share of when the search ranked only some modalities (``modalities``):
    "" for every group."""
    searched = (report.get("settings") or {}).get("modalities", "all")
    if searched == "all":
        return ""
    return f" (of the {searched} groups only: the search ranked those; the others are kept dense)"


def distill_words(distill: dict) -> str:
    """One sentence on what the run distilled from the dense model."""
    auto = f" (--distill auto: {distill['why']})" if distill.get("setting") == "auto" else ""
    if distill.get("mode", "none") == "none":
        return f" No distillation{auto}."
    if distill["mode"] == "task":
        return " Label-free: the loss is the agreement with the dense model."
    what = "the task's outputs" + (f" and the outputs of {distill['hidden_blocks']} blocks"
                                   if distill.get("hidden_blocks") else "")
    return (f" Distilled from the dense model: {what} (weight {distill['weight']:g}, "
            f"temperature {distill['temperature']:g}){auto}.")


def markdown(report: dict[str, Any]) -> str:
    d, c = report["dense"], report["compressed"]
    lines = [
        f"# upop report: {report['model_class']} on {report['task']}",
        "",
        f"Target ratio {report['target_ratio']:.2f} of prunable {report['cost']}{searched_words(report)}; achieved "
        f"{report['achieved_ratio']:.4f} (params {report['achieved_ratio_by_cost']['params']:.4f}, "
        f"FLOPs {report['achieved_ratio_by_cost']['flops']:.4f})."
        + (f" Kept widths: multiples of {report['round_to']['used']} ({report['round_to']['why']})."
           if "round_to" in report else "")
        + (f" Units ranked by the {report['score']} score." if "score" in report else "")
        + (distill_words(report["distill"]) if "distill" in report else ""),
        "",
        "| | dense | compressed | change |",
        "|---|---:|---:|---:|",
    ]
    for key in d["metrics"]:
        lines.append(f"| {key} | {d['metrics'][key]:.2f} | {c['metrics'][key]:.2f} | {c['metrics'][key] - d['metrics'][key]:+.2f} |")
    lines.append(f"| params | {d['params']:,} | {c['params']:,} | {c['params'] / d['params']:.2f}x |")
    lines.append(f"| FLOPs | {d['flops']:,} | {c['flops']:,} | {c['flops'] / d['flops']:.2f}x |")
    lines.append(f"| latency (ms) | {d['latency_ms']:.2f} | {c['latency_ms']:.2f} | {speedup_words(report['speedup'])} |")
    lines += ["", f"{report['latency_input']}."]
    lines += latency_lines(report)
    lines += ["", "## Allocation chosen by the search", "",
              "| modality | kind | kept | total | kept share |", "|---|---|---:|---:|---:|"]
    for modality, kinds in report["allocation"]["by_modality"].items():
        for kind, cell in kinds.items():
            lines.append(f"| {modality} | {kind} | {cell['kept']} | {cell['total']} | {cell['kept_fraction']:.2f} |")
    lines += decided_lines(report.get("resolved_settings"))
    return "\n".join(lines) + "\n"


def decided_lines(resolved: dict | None) -> list[str]:
    """The settings section: each setting upop decided (``auto`` or unset), the value used and why."""
    if not resolved:
        return []
    lines = ["", f"## Settings decided by upop (settings version {resolved['version']})", "",
             "| setting | given | used | why |", "|---|---|---|---|"]
    for name, why in resolved["why"].items():
        lines.append(f"| {name} | {_cell(resolved['given'][name])} | {_cell(resolved['values'][name])} | {why} |")
    return lines


def _cell(value) -> str:
    """A setting's value in a table cell: unset for None, else its JSON text."""
    return "unset" if value is None else json.dumps(value)


def latency_lines(report: dict[str, Any]) -> list[str]:
    """The spread of the per-round speedups and, if noisy, the warning with the re-time command."""
    spread_, latency = report.get("speedup_spread"), report.get("latency") or {}
    if not spread_:
        return []
    lines = ["", f"Speedup: the median of the per-round speedups (dense / compressed latency in the same round): "
             f"{report['speedup']:.2f}x; range {spread_['min']:.2f}-{spread_['max']:.2f}x, interquartile "
             f"{spread_['q1']:.2f}-{spread_['q3']:.2f}x."]
    if report.get("latency_noisy"):
        rel = spread_["relative_iqr"]
        width = f"{rel:.0%} of the median" if rel is not None else "undefined"
        lines += ["", f"**Noisy latency measurement**: the interquartile range of the per-round speedups is {width} "
                  f"(limit {NOISE_LIMIT:.0%}); the machine was busy and the speedup is uncertain."
                  + (f" Re-time on a quiet machine: `{latency['retime_command']}`" if latency.get("retime_command")
                     else "")]
    return lines


def plot_allocation(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Bar chart of the kept fraction per layer, one panel per kind, coloured by modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"vision": "tab:blue", "text": "tab:orange", "fusion": "tab:green", "decoder": "tab:purple"}
    layers = report["allocation"]["layers"]
    kinds = [k for k in ("attention", "attention heads", "mlp") if any(r["kind"] == k for r in layers)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in layers if r["kind"] == kind]
        ax.bar(range(len(rows)), [r["kept"] / r["total"] for r in rows], color=[colours.get(r["modality"], "grey") for r in rows])
        ax.set_xticks(range(len(rows)), [f"{r['modality'][0]}{r['layer']}" for r in rows], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{kind}: kept fraction per layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for m, c in colours.items() if any(r["modality"] == m for r in layers)]
    labels = [m for m in colours if any(r["modality"] == m for r in layers)]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    from upop.runs.rundir import write_file_atomic

    write_file_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    from upop.runs.rundir import write_text_atomic

    out = Path(out_dir)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    plot_allocation(report, out / "allocation.png")
