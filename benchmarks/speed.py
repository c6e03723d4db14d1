"""Speed of compressed CLIP models on this machine: latency and throughput of the vision tower,
the text tower and the whole retrieval forward, dense vs 2x and 4x, at batch 1 and 32, next to
the FLOPs reduction (the physical limit of this kind of pruning).

    python benchmarks/speed.py              # demo size, CLIP-small (256 wide) and CLIP ViT-B/16
    python benchmarks/speed.py --quick      # demo size only, short timings (CI)

Widths: a UPop selection over random accumulated importances (upop's default Taylor score: global
ranking, per-type standardised) gives the uneven per-layer widths a search produces; speed depends
only on the widths. Each ratio is measured with upop's defaults (``round_to="auto"``, budget in
params), with free widths (``round_to=1``, the paper) and with ``cost="latency"`` (the budget in
time per unit measured on this machine at the row's batch, :mod:`upop.measure.latency_table`; the units
then ranked by importance per millisecond, the same random importances).
Latency: as upop's report times it (:func:`upop.measure.latency.timed_rounds`): every variant, the dense
model and the floor model (every group at 1 unit) in the same interleaved rounds; a variant's
speedup is the median of its per-round speedups, so a burst of load on a shared machine shifts a
round for all of them. The floor model bounds what width pruning can give (Amdahl): the
"fixed-part bound" column.
"speedup / params" is the speedup per factor of parameters removed: which budget buys more time
for the parameters it removes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clip_b16_config, write_results  # noqa: E402

import upop  # noqa: E402
from upop.measure.latency_table import measure_table  # noqa: E402
from upop.measure.latency import ROUNDS, forward_ms, timed_rounds  # noqa: E402
from upop.runs.report import is_noisy, spread  # noqa: E402
from upop.search.mask_search import UPopSearch, resolve_round_to  # noqa: E402


def models(quick: bool):
    import transformers

    from upop.cli.demo import demo_model_path

    demo, _ = upop.load_model(demo_model_path())
    yield "demo (64 wide, 4+4 layers, 64 px)", demo
    if quick:
        return
    small = copy.deepcopy(clip_b16_config(224))
    small.vision_config.hidden_size = small.text_config.hidden_size = 256
    small.vision_config.intermediate_size = small.text_config.intermediate_size = 1024
    small.vision_config.num_attention_heads = small.text_config.num_attention_heads = 4
    small.vision_config.num_hidden_layers = small.text_config.num_hidden_layers = 6
    small.projection_dim = 256
    yield "CLIP-small (256 wide, 6+6 layers, 224 px)", transformers.CLIPModel(small).eval()
    yield "CLIP ViT-B/16 (224 px)", transformers.CLIPModel(clip_b16_config(224)).eval()


def compress_widths(model, ratio: float, round_to: int | str, seed: int = 0, unit_costs=None):
    """A copy of ``model`` pruned to a UPop selection over random Taylor importances (``unit_costs``:
    the latency table's ms per unit, for ``cost="latency"``, which ranks by importance per ms)."""
    pruned = copy.deepcopy(model)
    masks = upop.attach_masks(pruned)
    round_to, _ = resolve_round_to(round_to, masks.groups)
    g = torch.Generator().manual_seed(seed)
    for name in masks.keys():
        masks.grad_sum[name] = torch.randn(masks[name].numel(), generator=g, dtype=torch.float64).abs()
    search = UPopSearch(masks, ratio=ratio, total_steps=1, interval=1, round_to=round_to, method="one-shot",
                        cost="latency" if unit_costs else "params", unit_costs=unit_costs, score="taylor")
    search.update(0)
    upop.prune(pruned, masks)
    return pruned.eval()


def floor_model(model):
    """A copy of ``model`` with every group pruned to 1 unit: what width pruning cannot remove."""
    pruned = copy.deepcopy(model)
    masks = upop.attach_masks(pruned)
    with torch.no_grad():
        for _, mask in masks.items():
            mask.zero_()
            mask[0] = 1.0
    upop.prune(pruned, masks)
    return pruned.eval()


def inputs_for(model, batch: int):
    g = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    length = min(32, model.config.text_config.max_position_embeddings)
    ids = torch.randint(5, model.config.text_config.vocab_size, (batch, length), generator=g)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


PARTS = {
    "vision": lambda m, x: m.get_image_features(pixel_values=x["pixel_values"]),
    "text": lambda m, x: m.get_text_features(input_ids=x["input_ids"], attention_mask=x["attention_mask"]),
    "retrieval": lambda m, x: m(**x),
}


def variants_for(dense, batch: int, seconds: float):
    """(name, ratio, round_to, model) of every variant measured at ``batch``."""
    out = [("dense", 0.0, 1, dense), ("floor", 1.0, 1, floor_model(dense))]
    groups = upop.find_groups(dense, text_tokens=min(32, dense.config.text_config.max_position_embeddings))
    auto, _ = resolve_round_to("auto", groups)
    table = measure_table(dense, groups, batch, "cpu", round_to=auto, seconds=min(seconds, 0.05))
    for ratio in (0.5, 0.75):
        x = f"{1 / (1 - ratio):.0f}x"
        out.append((f"{x} (defaults: round {auto})", ratio, auto, compress_widths(dense, ratio, "auto")))
        out.append((f"{x} free widths", ratio, 1, compress_widths(dense, ratio, 1)))
        out.append((f"{x} cost latency", ratio, auto, compress_widths(dense, ratio, "auto",
                                                                     unit_costs=table["per_unit_ms"])))
    return out


def bound(flops: int, dense: dict, floor: dict) -> float:
    """The Amdahl speedup the fixed part allows: latency ``floor + (dense - floor) x`` the share of
    the prunable FLOPs kept (the floor model, every group at 1 unit, keeps what width pruning cannot
    remove: embeddings, norms, residual adds, softmax, per-op overhead)."""
    kept = (flops - floor["flops"]) / max(dense["flops"] - floor["flops"], 1)
    return dense["ms"] / (floor["ms"] + (dense["ms"] - floor["ms"]) * kept)


def measure(label: str, batch: int, part: str, variants, x, seconds: float, rounds: int) -> list[dict]:
    """One (model, batch, part): every variant and the floor model timed in the same interleaved
    rounds; each variant's speedup is the median of its per-round speedups over the dense model."""
    fn = PARTS[part]
    models = [v[3] for v in variants]
    times = timed_rounds(models, x, rounds=rounds, seconds=seconds, timer=functools.partial(forward_ms, forward=fn),
                         warmup=1 if batch > 1 else 3)
    by = {}
    for (name, ratio, round_to, model), ms in zip(variants, times):
        by[name] = {"ms": statistics.median(ms), "per_round": ms, "flops": upop.count_flops(model, x, forward=fn),
                    "params": upop.count_params(model)}
    dense, floor = by["dense"], by["floor"]
    rows = []
    for name, ratio, round_to, model in variants:
        if name == "floor":
            continue
        r = by[name]
        speedups = [d / c for d, c in zip(dense["per_round"], r["per_round"])]
        speedup, flops_ratio = statistics.median(speedups), dense["flops"] / r["flops"]
        limit = bound(r["flops"], dense, floor)
        spread_ = spread(speedups)
        rows.append({"model": label, "part": part, "batch": batch, "variant": name, "ratio": ratio,
                     "round_to": round_to, "params": r["params"], "flops": r["flops"],
                     "latency_ms": r["ms"], "latency_ms_per_round": r["per_round"],
                     "throughput_per_s": 1000.0 * batch / r["ms"], "speedup": speedup,
                     "speedup_per_round": speedups, "speedup_spread": spread_, "noisy": is_noisy(spread_),
                     "flops_ratio": flops_ratio, "speedup_over_flops_ratio": speedup / flops_ratio,
                     "fixed_share": floor["ms"] / dense["ms"], "bound_speedup": limit,
                     "bound_over_flops_ratio": limit / flops_ratio, "speedup_over_bound": speedup / limit,
                     "speedup_over_params_ratio": speedup / (dense["params"] / r["params"])})
        print(f"{label:45s} {part:9s} b{batch:<3d} {name:28s} {r['ms']:9.2f} ms  speedup {speedup:5.2f}x "
              f"(IQR {100 * (spread_['relative_iqr'] or 0):.0f}%; FLOPs {flops_ratio:5.2f}x, bound {limit:5.2f}x, "
              f"params {dense['params'] / r['params']:5.2f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing per model per measurement, split over the rounds (x3, as upop's report)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds per measurement")
    args = parser.parse_args()
    seconds = args.seconds or (0.2 if args.quick else 1.0)
    batches = (1, 32)
    rows = []
    for label, dense in models(args.quick):
        for batch in batches:
            variants = variants_for(dense, batch, seconds)
            x = inputs_for(dense, batch)
            for part in PARTS:
                rows += measure(label, batch, part, variants, x, seconds, args.rounds)
    md = ["| model | part | batch | variant | latency (ms) | throughput (/s) | speedup (IQR) | FLOPs reduction "
          "| speedup / FLOPs | fixed-part bound | bound / FLOPs | speedup / bound | speedup / params |",
          "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        iqr = r["speedup_spread"]["relative_iqr"] or 0.0
        md.append(f"| {r['model']} | {r['part']} | {r['batch']} | {r['variant']} | {r['latency_ms']:.2f} | "
                  f"{r['throughput_per_s']:.1f} | {r['speedup']:.2f}x ({100 * iqr:.0f}%) | {r['flops_ratio']:.2f}x | "
                  f"{r['speedup_over_flops_ratio']:.2f} | {r['bound_speedup']:.2f}x | {r['bound_over_flops_ratio']:.2f} | "
                  f"{r['speedup_over_bound']:.2f} | {r['speedup_over_params_ratio']:.2f} |")
    threads = torch.get_num_threads()
    notes = [f"Timing: {args.rounds} interleaved rounds per (model, batch, part), every variant and the floor model "
             f"in each round ({3 * seconds:.1f} s per model in all; {threads} CPU threads); speedup = median of the "
             "per-round speedups over the dense model, with the interquartile range of those speedups over their "
             "median in brackets.",
             "Fixed-part bound: the speedup an Amdahl model allows, latency = floor + (dense - floor) x the share "
             "of the prunable FLOPs kept, where the floor model (every group at 1 unit, timed in the same rounds) "
             "holds what width pruning cannot remove (embeddings, layer norms, residual adds, softmax, per-op "
             "overhead). \"speedup / bound\" near 1 means the pruned widths run as fast as their FLOPs allow."]
    write_results("speed" + ("-quick" if args.quick else ""), {"rows": rows, "quick": args.quick, "rounds": args.rounds,
                                                              "threads": threads},
                  "## Speed of compressed CLIP (CPU)\n\n" + "\n".join(md) + "\n\n" + "\n\n".join(notes))


if __name__ == "__main__":
    main()
