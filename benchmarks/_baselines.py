"""Shared pieces of the transfer benchmark (benchmarks/transfer.py): baselines' retraining, tables.

The pruning baselines themselves (magnitude, random, Torch-Pruning) are benchmarks/ablations.py's,
imported unchanged; this module adds what the transfer benchmark needs on top:

- :func:`distill_setting`: the distillation setting of a UPop config (None when the installed
  upop has no ``distill`` field or it is ``"none"``);
- :func:`retrain`: the retraining of a pruned (or dense) model for a number of epochs: with no
  distillation exactly ablations.py's ``finetune`` call (AdamW, cosine from ``lr``, no weight
  decay, best validation epoch kept); with distillation the same loop with
  :class:`upop.distill.distiller.Distiller` adding ``distill_weight x`` the KD term of the same mode and
  temperature to the task loss, the frozen dense model as teacher (what a UPop run with that
  config does in its retraining);
- :func:`table` and :func:`winners`: the results tables (mean +- std over seeds per method and
  ratio) and the winner per ratio with the "beats every other row by > 2 std" verdict.
"""

from __future__ import annotations

import math
import statistics

import torch

from upop.engine.run import finetune, step_batches, steps_per_epoch


def distill_setting(config, task: str = "retrieval") -> dict | None:
    """``{"mode", "weight", "temperature"}`` of ``config``'s distillation in ``task`` (``"auto"``:
    the mode it stands for there, :func:`upop.distill.distiller.resolve`), or None without one."""
    mode = getattr(config, "distill", None)
    if mode == "auto":
        from upop.distill.distiller import resolve

        mode = resolve(mode, task, getattr(config, "distill_cache", True))
    if mode in (None, "none"):
        return None
    return {"mode": mode, "weight": float(getattr(config, "distill_weight", 1.0)),
            "temperature": float(getattr(config, "distill_temperature", 1.0))}


def retrain(model, task, train, val, processor, *, epochs: int, lr: float, batch_size: int, seed: int,
            teacher=None, distill: dict | None = None):
    """Train ``model`` for ``epochs`` epochs (cosine from ``lr``, no warm-up, no weight decay) and
    return it with its best validation epoch's weights; with ``distill`` (see
    :func:`distill_setting`) the task loss gets the distillation term from ``teacher``."""
    torch.manual_seed(seed)
    if distill is None:
        return finetune(model, task, train, val, processor, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        weight_decay=0.0, progress=False, log=lambda m: None)[0]
    from upop.distill.distiller import Distiller

    distiller = Distiller(teacher, distill["mode"], weight=distill["weight"], temperature=distill["temperature"])
    collate = task.collator(processor, seed=seed)
    spe = steps_per_epoch(len(train), batch_size)
    total = epochs * spe
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, total))))
    best, best_state = None, None
    try:
        for step, batch in enumerate(step_batches(train, collate, batch_size=batch_size, seed=seed, start=0,
                                                  stop=total)):
            model.train()
            task_loss, kd = distiller.loss(task.loss, model, model, batch)
            (task_loss + kd).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % spe == 0:
                score = task.evaluate(model, val, processor)[task.main_metric]
                if best is None or score > best:
                    best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        distiller.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


def cells(rows: list[dict], metric: str) -> dict:
    """``{(method, ratio): (mean, std, n)}`` of ``metric`` over seeds."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["method"], r["ratio"]), []).append(r[metric])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in out.items()}


def fmt(cell) -> str:
    """A table cell: "mean ± std" over 2+ seeds, the value for one, "—" for none."""
    if cell is None:
        return "—"
    mean, std, n = cell
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def table(rows: list[dict], metric: str, ratios) -> str:
    """Markdown table of ``metric``: a row per method, a "dense" column (reference rows) and one
    column per ratio."""
    stats = cells(rows, metric)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["method", "dense"] + [f"{1 / (1 - r):.0f}x ({r})" for r in ratios]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(fmt(stats.get((m, r))) for r in [0.0, *ratios]) + " |")
    return "\n".join(out)


def winners(rows: list[dict], ratios) -> list[dict]:
    """Per ratio: the best compression row on held-out R@mean and whether it beats every other
    row by more than twice the larger standard deviation (needs 2+ seeds)."""
    stats = cells(rows, "r_mean")
    out = []
    for ratio in ratios:
        cand = {m: c for (m, r), c in stats.items() if r == ratio}
        if not cand:
            continue
        best = max(cand, key=lambda m: cand[m][0])
        mean, std, n = cand[best]
        same = {r["method"] for r in rows if r.get("same_as") == best} | \
               {r["same_as"] for r in rows if r.get("same_as") and r["method"] == best}
        others = {m: c for m, c in cand.items() if m != best and m not in same}
        margins = {m: (mean - c[0], 2 * max(std, c[1])) for m, c in others.items()}
        closest = min(margins, key=lambda m: margins[m][0] - margins[m][1]) if margins else None
        clear = all(d > s for d, s in margins.values()) if n > 1 and margins else None
        out.append({"ratio": ratio, "winner": best, "r_mean": round(mean, 2), "std": round(std, 2), "seeds": n,
                    "beats_all_by_2std": clear, "closest": closest,
                    "closest_margin": round(margins[closest][0], 2) if closest else None,
                    "closest_2std": round(margins[closest][1], 2) if closest else None})
    return out


def winner_lines(found: list[dict]) -> list[str]:
    """One Markdown bullet per ratio of :func:`winners`."""
    lines = []
    for w in found:
        verdict = ("n/a (one seed)" if w["seeds"] < 2 else "yes" if w["beats_all_by_2std"] else
                   f"no (closest: {w['closest']}, margin {w['closest_margin']:.2f} vs 2 std {w['closest_2std']:.2f})")
        lines.append(f"- {1 / (1 - w['ratio']):.0f}x: **{w['winner']}** ({w['r_mean']:.2f} ± {w['std']:.2f}); beats "
                     f"every other row by > 2 std: {verdict}")
    return lines
