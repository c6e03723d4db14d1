"""How the cost grows: time of one search step as CLIP width and depth grow, and time of the
whole pipeline (search + prune + retrain + evaluation) as the data set grows.

    python benchmarks/scaling.py            # widths 64/128/256, depths 2/4/8, 500/1000/2000 images
    python benchmarks/scaling.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import upop  # noqa: E402


def clip(width: int, depth: int, image_size: int = 64):
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=4 * width,
                         max_position_embeddings=32, vocab_size=64, eos_token_id=3, bos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=4,
                           intermediate_size=4 * width, image_size=image_size, patch_size=8),
        projection_dim=width)
    torch.manual_seed(0)
    return transformers.CLIPModel(cfg).train()


def search_step_time(width: int, depth: int, batch: int, steps: int) -> float:
    model = clip(width, depth)
    masks = upop.attach_masks(model)
    search = upop.UPopSearch(masks, ratio=0.5, total_steps=10_000, interval=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(5, 64, (batch, 16), generator=g), "pixel_values": torch.randn(batch, 3, 64, 64, generator=g)}
    times = []
    for t in range(steps + 1):
        start = time.perf_counter()
        out = model(**x)
        labels = torch.arange(batch)
        loss = F.cross_entropy(out.logits_per_image, labels) + search.sparsity_loss()
        loss.backward()
        search.step(t)
        opt.step()
        opt.zero_grad()
        if t:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipeline_time(train: int, work: Path) -> float:
    from upop.data.shapes import write_retrieval
    from upop.cli.demo import demo_model_path

    data = work / f"data-{train}"
    write_retrieval(data, train=train, val=50, test=100, image_size=64, seed=0)
    model, processor = upop.load_model(demo_model_path())
    cfg = upop.UPopConfig(ratio=0.5, search_epochs=1, retrain_epochs=1, batch_size=32, lr=1e-4, latency_time=0.05,
                          score="gradient", distill="none")  # as these results were made (the score does not change the step time)
    start = time.perf_counter()
    upop.compress(model, "retrieval", data, processor=processor, config=cfg, out_dir=work / f"run-{train}",
                  progress=False, log=lambda m: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    widths, depths, sizes = ([32, 64, 128], [1, 2, 4], [64, 128, 256]) if args.quick else \
        ([64, 128, 256], [2, 4, 8], [500, 1000, 2000])
    steps, batch = (2, 8) if args.quick else (5, 32)
    rows = []
    for w in widths:
        rows.append({"axis": "width", "value": w, "depth": 4, "search_step_s": search_step_time(w, 4, batch, steps)})
        print(rows[-1], flush=True)
    for d in depths:
        rows.append({"axis": "depth", "value": d, "width": 64, "search_step_s": search_step_time(64, d, batch, steps)})
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as work:
        for n in sizes:
            rows.append({"axis": "train images", "value": n, "pipeline_s": pipeline_time(n, Path(work))})
            print(rows[-1], flush=True)
    md = ["| axis | value | search step (s, batch %d, 64 px) | full pipeline (s) |" % batch, "|---|---:|---:|---:|"]
    for r in rows:
        step = f"{r['search_step_s']:.3f}" if "search_step_s" in r else ""
        pipe = f"{r['pipeline_s']:.1f}" if "pipeline_s" in r else ""
        md.append(f"| {r['axis']} | {r['value']} | {step} | {pipe} |")
    note = ("\n\nWidth rows: CLIP with 4+4 layers; depth rows: width 64; pipeline rows: the demo CLIP, 1 search + "
            "1 retrain epoch at batch 32, evaluation and report included.")
    write_results("scaling" + ("-quick" if args.quick else ""), {"rows": rows, "quick": args.quick},
                  "## Scaling\n\n" + "\n".join(md) + note)


if __name__ == "__main__":
    main()
