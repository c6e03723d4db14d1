"""Vision benchmark: UPop on a ViT classifier and a Segmenter at several compression ratios.

    python benchmarks/vision_ratios.py            # small models, ~2k images; < 15 min on 2 cores
    python benchmarks/vision_ratios.py --quick    # tiny models, few images; < 2 min

For each task it writes Shapes data in the real format (ImageFolder / ADE20K), trains a dense
model with ``upop.engine.run.finetune`` until it is clearly better than chance, then compresses copies
of it with ``upop.compress`` at ratios 0.1, 0.3 and 0.5 of the prunable parameters (short search
and retraining), and records per ratio the metrics, parameters, FLOPs and latency (paired with the
dense model, from the run's report). Results: ``benchmarks/results/vision_ratios{,-quick}.json``
and ``.md`` (with the exact command and the machine).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import upop
from upop.data.shapes_vision import write_classification, write_segmentation
from upop.models.folders import make_model, make_processor
from upop.tasks import get_task
from upop.engine.run import finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report_cells, task_bench_args, write_results  # noqa: E402

RATIOS = (0.1, 0.3, 0.5)
# setting -> per-task (family, writer, num_labels, chance-level note)
TASKS = {
    "classification": ("vit", write_classification, 10),
    "segmentation": ("segmenter", write_segmentation, 7),
}
SETTINGS = {
    # size, image_size, (train, val, test), dense epochs, dense lr, search epochs, retrain epochs, batch
    "quick": dict(size="tiny", image_size={"classification": 32, "segmentation": 64}, data=(400, 60, 60), epochs=10,
                  lr=2e-3, search=1, retrain=1, batch=16),
    "full": dict(size="small", image_size={"classification": 32, "segmentation": 64}, data=(2000, 200, 200), epochs=20,
                 lr=1e-3, search=2, retrain=4, batch=32),
}
# a metric well above what predicting one class gives (chance: top-1 10%; background-only mIoU ~ 12%)
BAR = {"classification": ("top1", 30.0), "segmentation": ("miou", 30.0)}


def run_task(task_name: str, setting: dict, work: Path, log) -> dict:
    family, writer, num_labels = TASKS[task_name]
    # no training augmentation: Shapes classes are colours, which RandAugment's colour ops change
    task = get_task(task_name).configure(upop.UPopConfig(augment="none"))
    train_n, val_n, test_n = setting["data"]
    image_size = setting["image_size"][task_name]
    writer(work / f"data-{task_name}", train=train_n, val=val_n, test=test_n, image_size=image_size, seed=0)
    splits = task.load_splits(work / f"data-{task_name}")
    processor = make_processor(family, image_size)
    model = make_model(family, size=setting["size"], image_size=image_size, num_labels=num_labels, seed=0)
    start = time.perf_counter()
    model, val_metrics = finetune(model, task, splits["train"], splits["val"], processor, epochs=setting["epochs"],
                                  lr=setting["lr"], batch_size=setting["batch"], warmup_steps=10, progress=False,
                                  log=lambda m: log(f"  [{task_name} dense] {m}"))
    train_s = time.perf_counter() - start
    metric, bar = BAR[task_name]
    log(f"{task_name}: dense {model.__class__.__name__} trained in {train_s:.0f}s, val {metric} "
        f"{val_metrics[metric]:.1f} (bar {bar})")
    rows, dense = [], None
    for ratio in RATIOS:
        config = upop.UPopConfig(ratio=ratio, search_epochs=setting["search"], retrain_epochs=setting["retrain"],
                                 batch_size=setting["batch"], lr=setting["lr"] / 4, retrain_lr=setting["lr"] / 2,
                                 eval_batch_size=64, augment="none",
                                 score="gradient", distill="none")  # the paper's score, no distillation, as these results were made
        start = time.perf_counter()
        result = upop.compress(copy.deepcopy(model), task, train=splits["train"], val=splits["val"],
                               test=splits["test"], processor=processor, config=config,
                               out_dir=work / f"run-{task_name}-{ratio}", progress=False, log=lambda m: None, overwrite=True)
        seconds = time.perf_counter() - start
        report = result.report
        if dense is None:
            dense = {"ratio": 0.0, "achieved_ratio": 0.0, **report_cells(report["dense"]), "seconds": round(train_s, 1)}
        rows.append({"ratio": ratio, "achieved_ratio": round(report["achieved_ratio"], 4),
                     **report_cells(report["compressed"]), "seconds": round(seconds, 1)})
        log(f"  ratio {ratio}: {metric} {report['compressed']['metrics'][metric]:.1f} "
            f"(dense {report['dense']['metrics'][metric]:.1f}), params {report['compressed']['params']:,}, {seconds:.0f}s")
    return {"model_class": type(model).__name__, "family": family, "main_metric": metric, "bar": bar,
            "dense_val": val_metrics, "dense_better_than_bar": val_metrics[metric] >= bar, "rows": [dense, *rows]}


def markdown(results: dict) -> str:
    lines = [f"## Vision ratios ({results['setting']})", "", f"Total time {results['seconds']:.0f} s.", ""]
    for task_name, res in results["tasks"].items():
        metric = res["main_metric"]
        others = [k for k in res["rows"][0]["metrics"] if k != metric]
        lines += [f"### {task_name}: {res['model_class']}", "",
                  f"Dense validation {metric}: {res['dense_val'][metric]:.1f} (bar {res['bar']}); "
                  "metrics on the test split; latency: batch 1, paired with the dense model.", "",
                  f"| target ratio | removed (prunable params) | {metric} | " + " | ".join(others)
                  + " | params | FLOPs | latency ms | time s |",
                  "|---|---|---|" + "---|" * len(others) + "---|---|---|---|"]
        for r in res["rows"]:
            name = "dense" if r["ratio"] == 0 else f"{r['ratio']:.1f}"
            lines.append(f"| {name} | {r['achieved_ratio']:.1%} | {r['metrics'][metric]:.1f} | "
                         + " | ".join(f"{r['metrics'][k]:.1f}" for k in others)
                         + f" | {r['params']:,} | {r['flops']:,} | {r['latency_ms']:.2f} | {r['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = task_bench_args(__doc__.splitlines()[0], TASKS, "tiny models and data (< 2 minutes)", argv)
    setting_name = "quick" if args.quick else "full"
    setting = SETTINGS[setting_name]
    torch.manual_seed(0)
    start = time.perf_counter()
    results = {"setting": setting_name, "settings": setting, "ratios": list(RATIOS), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="upop-vision-") as tmp:
        work = Path(args.work or tmp)
        for task_name in args.tasks:
            results["tasks"][task_name] = run_task(task_name, setting, work, print)
    results["seconds"] = round(time.perf_counter() - start, 1)
    payload = {**{k: v for k, v in results.items() if k != "tasks"},
               "rows": [{"task": name, **res} for name, res in results["tasks"].items()]}
    js, _ = write_results("vision_ratios" + ("-quick" if args.quick else ""), payload, markdown(results))
    print(f"wrote {js} and .md in {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
