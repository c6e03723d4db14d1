"""Quality with the paper's ablations, on Shapes retrieval (CLIP) and Shapes classification (ViT),
at p = 0.5 and 0.75, over seeds, with the same total training steps for every method:

- upop        unified + progressive (the default);
- one-shot    same search, masks cut to 0 at once at the end of the search;
- uniform     the same ratio in every layer (ranked within it): the non-unified ablation;
- magnitude   per-layer L2 norm of each unit's weights, pruned at once, then retrained for the
              search + retrain steps;
- random, no retraining (4x): how much a careless cut loses (the benchmark must discriminate).

    python benchmarks/ablations.py            # full: 3 seeds, both tasks (about an hour on 2 cores)
    python benchmarks/ablations.py --tasks retrieval --name ablations-retrieval   # one task
    python benchmarks/ablations.py --quick    # tiny, 1 seed, CI-sized
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import upop  # noqa: E402
from upop.api import compress  # noqa: E402
from upop.tasks import TASKS, get_task  # noqa: E402
from upop.train import finetune  # noqa: E402

METHODS = {
    "upop": dict(method="upop", allocation="unified"),
    "one-shot": dict(method="one-shot", allocation="unified"),
    "uniform": dict(method="upop", allocation="uniform"),
}


def unit_norms(model, group) -> torch.Tensor:
    """L2 norm of each unit's weights: its producer rows (and biases) and consumer columns."""
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for name in group.producers:
        lin = model.get_submodule(name)
        rows = lin.weight.detach().double().pow(2).sum(1)
        if lin.bias is not None:
            rows = rows + lin.bias.detach().double().pow(2)
        total += rows.reshape(-1, group.num_units).sum(0)
    cols = model.get_submodule(group.consumer).weight.detach().double().pow(2).sum(0)
    total += cols.reshape(-1, group.num_units).sum(0)
    return total.sqrt()


@torch.no_grad()
def prune_by(model, ratio: float, score_fn) -> upop.PruningPlan:
    """Prune ``ratio`` of every group's units, lowest ``score_fn`` first (one unit kept)."""
    masks = upop.attach_masks(model)
    for g in masks.groups:
        order = torch.argsort(score_fn(model, g))[: min(g.num_units - 1, round(ratio * g.num_units))]
        masks[g.name][order] = 0.0
    return upop.prune(model, masks)


def setup(task_name: str, quick: bool, work: Path):
    """Dense model, processor and splits for a task (trained here when no shipped model exists)."""
    task = get_task(task_name)
    if task_name == "retrieval":
        from upop.data.shapes import write_retrieval
        from upop.demo import DEMO_DATA, demo_model_path

        data = dict(DEMO_DATA) if not quick else dict(train=96, val=16, test=32, image_size=32, seed=0)
        write_retrieval(work / "retrieval", **data)
        if quick:
            upop.models.make_model_folder("clip", work / "clip", size="tiny", image_size=32)
            model, processor = upop.load_model(work / "clip")
        else:
            model, processor = upop.load_model(demo_model_path())
        splits = task.load_splits(work / "retrieval")
        if quick:
            model, _ = finetune(model, task, splits["train"], splits["val"], processor, epochs=2, lr=1e-3, batch_size=16,
                                progress=False, log=lambda m: None)
        return task, model, processor, splits, work / "retrieval"
    from upop.data import shapes_writer

    counts = dict(train=2000, val=200, test=400, image_size=32, seed=0) if not quick else \
        dict(train=96, val=16, test=32, image_size=32, seed=0)
    shapes_writer("classification")(work / "classification", **counts)
    splits = task.load_splits(work / "classification")
    num_labels = len(splits["train"].classes)
    model = upop.models.make_model("vit", size="small" if not quick else "tiny", image_size=32, num_labels=num_labels)
    processor = upop.models.make_processor("vit", 32)
    model, _ = finetune(model, task, splits["train"], splits["val"], processor, epochs=30 if not quick else 2,
                        lr=1e-3, batch_size=64 if not quick else 16, progress=False, log=lambda m: None, warmup_steps=50)
    return task, model, processor, splits, work / "classification"


def run_task(task_name: str, quick: bool, seeds: list[int], ratios: list[float], work: Path) -> list[dict]:
    import copy

    task, dense, processor, splits, data = setup(task_name, quick, work)
    metric = task.main_metric
    rows = [{"task": task_name, "method": "dense", "ratio": 0.0, "seed": 0,
             "metric": task.evaluate(dense, splits["test"], processor)[metric]}]
    epochs = (1, 1) if quick else (1, 2)
    batch = 16 if quick else 64
    lr = {"retrieval": (1e-4, 5e-4), "classification": (1e-4, 5e-4)}[task_name]
    for ratio in ratios:
        for seed in seeds:
            for method, settings in METHODS.items():
                cfg = upop.UPopConfig(ratio=ratio, search_epochs=epochs[0], retrain_epochs=epochs[1], batch_size=batch,
                                      lr=lr[0], retrain_lr=lr[1], seed=seed, latency_time=0.05, **settings)
                with tempfile.TemporaryDirectory() as out:
                    result = compress(copy.deepcopy(dense), task, train=splits["train"], val=splits["val"],
                                      test=splits["test"], processor=processor, config=cfg, out_dir=Path(out) / "run",
                                      progress=False, log=lambda m: None)
                rows.append({"task": task_name, "method": method, "ratio": ratio, "seed": seed,
                             "metric": result.report["compressed"]["metrics"][metric],
                             "achieved": result.report["achieved_ratio"]})
                print(rows[-1], flush=True)
            model = copy.deepcopy(dense)
            prune_by(model, ratio, unit_norms)
            torch.manual_seed(seed)
            model, _ = finetune(model, task, splits["train"], splits["val"], processor, epochs=sum(epochs),
                                lr=lr[1], batch_size=batch, seed=seed, weight_decay=0.0, progress=False, log=lambda m: None)
            rows.append({"task": task_name, "method": "magnitude", "ratio": ratio, "seed": seed,
                         "metric": task.evaluate(model, splits["test"], processor)[metric]})
            print(rows[-1], flush=True)
    for seed in seeds:
        model = copy.deepcopy(dense)
        g = torch.Generator().manual_seed(seed)
        prune_by(model, 0.75, lambda m, grp: torch.rand(grp.num_units, generator=g))
        rows.append({"task": task_name, "method": "random, no retraining", "ratio": 0.75, "seed": seed,
                     "metric": task.evaluate(model, splits["test"], processor)[metric]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| task | method | ratio | test metric (mean ± std over seeds) | seeds |", "|---|---|---:|---:|---:|"]
    keys = []
    for r in rows:
        key = (r["task"], r["method"], r["ratio"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        values = [r["metric"] for r in rows if (r["task"], r["method"], r["ratio"]) == key]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(f"| {key[0]} | {key[1]} | {key[2]:.2f} | {statistics.mean(values):.2f} ± {spread:.2f} | {len(values)} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="+", default=["retrieval", "classification"])
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--name", default="ablations", help="results file name (results/NAME.json|md)")
    args = parser.parse_args()
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    ratios = [0.5] if args.quick else [0.5, 0.75]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for task_name in args.tasks:
            if task_name not in TASKS:
                print(f"skipping {task_name}: no such task in this version")
                continue
            rows += run_task(task_name, args.quick, seeds, ratios, Path(work))
    text = table(rows)
    print(text)
    metric_names = {"retrieval": "R-mean (%)", "classification": "top-1 (%)"}
    note = ("\n\nMetrics: " + ", ".join(f"{t}: {m}" for t, m in metric_names.items() if t in args.tasks) +
            ". Every method trains for the same number of steps (search + retrain, or retrain only).")
    write_results(args.name + ("-quick" if args.quick else ""), {"rows": rows, "quick": args.quick},
                  "## Quality with the paper's ablations\n\n" + text + note)


if __name__ == "__main__":
    main()
