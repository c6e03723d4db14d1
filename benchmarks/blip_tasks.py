"""BLIP benchmark: UPop 2x on the four BLIP tasks (retrieval, VQA, captioning, NLVR2).

    python benchmarks/blip_tasks.py            # tiny BLIPs, more data and epochs; about 20 min on 1 core
    python benchmarks/blip_tasks.py --quick    # tiny BLIPs, little data; < 3 min

For each task it writes Shapes data in the real format, trains a dense BLIP with
``upop.engine.run.finetune``, compresses a copy 2x (``ratio=0.5`` of the prunable parameters) with
``upop.compress`` and records dense vs compressed metrics, parameters, FLOPs and latency (batch
1, paired with the dense model, from the run's report). Each task also gets a *blind baseline*
computed from the data alone (no image): retrieval at random, the most frequent training answer
per exact question (VQA), the most frequent training caption for every image (captioning), the
most frequent training label per exact statement (NLVR2). "Better than chance" means the dense
model beats it. Results: ``benchmarks/results/blip_tasks{,-quick}.json`` and ``.md``.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import upop
from upop.data import shapes_writer
from upop.models.folders import make_model, make_processor
from upop.tasks import get_task
from upop.tasks.caption_metrics import bleu, cider_d
from upop.tasks.vqa_metrics import vqa_accuracy
from upop.engine.run import finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report_cells, task_bench_args, write_results  # noqa: E402

# task -> make-model family
TASKS = {"retrieval": "blip-retrieval", "vqa": "blip-vqa", "caption": "blip-caption", "nlvr": "blip-nlvr"}
SETTINGS = {
    # data: (train, val, test) images (pairs for nlvr); epochs/lr of the dense training; search/retrain epochs.
    # All use the tiny BLIP (width 32, 2 layers): on 2 shared cores a small one cannot train far enough in time.
    "quick": dict(size="tiny", image_size=32, batch=16, search=1, retrain=1,
                  data={"retrieval": (240, 32, 32), "vqa": (160, 24, 24), "caption": (160, 24, 24), "nlvr": (240, 32, 32)},
                  epochs={"retrieval": 10, "vqa": 8, "caption": 20, "nlvr": 12},
                  lr={"retrieval": 1e-3, "vqa": 1e-3, "caption": 1e-3, "nlvr": 1e-3}),
    # compress_lr: (search, retrain) learning rates, default (lr / 4, lr / 2). The tiny captioner's
    # val CIDEr swings as it trains (dense: 49.5 at epoch 10, 32 by epoch 30: greedy decoding falls
    # back to generic captions), and at 2.5e-4 / 5e-4 the 2x model fell to CIDEr 36 within the first
    # retraining epoch; at 1e-4 / 1e-4 it keeps 46-47.
    "full": dict(size="tiny", image_size=32, batch=32, search=2, retrain=3, compress_lr={"caption": (1e-4, 1e-4)},
                 data={"retrieval": (1000, 100, 100), "vqa": (2000, 200, 200), "caption": (600, 100, 100),
                       "nlvr": (6000, 200, 200)},
                 epochs={"retrieval": 12, "vqa": 25, "caption": 30, "nlvr": 20},
                 lr={"retrieval": 1e-3, "vqa": 1e-3, "caption": 1e-3, "nlvr": 5e-4}),
}
INIT_FROM = {"nlvr": "vqa"}
"""NLVR2 starts from the dense VQA model's vision tower and text encoder, as BLIP fine-tunes NLVR2
from a pre-trained checkpoint: from scratch, its one-bit label never teaches a tiny BLIP to ground
the statement in the images (the loss stays at log 2 for 25 epochs on 6000 pairs)."""
METRIC = {"retrieval": "r_mean", "vqa": "vqa_acc", "caption": "cider", "nlvr": "accuracy"}


def blind_baseline(task_name: str, splits: dict) -> dict[str, float]:
    """What the data alone gives, without looking at any image (see the module doc)."""
    train, test = splits["train"], splits["test"]
    if task_name == "retrieval":
        n, c = len(test.items), len(test.items[0].captions)
        # a random ranking: image found at K when one of its c captions is in the top K of n*c texts
        txt = {k: 100 * (1 - math.comb(n * c - c, k) / math.comb(n * c, k)) for k in (1, 5, 10)}
        img = {k: 100 * min(k, n) / n for k in (1, 5, 10)}
        return {"r_mean": (sum(txt.values()) + sum(img.values())) / 6}
    if task_name == "vqa":
        by_q: dict[str, Counter] = {}
        for it in train.items:
            by_q.setdefault(it.question, Counter()).update(it.answers)
        overall = Counter(a for it in train.items for a in it.answers).most_common(1)[0][0]
        preds = [by_q[it.question].most_common(1)[0][0] if it.question in by_q else overall for it in test.items]
        return {"vqa_acc": 100 * sum(vqa_accuracy(p, it.answers) for p, it in zip(preds, test.items)) / len(preds)}
    if task_name == "caption":
        common = Counter(c for it in train.items for c in it.captions).most_common(1)[0][0]
        refs = [it.captions for it in test.items]
        return {"cider": 100 * cider_d([common] * len(refs), refs), "bleu4": 100 * bleu([common] * len(refs), refs)[3]}
    by_s: dict[str, Counter] = {}
    for it in train.items:
        by_s.setdefault(it.sentence, Counter()).update([it.label])
    overall = Counter(it.label for it in train.items).most_common(1)[0][0]
    preds = [by_s[it.sentence].most_common(1)[0][0] if it.sentence in by_s else overall for it in test.items]
    return {"accuracy": 100 * sum(p == it.label for p, it in zip(preds, test.items)) / len(preds)}


def run_task(task_name: str, setting: dict, work: Path, log, init: dict | None = None) -> dict:
    """Train the dense model of one task (from ``init``'s vision tower and text encoder when given),
    compress it 2x and return the row; the trained dense state dict is under ``"_state"``."""
    family, task, metric = TASKS[task_name], get_task(task_name), METRIC[task_name]
    train_n, val_n, test_n = setting["data"][task_name]
    data = work / f"data-{task_name}"
    shapes_writer(task_name)(data, train=train_n, val=val_n, test=test_n, image_size=setting["image_size"], seed=0)
    splits = task.load_splits(data)
    blind = blind_baseline(task_name, splits)
    processor = make_processor(family, setting["image_size"])
    vocab = len(processor.tokenizer)
    model = make_model(family, size=setting["size"], vocab_size=vocab, image_size=setting["image_size"], seed=0)
    if init is not None:
        from upop.models.blip_nlvr import twin_cross_attention

        state = {k: v for k, v in init.items() if k.startswith(("vision_model.", "text_encoder."))}
        # BLIP's NLVR model starts both cross-attentions of a layer from the one of the VQA model
        missing, _ = model.load_state_dict(twin_cross_attention(state) if family == "blip-nlvr" else state,
                                           strict=False)
        assert not [k for k in missing if k.startswith("text_encoder.encoder") and "merge_layer" not in k], missing[:3]
    lr = setting["lr"][task_name]
    start = time.perf_counter()
    model, val_metrics = finetune(model, task, splits["train"], splits["val"], processor,
                                  epochs=setting["epochs"][task_name], lr=lr, batch_size=setting["batch"],
                                  warmup_steps=10, progress=False, log=lambda m: log(f"  [{task_name} dense] {m}"))
    train_s = time.perf_counter() - start
    log(f"{task_name}: dense {type(model).__name__} trained in {train_s:.0f}s, val {metric} {val_metrics[metric]:.1f} "
        f"(blind baseline on test {blind[metric]:.1f})")
    search_lr, retrain_lr = setting.get("compress_lr", {}).get(task_name, (lr / 4, lr / 2))
    config = upop.UPopConfig(ratio=0.5, search_epochs=setting["search"], retrain_epochs=setting["retrain"],
                             batch_size=setting["batch"], lr=search_lr, retrain_lr=retrain_lr, eval_batch_size=64,
                             score="gradient", distill="none")  # the paper's score, no distillation, as these results were made
    start = time.perf_counter()
    result = upop.compress(copy.deepcopy(model), task, train=splits["train"], val=splits["val"], test=splits["test"],
                           processor=processor, config=config, out_dir=work / f"run-{task_name}", progress=False,
                           log=lambda m: None, overwrite=True)
    seconds = time.perf_counter() - start
    rep = result.report
    by_mod = {m: round(sum(c["kept"] for c in kinds.values()) / sum(c["total"] for c in kinds.values()), 3)
              for m, kinds in rep["allocation"]["by_modality"].items()}
    log(f"  2x: {metric} {rep['compressed']['metrics'][metric]:.1f} (dense {rep['dense']['metrics'][metric]:.1f}), "
        f"params {rep['compressed']['params']:,} / {rep['dense']['params']:,}, {seconds:.0f}s")
    return {"model_class": type(model).__name__, "family": family, "main_metric": metric, "blind_baseline": blind,
            "initialised_from": INIT_FROM.get(task_name) if init is not None else None,
            "_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "dense_val": val_metrics, "dense_beats_blind": rep["dense"]["metrics"][metric] > blind[metric],
            "achieved_ratio": round(rep["achieved_ratio"], 4), "kept_fraction_by_modality": by_mod,
            "dense": {**report_cells(rep["dense"]), "seconds": round(train_s, 1)},
            "compressed": {**report_cells(rep["compressed"]), "seconds": round(seconds, 1)}}


def markdown(results: dict) -> str:
    lines = [f"## BLIP tasks, UPop 2x ({results['setting']})", "",
             "Metrics on the test split; latency: batch 1, paired with the dense model; the blind baseline "
             "uses no image (see benchmarks/blip_tasks.py). NLVR2 starts from the dense VQA model's vision tower "
             f"and text encoder, as BLIP fine-tunes NLVR2 from a pre-trained model. Total time {results['seconds']:.0f} s.",
             "",
             "| task | model | metric | blind | dense | 2x | other metrics dense -> 2x | params dense -> 2x | "
             "FLOPs dense -> 2x | latency ms dense -> 2x | kept (vision/text/fusion/decoder) | train s / compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        m, d, c = r["main_metric"], r["dense"], r["compressed"]
        others = ", ".join(f"{k} {d['metrics'][k]:.1f} -> {c['metrics'][k]:.1f}" for k in d["metrics"] if k != m)
        kept = "/".join(f"{r['kept_fraction_by_modality'][k]:.2f}" if k in r["kept_fraction_by_modality"] else "-"
                        for k in ("vision", "text", "fusion", "decoder"))
        lines.append(f"| {name} | {r['model_class']} | {m} | {r['blind_baseline'][m]:.1f} | {d['metrics'][m]:.1f} | "
                     f"{c['metrics'][m]:.1f} | {others or '-'} | {d['params']:,} -> {c['params']:,} | "
                     f"{d['flops']:,} -> {c['flops']:,} | {d['latency_ms']:.2f} -> {c['latency_ms']:.2f} | {kept} | "
                     f"{d['seconds']:.0f} / {c['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = task_bench_args(__doc__.splitlines()[0], TASKS, "tiny models and data (< 3 minutes)", argv)
    setting_name = "quick" if args.quick else "full"
    setting = SETTINGS[setting_name]
    start = time.perf_counter()
    results = {"setting": setting_name, "settings": setting, "tasks": {}}
    dense_states: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="upop-blip-") as tmp:
        work = Path(args.work or tmp)
        for task_name in args.tasks:
            torch.manual_seed(0)
            row = run_task(task_name, setting, work, print, init=dense_states.get(INIT_FROM.get(task_name, "")))
            dense_states[task_name] = row.pop("_state")
            results["tasks"][task_name] = row
    results["seconds"] = round(time.perf_counter() - start, 1)
    payload = {**{k: v for k, v in results.items() if k != "tasks"},
               "rows": [{"task": name, **res} for name, res in results["tasks"].items()]}
    js, _ = write_results("blip_tasks" + ("-quick" if args.quick else ""), payload, markdown(results))
    print(f"wrote {js} and .md in {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
