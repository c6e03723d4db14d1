"""Cost of the search: one UPop search step vs one plain fine-tuning step of the same model and
batch, on full-size architectures (random weights): time per step and peak memory.

    python benchmarks/overhead.py            # CLIP ViT-B/16 and BLIP-base retrieval, batch 8
    python benchmarks/overhead.py --quick    # small widths, for CI

Time: both modes alternate in one process (same machine state), median over steps after warm-up.
Memory: each mode runs in its own fresh process and reports its peak resident memory (VmHWM),
model, optimizer state and activations included — what a user's run needs.
Retraining: the peak of the retraining steps in the process that ran the search (its optimizer
and masks dropped, as a run does; the high-water mark is reset first) vs a fresh process
fine-tuning the same compressed model.
Allocator: the memory children run with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every
tensor of 64 KiB and more with its own mapping and returns it on free. With glibc's default
(a threshold that grows with the allocation history) freed tensors stay in the heap, and the peak
resident memory depends on the order of allocations, not only on what is alive: the same two
modes measured 1.026x and 1.087x in two runs that way, and 1.002x with the fixed threshold
(CLIP-B/16, batch 8). The fixed threshold also lowers the peak itself (3.95 -> 3.59 GB for the
fine-tune step): worth setting for CPU runs.
Goal: search <= 1.05x the time and the memory of fine-tuning; retraining <= 1.05x the memory of a
plain fine-tune of the compressed model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import blip_base_config, clip_b16_config, peak_rss_mb, write_results  # noqa: E402

import upop  # noqa: E402
from upop.engine.runtime import release_host_memory  # noqa: E402


CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""Environment of the memory children: peak RSS that follows the live tensors (see the module doc)."""


def _shrink(cfg) -> None:
    """--quick: the same architecture at width 128, 2 layers, a small vocabulary."""
    for sub in (cfg.vision_config, cfg.text_config):
        sub.hidden_size, sub.intermediate_size, sub.num_attention_heads, sub.num_hidden_layers = 128, 512, 4, 2
    cfg.text_config.vocab_size = 1000
    if hasattr(cfg.text_config, "encoder_hidden_size"):
        cfg.text_config.encoder_hidden_size = 128


def build(name: str, quick: bool):
    import transformers

    if name == "clip-vit-b16":
        cfg = clip_b16_config(224 if not quick else 64)
        if quick:
            _shrink(cfg)
            cfg.projection_dim = 128
        return transformers.CLIPModel(cfg)
    if name == "blip-base-retrieval":
        cfg = blip_base_config(224 if not quick else 64)
        if quick:
            _shrink(cfg)
        return transformers.BlipForImageTextRetrieval(cfg)
    raise ValueError(name)


def batch_for(name: str, model, batch: int):
    g = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    ids = torch.randint(5, min(1000, model.config.text_config.vocab_size), (batch, 32), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def loss_fn(name: str, model, batch):
    if name.startswith("clip"):
        out = model(**batch)
        labels = torch.arange(out.logits_per_image.shape[0])
        return (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2
    itm = model(**batch, use_itm_head=True).itm_score
    itc = model(**batch, use_itm_head=False).itm_score
    labels = torch.arange(itc.shape[0])
    return F.cross_entropy(itc / 0.07, labels) + F.cross_entropy(itm, torch.ones(itm.shape[0], dtype=torch.long))


class Stepper:
    def __init__(self, name: str, quick: bool, batch: int, mode: str):
        torch.manual_seed(0)
        self.name, self.mode = name, mode
        self.model = build(name, quick).train()
        self.batch = batch_for(name, self.model, batch)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.search = None
        if mode == "search":
            masks = upop.attach_masks(self.model)
            self.search = upop.UPopSearch(masks, ratio=0.5, total_steps=10_000, interval=1)  # an update every step
        self.t = 0

    def step(self) -> float:
        start = time.perf_counter()
        loss = loss_fn(self.name, self.model, self.batch)
        if self.search is not None:
            loss = loss + self.search.sparsity_loss()
        loss.backward()
        if self.search is not None:
            self.search.step(self.t)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return time.perf_counter() - start


def _reset_peak_rss() -> None:
    """Start a new high-water mark of resident memory (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def memory_child(name: str, quick: bool, batch: int, mode: str, steps: int, plan_file: str = "") -> None:
    """Peak resident memory of ``mode``: "finetune" or "search" (from a fresh process); "retrain"
    (search as a run does it, prune, drop the search's optimizer and masks, then the peak of the
    retraining steps alone, the plan written to ``plan_file``); "finetune-compressed" (a fresh
    process fine-tuning the model pruned by ``plan_file``)."""
    import gc

    if mode in ("finetune", "search"):
        stepper = Stepper(name, quick, batch, mode)
        for _ in range(steps):
            stepper.step()
        print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
        return
    if mode == "retrain":
        stepper = Stepper(name, quick, batch, "search")
        stepper.search = upop.UPopSearch(stepper.search.masks, ratio=0.5, total_steps=2, interval=1)
        for _ in range(2):
            stepper.step()
        plan = upop.prune(stepper.model, stepper.search.masks)
        Path(plan_file).write_text(plan.to_json())
        stepper.search = None
        stepper.opt = None
        release_host_memory()  # what Run does between the search and retraining
        stepper.opt = torch.optim.AdamW(stepper.model.parameters(), lr=1e-5)
    else:
        stepper = Stepper(name, quick, batch, "finetune")
        upop.apply_plan(stepper.model, upop.PruningPlan.from_dict(json.loads(Path(plan_file).read_text())))
        stepper.opt = torch.optim.AdamW(stepper.model.parameters(), lr=1e-5)
        gc.collect()
    _reset_peak_rss()
    for _ in range(steps):
        stepper.step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def measure(name: str, quick: bool, batch: int, steps: int) -> dict:
    steppers = {mode: Stepper(name, quick, batch, mode) for mode in ("finetune", "search")}
    times = {mode: [] for mode in steppers}
    for i in range(steps + 1):  # the first step of each is warm-up
        for mode, stepper in steppers.items():
            dt = stepper.step()
            if i:
                times[mode].append(dt)
    del steppers
    memory = {}
    import tempfile

    plan_file = Path(tempfile.mkdtemp()) / "plan.json"
    for mode in ("finetune", "search", "retrain", "finetune-compressed"):  # retrain writes the plan first
        out = subprocess.run([sys.executable, __file__, "--child", name, mode, str(batch), str(min(steps, 2)),
                              "--plan", str(plan_file)] + (["--quick"] if quick else []),
                             capture_output=True, text=True, check=True, env={**os.environ, **CHILD_ENV})
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    t_ft, t_s = statistics.median(times["finetune"]), statistics.median(times["search"])
    return {"model": name, "batch": batch, "steps": steps, "finetune_step_s": t_ft, "search_step_s": t_s,
            "time_ratio": t_s / t_ft, "finetune_peak_mb": memory["finetune"], "search_peak_mb": memory["search"],
            "memory_ratio": memory["search"] / memory["finetune"],
            "retrain_peak_mb": memory["retrain"], "finetune_compressed_peak_mb": memory["finetune-compressed"],
            "retrain_memory_ratio": memory["retrain"] / memory["finetune-compressed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=["clip-vit-b16", "blip-base-retrieval"])
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "MODE", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, mode, batch, steps = args.child
        return memory_child(name, args.quick, int(batch), mode, int(steps), args.plan)
    rows = [measure(name, args.quick, args.batch, args.steps) for name in args.models]
    md = ["| model | batch | fine-tune step (s) | search step (s) | time ratio | fine-tune peak (MiB) | search peak (MiB) "
          "| memory ratio | retrain peak (MiB) | fine-tune of the compressed model (MiB) | retrain memory ratio |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['model']}{' (quick)' if args.quick else ''} | {r['batch']} | {r['finetune_step_s']:.3f} | "
                  f"{r['search_step_s']:.3f} | {r['time_ratio']:.3f}x | {r['finetune_peak_mb']:.0f} | "
                  f"{r['search_peak_mb']:.0f} | {r['memory_ratio']:.3f}x | {r['retrain_peak_mb']:.0f} | "
                  f"{r['finetune_compressed_peak_mb']:.0f} | {r['retrain_memory_ratio']:.3f}x |")
    text = "\n".join(md)
    print(text)
    write_results("overhead" + ("-quick" if args.quick else ""), {"rows": rows, "quick": args.quick},
                  "## Search step vs fine-tuning step\n\n" + text)


if __name__ == "__main__":
    main()
