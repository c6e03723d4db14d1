"""The run report: ``report.json`` (stable schema), ``report.md`` and ``allocation.png``.

Schema of ``report.json`` (``schema_version`` 1)::

    task, model_class, base_model, target_ratio, cost,
    achieved_ratio                 removed share of the prunable cost (in the budget's unit)
    achieved_ratio_by_cost         {"params": .., "flops": ..}
    dense / compressed             {"params", "flops", "latency_ms", "metrics": {...}}
    speedup                        dense latency / compressed latency (same run, same input)
    allocation                     {"by_modality": {modality: {kind: {"kept", "total", "kept_fraction"}}},
                                    "layers": [{"group", "modality", "kind", "layer", "kept", "total"}]}
    settings                       the UPopConfig of the run
    latency_input                  what the latency and FLOPs were measured on
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .prune import PruningPlan

SCHEMA_VERSION = 1


def allocation(plan: PruningPlan) -> dict[str, Any]:
    """Kept units per modality and kind, and per group (the allocation the search chose)."""
    by: dict[str, dict[str, dict[str, float]]] = {}
    layers = []
    for name, g in plan.groups.items():
        cell = by.setdefault(g.modality, {}).setdefault(g.kind, {"kept": 0, "total": 0})
        cell["kept"] += len(g.kept)
        cell["total"] += g.dense_units
        layers.append({"group": name, "modality": g.modality, "kind": g.kind, "layer": g.layer,
                       "kept": len(g.kept), "total": g.dense_units})
    for kinds in by.values():
        for cell in kinds.values():
            cell["kept_fraction"] = cell["kept"] / cell["total"]
    return {"by_modality": by, "layers": layers}


def build_report(
    *, task: str, plan: PruningPlan, dense: dict, compressed: dict, target_ratio: float, cost: str,
    settings: dict, latency_input: str,
) -> dict[str, Any]:
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
        "speedup": speed,
        "allocation": allocation(plan),
        "settings": settings,
        "latency_input": latency_input,
    }


def markdown(report: dict[str, Any]) -> str:
    d, c = report["dense"], report["compressed"]
    lines = [
        f"# upop report: {report['model_class']} on {report['task']}",
        "",
        f"Target ratio {report['target_ratio']:.2f} of prunable {report['cost']}; achieved "
        f"{report['achieved_ratio']:.4f} (params {report['achieved_ratio_by_cost']['params']:.4f}, "
        f"FLOPs {report['achieved_ratio_by_cost']['flops']:.4f}).",
        "",
        "| | dense | compressed | change |",
        "|---|---:|---:|---:|",
    ]
    for key in d["metrics"]:
        lines.append(f"| {key} | {d['metrics'][key]:.2f} | {c['metrics'][key]:.2f} | {c['metrics'][key] - d['metrics'][key]:+.2f} |")
    lines.append(f"| params | {d['params']:,} | {c['params']:,} | {c['params'] / d['params']:.2f}x |")
    lines.append(f"| FLOPs | {d['flops']:,} | {c['flops']:,} | {c['flops'] / d['flops']:.2f}x |")
    lines.append(f"| latency (ms) | {d['latency_ms']:.2f} | {c['latency_ms']:.2f} | {report['speedup']:.2f}x faster |")
    lines += ["", f"{report['latency_input']}.", "", "## Allocation chosen by the search", "",
              "| modality | kind | kept | total | kept share |", "|---|---|---:|---:|---:|"]
    for modality, kinds in report["allocation"]["by_modality"].items():
        for kind, cell in kinds.items():
            lines.append(f"| {modality} | {kind} | {cell['kept']} | {cell['total']} | {cell['kept_fraction']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_allocation(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Bar chart of the kept fraction per layer, one panel per kind, coloured by modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"vision": "tab:blue", "text": "tab:orange", "fusion": "tab:green", "decoder": "tab:purple"}
    layers = report["allocation"]["layers"]
    kinds = [k for k in ("attention", "mlp") if any(r["kind"] == k for r in layers)]
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
    from .rundir import write_file_atomic

    write_file_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    from .rundir import write_text_atomic

    out = Path(out_dir)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    plot_allocation(report, out / "allocation.png")
