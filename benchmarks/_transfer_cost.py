"""``python benchmarks/transfer.py --cost``: what distillation costs per training step.

CLIP ViT-B/16 from its config (random weights), batch 8, on CPU: one UPop search step (masks
attached, sparsity loss, mask update) and one retraining step (the model pruned 2x, random
units) with distillation from the frozen dense teacher (:mod:`upop.distill.distiller`, modes "logits" and
"logits+hidden", UPopConfig's default weight and temperature) vs without ("none").

Time: the three modes of a phase alternate in one process (same machine state), median over
``--steps`` steps after a warm-up step. Memory: each (phase, mode) runs 2 steps in its own fresh
process (``transfer.py --cost-child``) and reports its peak resident memory, with the allocator
setting of benchmarks/overhead.py (``CHILD_ENV``). Target: <= 1.4x time, <= 1.3x memory.
A mode the installed upop cannot run is reported as not measured (with the error), not fatal.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablations  # noqa: E402
from _common import peak_rss_mb, write_results  # noqa: E402
from overhead import CHILD_ENV, batch_for, build  # noqa: E402

import upop  # noqa: E402
from upop.tasks import get_task  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "transfer.py"

DISTILL_MODES = ("none", "logits", "logits, cached teacher", "logits+hidden")


class CostStepper:
    """One training step of CLIP ViT-B/16 (random weights, batch 8) in ``phase`` "search" (masks
    attached, UPop's sparsity loss and mask update) or "retrain" (pruned 2x, random units), with
    distillation ``mode`` ("none": the task loss alone) from a frozen dense teacher."""

    def __init__(self, phase: str, mode: str, quick: bool, batch: int = 8):
        torch.manual_seed(0)
        self.task = get_task("retrieval")
        self.model = build("clip-vit-b16", quick).train()
        self.batch = batch_for("clip-vit-b16", self.model, batch)
        n = len(self.batch["input_ids"])  # distinct pairs: index and sample 0..n-1 (the loss is unchanged)
        self.batch |= {"index": torch.arange(n), "sample": torch.arange(n)}
        self.distiller = self.search = None
        if mode != "none":
            from upop.distill.distiller import Distiller, make_teacher

            defaults = upop.UPopConfig()
            teacher = make_teacher(self.model)
            self.distiller = Distiller(teacher, mode.split(",")[0], weight=getattr(defaults, "distill_weight", 1.0),
                                       temperature=getattr(defaults, "distill_temperature", 1.0))
            if mode == "logits, cached teacher":  # as distill_cache: the teacher's embeddings computed once
                self.distiller.replay_factory = lambda: _replay(teacher, self.batch)
        if phase == "search":
            self.search = upop.UPopSearch(upop.attach_masks(self.model), ratio=0.5, total_steps=10_000, interval=1)
        else:
            g = torch.Generator().manual_seed(0)
            ablations.prune_by(self.model, 0.5, lambda m, grp: torch.rand(grp.num_units, generator=g))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.t = 0

    def step(self) -> float:
        start = time.perf_counter()
        if self.distiller is not None:
            task_loss, kd = self.distiller.loss(self.task.loss, self.model, self.model, self.batch)
            loss = task_loss + kd
        else:
            loss = self.task.loss(self.model, self.batch)
        if self.search is not None:
            loss = loss + self.search.sparsity_loss()
        loss.backward()
        if self.search is not None:
            self.search.step(self.t)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return time.perf_counter() - start


def _replay(teacher, batch):
    """The cached-teacher replay of upop.tasks._teacher_replay for the bench's batch: the teacher's
    normalised embeddings of its images and captions, computed once here (in a run: one pass over
    the training set before the first step)."""
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"])
    images, texts, scale = out.image_embeds, out.text_embeds, teacher.logit_scale.exp()
    return lambda b: {"affinity": (texts[b["sample"]] @ images[b["index"]].t()) * scale}


def cost_child(phase: str, mode: str, quick: bool, steps: int = 2) -> None:
    """Child process: peak resident memory of ``steps`` steps of one (phase, mode)."""
    stepper = CostStepper(phase, mode, quick)
    for _ in range(steps):
        stepper.step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def cost(quick: bool, steps: int) -> None:
    """Time (alternating in this process) and peak memory (a fresh process each) of every mode."""
    rows, errors = [], {}
    for phase in ("search", "retrain"):
        steppers = {}
        for mode in DISTILL_MODES:
            try:
                steppers[mode] = CostStepper(phase, mode, quick)
                steppers[mode].step()  # warm-up (and: does this mode run at all?)
            except Exception as exc:  # noqa: BLE001 (a mode this upop cannot run yet is reported, not fatal)
                steppers.pop(mode, None)
                errors[f"{phase}, {mode}"] = f"{type(exc).__name__}: {exc}"
        times = {mode: [] for mode in steppers}
        for _ in range(steps):
            for mode, stepper in steppers.items():
                times[mode].append(stepper.step())
        del steppers
        for mode in times:
            child = subprocess.run([sys.executable, str(SCRIPT), "--cost-child", phase, mode] + (["--quick"] if quick else []),
                                   capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
            if child.returncode:
                errors[f"{phase}, {mode} (memory)"] = (child.stderr.strip().splitlines() or ["no output"])[-1]
                continue
            peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            rows.append({"phase": phase, "mode": mode, "step_s": statistics.median(times[mode]), "peak_mb": peak})
    for r in rows:
        ref = next((x for x in rows if x["phase"] == r["phase"] and x["mode"] == "none"), None)
        r["time_ratio"] = r["step_s"] / ref["step_s"] if ref else None
        r["memory_ratio"] = r["peak_mb"] / ref["peak_mb"] if ref else None
    md = ["| phase | distill | step (s) | time vs none | peak RSS (MiB) | memory vs none |", "|---|---|---:|---:|---:|---:|"]

    def ratio(v: float | None) -> str:
        return f"{v:.3f}x" if v is not None else "—"

    for r in rows:
        md.append(f"| {r['phase']} | {r['mode']} | {r['step_s']:.3f} | {ratio(r['time_ratio'])} | {r['peak_mb']:.0f} | "
                  f"{ratio(r['memory_ratio'])} |")
    text = "\n".join(md) + "".join(f"\n\nNot measured: {k}: {v}" for k, v in errors.items())
    model = "CLIP ViT-B/16" if not quick else "CLIP ViT-B/16 shape at width 128, 2 layers, 64 px (--quick)"
    title = (f"## Cost of distillation: {model}, batch 8, CPU\n\nThe search step (masks, sparsity loss, mask "
             "update) and the retraining step (pruned 2x) with the dense teacher's distillation term vs without; "
             f"median of {steps} steps after a warm-up, peak RSS of a fresh process per mode. Target: <= 1.4x time, "
             "<= 1.3x memory. \"logits, cached teacher\" is `--distill logits` with `distill_cache` (the default "
             "for CLIP / SigLIP retrieval): the teacher's embeddings of every training image and caption are "
             "computed once, before the first step (one teacher forward pass over the training set, about the "
             "teacher's share of one epoch of \"logits\" steps), and each step multiplies its rows.\n\n")
    print(title + text)
    write_results("transfer-cost" + ("-quick" if quick else ""),
                  {"rows": rows, "errors": errors, "quick": quick, "steps": steps}, title + text)
