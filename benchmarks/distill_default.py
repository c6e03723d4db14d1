"""The default distillation (``--distill auto``) on every retrieval family: what it does to quality
and what it costs, against ``--distill none``, on tiny models trained on Shapes.

``auto`` distils retrieval's image-text similarities from the cached teacher (benchmarks/transfer.py
chose it on CLIP, where pretrained knowledge is at stake). This benchmark checks BLIP retrieval,
which that benchmark did not cover (with CLIP as the control), on the setting where
there is little to gain: each dense model is trained from scratch on the same Shapes task set it is
then compressed with, so the question is whether the default *hurts* anywhere and what the one
teacher pass costs, not whether it helps. SigLIP is not in it: a tiny SigLIP trained from scratch
here stays at chance (test R@mean 5.4 after 12 epochs at lr 1e-3, 5.5 at 3e-4; chance is 5.3), so
there is nothing to compare (``--families siglip`` still runs it).

Protocol (fixed before any row ran): per family, a tiny model (upop ``make-model FAMILY --size
tiny``, 32 px) trained densely on 1,000 Shapes retrieval images (2 captions each) for 12 epochs
(batch 32, lr 1e-3, 10 warm-up steps: benchmarks/blip_tasks.py's "full" retrieval setting), then
compressed at 4x (``ratio=0.75``) with upop's defaults and ``distill`` = ``none`` or ``auto``, 2
search + 3 retraining epochs (lr 2.5e-4 / 5e-4), seeds 0, 1, 2; test R@mean on 100 images (mean +-
std over seeds), the run's search and retraining phase times (log.jsonl) and the whole
``compress`` call's time (which holds the cached run's one teacher pass, made before the search).

    python benchmarks/distill_default.py             # about 20 minutes on 1 thread
    python benchmarks/distill_default.py --quick     # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import upop
from upop.data import shapes_writer
from upop.models.folders import make_model, make_processor
from upop.tasks import get_task
from upop.engine.run import finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

FAMILIES = ("clip", "siglip", "blip-retrieval")
DEFAULT_FAMILIES = ("clip", "blip-retrieval")  # SigLIP: see the module doc
MODES = ("none", "auto")
SETTINGS = {
    "full": dict(data=(1000, 100, 100), epochs=12, batch=32, lr=1e-3, search=2, retrain=3, ratio=0.75, seeds=(0, 1, 2)),
    "quick": dict(data=(64, 16, 16), epochs=1, batch=16, lr=1e-3, search=1, retrain=1, ratio=0.75, seeds=(0,)),
}


def phase_seconds(run: Path) -> dict[str, float]:
    """Search and retraining seconds of a finished run (its ``log.jsonl`` phase records)."""
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("phase") == "phase_end" and rec.get("of") in ("search", "retrain"):
            out[rec["of"]] = round(rec["seconds"], 1)
    return out


def run_family(family: str, s: dict, work: Path, log) -> list[dict]:
    task = get_task("retrieval")
    data = work / "data"
    if not data.exists():
        train, val, test = s["data"]
        shapes_writer("retrieval")(data, train=train, val=val, test=test, image_size=32, seed=0)
    splits = task.load_splits(data)
    processor = make_processor(family, 32)
    model = make_model(family, size="tiny", vocab_size=len(processor.tokenizer), image_size=32, seed=0)
    torch.manual_seed(0)
    start = time.perf_counter()
    model, _ = finetune(model, task, splits["train"], splits["val"], processor, epochs=s["epochs"], lr=s["lr"],
                        batch_size=s["batch"], warmup_steps=10, progress=False, log=lambda m: None)
    log(f"{family}: dense trained in {time.perf_counter() - start:.0f}s")
    rows = []
    for seed in s["seeds"]:
        for mode in MODES:
            config = upop.UPopConfig(ratio=s["ratio"], search_epochs=s["search"], retrain_epochs=s["retrain"],
                                     batch_size=s["batch"], lr=s["lr"] / 4, retrain_lr=s["lr"] / 2, seed=seed,
                                     eval_batch_size=64, latency_time=0.02, distill=mode)
            out = work / f"run-{family}-{mode}-{seed}"
            begin = time.perf_counter()
            result = upop.compress(copy.deepcopy(model), task, train=splits["train"], val=splits["val"],
                                   test=splits["test"], processor=processor, config=config, out_dir=out,
                                   progress=False, log=lambda m: None, overwrite=True)
            rep = result.report
            row = {"family": family, "model_class": type(model).__name__, "distill": mode, "seed": seed,
                   "used": rep["distill"], "dense_r_mean": round(rep["dense"]["metrics"]["r_mean"], 2),
                   "r_mean": round(rep["compressed"]["metrics"]["r_mean"], 2),
                   "seconds": {**phase_seconds(out), "total": round(time.perf_counter() - begin, 1)}}
            log(f"  {family} distill={mode} seed {seed}: R@mean {row['r_mean']:.2f} (dense {row['dense_r_mean']:.2f}), "
                f"{row['seconds']}, {rep['distill']}")
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        for mode in MODES:
            sel = [r for r in rows if r["family"] == family and r["distill"] == mode]
            if not sel:
                continue
            vals = [r["r_mean"] for r in sel]

            def med(key):
                return statistics.median(r["seconds"].get(key, float("nan")) for r in sel)

            out.append({"family": family, "model_class": sel[0]["model_class"], "distill": mode,
                        "used": sel[0]["used"].get("mode"), "cached": sel[0]["used"].get("teacher_cached", False),
                        "dense": sel[0]["dense_r_mean"], "mean": round(statistics.fmean(vals), 2),
                        "std": round(statistics.pstdev(vals), 2) if len(vals) > 1 else 0.0, "seeds": len(vals),
                        "search_s": med("search"), "retrain_s": med("retrain"), "total_s": med("total")})
    return out


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = ["## The default distillation on every retrieval family (tiny models, Shapes, 4x)", "",
             f"Each dense model is trained from scratch on the task set it is compressed with ({s['data'][0]} images), "
             f"so little is at stake; the question is whether `--distill auto` hurts and what it costs. Test R@mean "
             f"(mean ± std over seeds {list(s['seeds'])}); times are medians over seeds: the search and retraining "
             "phases, and the whole `compress` call (which also holds the cached run's one teacher pass over the "
             "training set, made before the search, and the evaluations). Protocol: benchmarks/distill_default.py.", "",
             "| model | distill | used | dense | 4x R@mean | search s | retrain s | total s | total vs none |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in payload["summary"]:
        base = next(x for x in payload["summary"] if x["family"] == r["family"] and x["distill"] == "none")
        used = r["used"] + (" (cached teacher)" if r["cached"] else "")
        lines.append(f"| {r['model_class']} | {r['distill']} | {used} | {r['dense']:.2f} | {r['mean']:.2f} ± "
                     f"{r['std']:.2f} | {r['search_s']:.1f} | {r['retrain_s']:.1f} | {r['total_s']:.1f} | "
                     f"{r['total_s'] / base['total_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, 1 seed")
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES), choices=FAMILIES)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--work", default=None, help="folder for data and runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = SETTINGS["quick" if args.quick else "full"]
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="upop-distill-") as tmp:
        work = Path(args.work or tmp)
        for family in args.families:
            rows += run_family(family, s, work, print)
    payload = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "rows": rows,
               "summary": summary(rows), "seconds": round(time.perf_counter() - start, 1)}
    name = "distill_default" + ("-quick" if args.quick else "")
    js, _ = write_results(name, payload, markdown(payload))
    print(markdown(payload))
    print(f"wrote {js} and .md in {payload['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
