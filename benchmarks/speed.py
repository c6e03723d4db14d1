"""Speed of compressed CLIP models on this machine: latency and throughput of the vision tower,
the text tower and the whole retrieval forward, dense vs 2x and 4x, at batch 1 and 32, next to
the FLOPs reduction (the physical limit of this kind of pruning).

    python benchmarks/speed.py              # demo size, CLIP-small (256 wide) and CLIP ViT-B/16
    python benchmarks/speed.py --quick      # demo size only, short timings (CI)

Widths: a UPop selection (global ranking, per-type standardised) over random accumulated scores
gives the uneven per-layer widths a search produces; speed depends only on the widths. Each
ratio is measured with upop's defaults (``round_to="auto"``, budget in params), with free widths
(``round_to=1``, the paper) and with ``cost="latency"`` (the budget in time per unit measured on
this machine at the row's batch, :mod:`upop.latency_table`).
Latency: ``torch.utils.benchmark`` median; the variants are measured in interleaved rounds and
the best median of each is kept, so a burst of load on a shared machine cannot favour one.
"speedup / params" is the speedup per factor of parameters removed: which budget buys more time
for the parameters it removes.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clip_b16_config, write_results  # noqa: E402

import upop  # noqa: E402
from upop.latency_table import measure_table  # noqa: E402
from upop.search import UPopSearch, resolve_round_to  # noqa: E402


def models(quick: bool):
    import transformers

    from upop.demo import demo_model_path

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
    """A copy of ``model`` pruned to a UPop selection over random scores (``unit_costs``: the
    latency table's ms per unit, for ``cost="latency"``)."""
    pruned = copy.deepcopy(model)
    masks = upop.attach_masks(pruned)
    round_to, _ = resolve_round_to(round_to, masks.groups)
    g = torch.Generator().manual_seed(seed)
    for name in masks.keys():
        masks.grad_sum[name] = torch.randn(masks[name].numel(), generator=g, dtype=torch.float64)
    search = UPopSearch(masks, ratio=ratio, total_steps=1, interval=1, round_to=round_to, method="one-shot",
                        cost="latency" if unit_costs else "params", unit_costs=unit_costs)
    search.update(0)
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
    out = [("dense", 0.0, 1, dense)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None, help="min run time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (best kept)")
    args = parser.parse_args()
    seconds = args.seconds or (0.2 if args.quick else 1.0)
    batches = (1, 32)
    rows = []
    for label, dense in models(args.quick):
        for batch in batches:
            variants = variants_for(dense, batch, seconds)
            x = inputs_for(dense, batch)
            for part, fn in PARTS.items():
                base = {}
                # rounds interleave the variants; the best median of each is kept (noise only slows)
                best = {name: upop.measure_latency(model, x, forward=fn, min_run_time=seconds)
                        for name, _, _, model in variants}
                for _ in range(args.rounds - 1):
                    for name, _, _, model in variants:
                        best[name] = min(best[name], upop.measure_latency(model, x, forward=fn, min_run_time=seconds))
                for name, ratio, round_to, model in variants:
                    flops, params, ms = upop.count_flops(model, x, forward=fn), upop.count_params(model), best[name]
                    if name == "dense":
                        base = {"ms": ms, "flops": flops, "params": params}
                    speedup = base["ms"] / ms
                    rows.append({"model": label, "part": part, "batch": batch, "variant": name, "ratio": ratio,
                                 "round_to": round_to, "params": params, "flops": flops,
                                 "latency_ms": ms, "throughput_per_s": 1000.0 * batch / ms,
                                 "speedup": speedup, "flops_ratio": base["flops"] / flops,
                                 "speedup_over_flops_ratio": speedup / (base["flops"] / flops),
                                 "speedup_over_params_ratio": speedup / (base["params"] / params)})
                    print(f"{label:45s} {part:9s} b{batch:<3d} {name:28s} {ms:9.2f} ms  speedup {speedup:5.2f}x "
                          f"(FLOPs {base['flops'] / flops:5.2f}x, params {base['params'] / params:5.2f}x)", flush=True)
    md = ["| model | part | batch | variant | latency (ms) | throughput (/s) | speedup | FLOPs reduction | speedup / FLOPs "
          "| speedup / params |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['part']} | {r['batch']} | {r['variant']} | {r['latency_ms']:.2f} | "
                  f"{r['throughput_per_s']:.1f} | {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | "
                  f"{r['speedup_over_flops_ratio']:.2f} | {r['speedup_over_params_ratio']:.2f} |")
    write_results("speed" + ("-quick" if args.quick else ""), {"rows": rows, "quick": args.quick},
                  "## Speed of compressed CLIP (CPU)\n\n" + "\n".join(md))


if __name__ == "__main__":
    main()
