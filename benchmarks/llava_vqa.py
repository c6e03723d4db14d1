"""Tiny LLaVA on Shapes VQA at 2x: UPop's unified search over the vision tower and the LLM, against
pruning the LLM only (NVIDIA ModelOpt's choice for a VLM) and the uniform allocation (issue #29).

    python benchmarks/llava_vqa.py --threads 2    # about 20 minutes on 2 cores
    python benchmarks/llava_vqa.py --quick        # a smoke test (< 3 minutes)

Protocol (fixed before any row ran): a tiny LLaVA (``upop make-model llava --size tiny``: a CLIP vision
tower and a Llama, 32 px images) is fine-tuned densely on Shapes VQA in the chat format (``upop data
shapes --task vqa``) with ``upop.engine.loop.finetune`` until its validation vqa_acc is clearly above
the untrained model's (both printed and recorded). Copies of it are then compressed at ``ratio=0.5``
with the same search and retraining steps three ways, each with seeds 0, 1, 2:

- ``unified``: upop's default, one search over the vision tower's and the LLM's groups;
- ``text only``: ``modalities="text"``, the LLM's groups only (the vision tower stays dense);
- ``uniform``: ``allocation="uniform"``, the same ratio in every group of both towers.

The budgets differ: ``ratio=0.5`` is half of the SEARCHED groups' parameters, so ``text only`` removes
half of the LLM's prunable parameters and none of the vision tower's, while the other two remove half
of both towers' together. The table therefore gives the whole model's parameters and FLOPs and the
share of all prunable parameters (both towers) each run removed, next to its quality.

Per run: the test vqa_acc (greedy generation, the official VQA accuracy), the whole model's
parameters and FLOPs (the run's report), the report's paired forward latency (batch 1 on the CPU), and
the latency of ``generate``: greedy decoding of a fixed batch of test prompts with exactly
``max_new_tokens`` new tokens (``min_new_tokens`` equal, so both models decode as many steps), dense
and compressed timed in interleaved rounds in this process (:func:`upop.measure.latency.paired_latency`
with a generate timer). Results: ``benchmarks/results/llava_vqa{,-quick}.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import upop
from upop.arch import find_groups
from upop.data.shapes_vl import write_vqa
from upop.engine.loop import finetune
from upop.measure.latency import forward_ms, paired_latency
from upop.models.folders import make_model, make_processor
from upop.pruning.prune import removed_cost
from upop.tasks import get_task
from upop.tasks.vlm_chat import ChatVQACollator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

RATIO = 0.5
#: the three ways compared: name -> the UPopConfig settings that make it
METHODS = {
    "unified": {},
    "text only": {"modalities": "text"},
    "uniform": {"allocation": "uniform"},
}
SETTINGS = {
    # images per split (3 questions each), dense epochs and lr, search / retrain epochs, batch, seeds,
    # generate timing: prompts, new tokens, seconds per model
    "quick": dict(size="tiny", image_size=32, data=(40, 10, 10), epochs=2, lr=2e-3, search=1, retrain=1, batch=16,
                  seeds=(0,), prompts=4, new_tokens=4, seconds=0.05),
    "full": dict(size="tiny", image_size=32, data=(300, 50, 100), epochs=10, lr=2e-3, search=1, retrain=2, batch=16,
                 seeds=(0, 1, 2), prompts=8, new_tokens=8, seconds=0.5),
}


def generate_latency(dense, compressed, inputs: dict, new_tokens: int, pad_id: int, seconds: float) -> dict:
    """Paired latency of greedy ``generate`` (exactly ``new_tokens`` new tokens) of both models."""
    def gen(model, batch):
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              num_beams=1, pad_token_id=pad_id)

    timer = lambda model, batch, budget: forward_ms(model, batch, budget, forward=gen)  # noqa: E731
    with torch.no_grad():
        out = paired_latency(dense, compressed, inputs, seconds=seconds, timer=timer, warmup=1)
    return {k: out[k] for k in ("dense_ms", "compressed_ms", "speedup", "noisy", "rounds", "batch", "threads")}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(setting: dict, work: Path, log) -> dict:
    train_n, val_n, test_n = setting["data"]
    image_size = setting["image_size"]
    write_vqa(work / "data", train=train_n, val=val_n, test=test_n, image_size=image_size, seed=0)
    processor = make_processor("llava", image_size)
    model = make_model("llava", size=setting["size"], vocab_size=len(processor.tokenizer), image_size=image_size,
                       seed=0)
    task = get_task("vqa").configure(upop.UPopConfig())
    task.check_model(model)
    splits = task.load_splits(work / "data")
    untrained = task.evaluate(model, splits["val"], processor)["vqa_acc"]
    start = time.perf_counter()
    model, val_metrics = finetune(model, task, splits["train"], splits["val"], processor, epochs=setting["epochs"],
                                  lr=setting["lr"], batch_size=setting["batch"], warmup_steps=10, progress=False,
                                  log=lambda m: log(f"  [dense] {m}"))
    train_s = time.perf_counter() - start
    log(f"dense: val vqa_acc {val_metrics['vqa_acc']:.1f} after {setting['epochs']} epochs ({train_s:.0f}s); "
        f"untrained {untrained:.1f}")
    every = find_groups(model)
    collate = ChatVQACollator(processor)
    prompts = collate.prompts([splits["test"][i] for i in range(setting["prompts"])])
    prompts.pop("index")
    rows, dense = [], None
    for method, extra in METHODS.items():
        for seed in setting["seeds"]:
            config = upop.UPopConfig(ratio=RATIO, search_epochs=setting["search"], retrain_epochs=setting["retrain"],
                                     batch_size=setting["batch"], lr=setting["lr"] / 4, retrain_lr=setting["lr"] / 2,
                                     seed=seed, distill="none", latency_time=setting["seconds"], **extra)
            start = time.perf_counter()
            result = upop.compress(copy.deepcopy(model), task, work / "data", processor=processor, config=config,
                                   out_dir=work / f"run-{method.replace(' ', '-')}-{seed}", overwrite=True,
                                   progress=False, log=lambda m: None)
            seconds = time.perf_counter() - start
            report, plan = result.report, result.plan
            kept = {name: len(g.kept) for name, g in plan.groups.items()}
            removed, total = removed_cost(every, {g.name: kept.get(g.name, g.num_units) for g in every}, "params")
            gen = generate_latency(model, result.model, prompts, setting["new_tokens"], collate.pad_id,
                                   setting["seconds"])
            if dense is None:
                dense = {"params": report["dense"]["params"], "flops": report["dense"]["flops"],
                         "vqa_acc_test": round(report["dense"]["metrics"]["vqa_acc"], 2)}
            row = {"method": method, "seed": seed, "settings": extra,
                   "budget": "text groups' params" if extra.get("modalities") else "vision + text groups' params",
                   "vqa_acc": round(report["compressed"]["metrics"]["vqa_acc"], 2),
                   "achieved_ratio_of_budget": round(report["achieved_ratio"], 4),
                   "removed_of_all_prunable_params": round(removed / total, 4),
                   "params": report["compressed"]["params"], "flops": report["compressed"]["flops"],
                   "forward_speedup": round(report["speedup"], 3),
                   "forward_ms": round(report["compressed"]["latency_ms"], 3),
                   "generate": {k: round(v, 3) if isinstance(v, float) else v for k, v in gen.items()},
                   "kept_share": {m: {k: round(c["kept_fraction"], 3) for k, c in kinds.items()}
                                  for m, kinds in report["allocation"]["by_modality"].items()},
                   "seconds": round(seconds, 1)}
            rows.append(row)
            log(f"  {method} seed {seed}: vqa_acc {row['vqa_acc']:.1f} (dense {dense['vqa_acc_test']:.1f}), params "
                f"{row['params']:,}, removed {row['removed_of_all_prunable_params']:.1%} of all prunable params, "
                f"generate {gen['dense_ms']:.1f} -> {gen['compressed_ms']:.1f} ms, {seconds:.0f}s")
    return {"model_class": type(model).__name__, "untrained_val_vqa_acc": round(untrained, 2),
            "dense_val": {k: round(v, 2) for k, v in val_metrics.items()}, "dense_train_s": round(train_s, 1),
            "dense": dense, "rows": rows}


def summary(res: dict) -> list[dict]:
    """Per method: mean and std over seeds of each number."""
    out = []
    for method in METHODS:
        rows = [r for r in res["rows"] if r["method"] == method]
        cell = {"method": method, "budget": rows[0]["budget"], "seeds": len(rows)}
        for key, get in (("vqa_acc", lambda r: r["vqa_acc"]), ("params", lambda r: r["params"]),
                         ("flops", lambda r: r["flops"]),
                         ("removed_of_all_prunable_params", lambda r: r["removed_of_all_prunable_params"]),
                         ("forward_speedup", lambda r: r["forward_speedup"]),
                         ("generate_dense_ms", lambda r: r["generate"]["dense_ms"]),
                         ("generate_ms", lambda r: r["generate"]["compressed_ms"]),
                         ("generate_speedup", lambda r: r["generate"]["speedup"])):
            cell[key] = _mean_std([get(r) for r in rows])
        out.append(cell)
    return out


def markdown(results: dict) -> str:
    res, s = results["result"], results["settings"]
    d = res["dense"]
    lines = [f"## Tiny LLaVA on Shapes VQA at 2x: unified vs LLM only vs uniform ({results['setting']})", "",
             f"Dense {res['model_class']} fine-tuned {s['epochs']} epochs: validation vqa_acc "
             f"{res['dense_val']['vqa_acc']:.1f} (untrained: {res['untrained_val_vqa_acc']:.1f}); test vqa_acc "
             f"{d['vqa_acc_test']:.1f}, {d['params']:,} params, {d['flops']:,} FLOPs. Each method: ratio {RATIO} of "
             f"its budget, {s['search']} search + {s['retrain']} retraining epochs (the same steps), "
             f"{len(s['seeds'])} seed(s), mean +- std. Removed: share of ALL prunable params (both towers). "
             f"Forward: the report's paired latency (batch 1). Generate: greedy, {s['prompts']} prompts, exactly "
             f"{s['new_tokens']} new tokens, dense and compressed interleaved in one process.", "",
             "| method | budget (ratio of) | test vqa_acc | params | FLOPs | removed | forward speedup | "
             "generate ms (dense -> compressed) | generate speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["summary"]:
        pm = lambda key, fmt: f"{c[key][0]:{fmt}} +- {c[key][1]:{fmt}}"  # noqa: E731
        lines.append(f"| {c['method']} | {c['budget']} | {pm('vqa_acc', '.1f')} | {c['params'][0]:,.0f} | "
                     f"{c['flops'][0]:,.0f} | {c['removed_of_all_prunable_params'][0]:.1%} | "
                     f"{pm('forward_speedup', '.2f')}x | {c['generate_dense_ms'][0]:.1f} -> "
                     f"{pm('generate_ms', '.1f')} | {pm('generate_speedup', '.2f')}x |")
    lines += ["", "Kept share per modality (seed 0):", ""]
    for r in res["rows"]:
        if r["seed"] == res["rows"][0]["seed"]:
            lines.append(f"- {r['method']}: " + "; ".join(
                f"{m} " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()) for m, kinds in r["kept_share"].items()))
    lines.append(f"\nTotal time {results['seconds']:.0f} s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 seed (< 3 minutes)")
    parser.add_argument("--work", default=None, help="folder for data and runs (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads contend and run slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = "quick" if args.quick else "full"
    setting = SETTINGS[name]
    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="upop-llava-") as tmp:
        res = run(setting, Path(args.work or tmp), print)
    results = {"setting": name, "settings": setting, "ratio": RATIO, "result": res}
    results["summary"] = summary(res)
    results["seconds"] = round(time.perf_counter() - start, 1)
    payload = {**{k: v for k, v in results.items() if k != "result"}, **{k: v for k, v in res.items()}}
    js, _ = write_results("llava_vqa" + ("-quick" if args.quick else ""), payload, markdown(results))
    print(markdown(results))
    print(f"wrote {js} and .md in {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
