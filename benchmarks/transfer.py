"""Transfer: compressing a pretrained CLIP on a small task set, where pretrained knowledge is at stake.

A CLIP pretrained on a large, varied Shapes corpus is compressed on a SMALL task set that lacks
some attribute combinations, and evaluated on a test set where every image has one of them: a
method that keeps what pretraining learnt keeps retrieving the held-out combinations; one that
overfits the task set (or cuts what it does not exercise) loses them.

Protocol (fixed before any two methods were compared; ``--quick`` shrinks every number):

- Data (benchmarks/_transfer_data.py, Shapes scenes of the unchanged generator, 48 x 48 px):
  pretraining corpus 20,000 images (2 captions each) + 300 validation images, unfiltered; task
  set 1,000 training images (2 captions each) + 200 validation images with NO object of a
  held-out (colour, kind) pair; held-out test set 500 images, EVERY one with at least one held-out
  object, and 5 captions each that all name a held-out pair; "seen" test set 500 images drawn like
  the task set (5 captions of any family). Held-out pairs:
  red circle, green square, blue triangle, yellow star, purple diamond, orange cross (one per
  colour and per kind: each colour and kind still appears in the task set in 5 other pairings).
- Model: CLIP, both towers 4 layers of width 64, 4 heads of 16, MLP 256 (4x, as CLIP), patch 8
  (36 patches), projection 64, Shapes tokenizer: 0.43 M parameters. Larger than upop's "small"
  (MLP 192) so that at 8x an MLP keeps about 32 neurons on average and the search has a choice;
  wider models cost more than the CPU budget allows (width 128: 3x the step time).
- Pretraining (cached): 8 epochs of the corpus' 40,000 pairs, batch 64 (5,000 steps), AdamW
  lr 1e-3, weight decay 0.05, 200 warm-up steps then cosine, best validation epoch kept.
- Every compression (rows below) starts from the pretrained model and trains on the task set for
  the same 4 epochs (31 steps of batch 64 each): UPop 2 search epochs (lr 1e-4) + 2 retraining
  epochs (cosine from 5e-4, best validation epoch kept); baselines retrain for all 4 epochs
  (cosine from 5e-4). No augmentation, no weight decay, latency not compared.
- Rows: upop (default) = UPopConfig's defaults when the script runs; upop with score = gradient /
  taylor / fisher, granularity = head-dim / head / both, distill = logits / logits+hidden (each
  row changes one field from the PAPER's search: score=gradient, distill=none; until upop's
  default score became taylor, after these rows were run with 3 seeds, that was the default;
  rows whose field the installed upop lacks are skipped with a note, rows with the same settings
  as another are not re-run); "combined" (score=taylor with distill=logits+hidden: the best single
  changes together, a row ADDED after the single-change rows at 8x had been seen); "weight" (score=taylor
  with each distillation mode weighted 4 and 16 times the task loss: rows ADDED after all the others
  had been seen, see DISTILL_WEIGHTS); one-shot and
  uniform (with the paper's score); magnitude; random + retraining; Torch-Pruning global Taylor
  (when installed). The retraining baselines use the default row's distillation setting
  (benchmarks/_baselines.py). References: the pretrained
  model (zero-shot), it fine-tuned densely on the task set for the same 4 epochs, and the same
  CLIP trained from scratch on the task set only (30 epochs, lr 1e-3, 50 warm-up steps).
- Ratios 2x, 4x, 8x (0.5, 0.75, 0.875 of the prunable parameters); seeds 0-4 (0, 1, 2 until the
  results were extended to 5 seeds, for every row); cells are mean
  +- std over seeds of the held-out test's R@mean (mean of R@1/5/10 both ways), also text R@1,
  image R@1 and the seen test's R@mean. A winner "beats every other row by > 2 std" when its
  mean exceeds every other row's by more than twice the larger of the two standard deviations.

    python benchmarks/transfer.py              # full: pretraining ~20 min (cached), then ~3 h at 5 seeds (1 thread)
    python benchmarks/transfer.py --quick      # tiny, a smoke test
    python benchmarks/transfer.py --resume     # after an interruption: reuse the rows already done
    python benchmarks/transfer.py --cost       # distillation's cost: CLIP ViT-B/16, batch 8, CPU

``--cost``: one search step and one retraining step (the model pruned 2x) with distillation vs
without, the same model and batch (CLIP ViT-B/16 from its config, random weights). Time: the
modes alternate in one process, median over steps after a warm-up; memory: each mode in its own
fresh process (peak RSS, the allocator set as benchmarks/overhead.py does). Target <= 1.4x time,
<= 1.3x memory. About 12 minutes at the default 1 thread (benchmarks/_transfer_cost.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablations  # noqa: E402
from _baselines import distill_setting, retrain, table, winner_lines, winners  # noqa: E402
from _common import write_results  # noqa: E402
from _transfer_data import HELD_OUT, build_data, digest  # noqa: E402

import upop  # noqa: E402
import upop.models.folders  # noqa: E402
from upop.api import compress  # noqa: E402
from upop.errors import ConfigError  # noqa: E402
from upop.tasks import get_task  # noqa: E402
from upop.engine.run import finetune, steps_per_epoch  # noqa: E402

FULL = dict(
    data=dict(pretrain=20000, pretrain_val=300, task=1000, task_val=200, test=500, seen=500, image_size=48, seed=0),
    model=dict(hidden=64, layers=4, heads=4, intermediate=256, patch=8),
    pretrain=dict(epochs=8, lr=1e-3, batch=64, warmup=200, weight_decay=0.05, seed=0),
    train=dict(search_epochs=2, retrain_epochs=2, batch=64, lr=1e-4, retrain_lr=5e-4),
    scratch=dict(epochs=30, lr=1e-3, warmup=50, weight_decay=0.05),
    ratios=[0.5, 0.75, 0.875], seeds=[0, 1, 2, 3, 4])
QUICK = dict(
    data=dict(pretrain=120, pretrain_val=12, task=40, task_val=12, test=16, seen=12, image_size=32, seed=0),
    model=dict(hidden=32, layers=2, heads=4, intermediate=64, patch=8),
    pretrain=dict(epochs=2, lr=1e-3, batch=32, warmup=4, weight_decay=0.05, seed=0),
    train=dict(search_epochs=1, retrain_epochs=1, batch=16, lr=1e-4, retrain_lr=5e-4),
    scratch=dict(epochs=2, lr=1e-3, warmup=2, weight_decay=0.05),
    ratios=[0.5], seeds=[0])

#: method ids (``--methods``) -> the rows they add; "dense" and "scratch" are reference rows
VARIANTS = {"score": ("gradient", "taylor", "fisher"), "granularity": ("head-dim", "head", "both"),
            "distill": ("logits", "logits+hidden")}
#: "combined": the best score and the best distillation of the single-change rows together (a row
#: added after those rows had been seen, and labelled so in the results)
COMBINED = {"score": "taylor", "distill": "logits+hidden", "distill_weight": 1.0}
#: "weight": the distillation term weighted DISTILL_WEIGHTS times the task loss, with the Taylor score
#: and each distillation mode (rows added after every row above had been seen, at 5 seeds; motivated
#: by a reference row: the dense model fine-tuned on the task set falls below its zero-shot score on
#: the held-out test, so fitting the task set's labels costs what pretraining learnt, and the
#: teacher's outputs carry it; the weights were fixed before any of these rows ran)
DISTILL_WEIGHTS = (4.0, 16.0)
#: what the single-change rows change one field of: the paper's search (signed mask gradient, no
#: distillation), so a row means the same whatever upop's defaults are ("upop (default)" is its own row)
PAPER = {"score": "gradient", "distill": "none"}
#: the distillation weight of the "distill" and "combined" rows (upop's default until the "weight"
#: rows made it 4): pinned so that those rows mean what they meant when they ran
FIRST_WEIGHT = {"distill_weight": 1.0}
METHOD_IDS = ("upop", "score", "granularity", "distill", "combined", "weight", "one-shot", "uniform", "magnitude", "random",
              "torch-pruning", "dense", "scratch")
QUICK_METHODS = ("upop", "distill", "magnitude", "dense")
METRICS = (("r_mean", "held-out test R@mean"), ("txt_r1", "held-out test text R@1"),
           ("img_r1", "held-out test image R@1"), ("r_mean_seen", "seen test R@mean"))
PEER = ablations.PEER_LABELS["taylor"]


def clip_model(vocab: int, image_size: int, hidden: int, layers: int, heads: int, intermediate: int, patch: int,
               seed: int = 0):
    """A randomly initialised CLIP of these widths (both towers alike), as upop.models.folders builds them."""
    import transformers

    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         **common),
        vision_config=dict(image_size=image_size, patch_size=patch, **common), projection_dim=hidden)
    torch.manual_seed(seed)
    return transformers.CLIPModel(cfg)


def evaluate(task, model, splits, processor) -> dict:
    """Held-out test R@mean / text R@1 / image R@1, and the seen test's R@mean (rounded)."""
    held = task.evaluate(model, splits["test"], processor)
    seen = task.evaluate(model, splits["seen"], processor)
    return {"r_mean": round(held["r_mean"], 2), "txt_r1": round(held["txt_r1"], 2), "img_r1": round(held["img_r1"], 2),
            "r_mean_seen": round(seen["r_mean"], 2)}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the data-loading worker), in seconds."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def pretrained(cache: Path, data: dict, proto: dict, task) -> tuple[Path, dict]:
    """The pretrained CLIP folder (trained here once, cached by digest) and its training record."""
    key = digest({"data": data["pretrain_digest"], "model": proto["model"], "pretrain": proto["pretrain"]})
    folder = cache / f"clip-{key}"
    record = folder / "training.json"
    if record.is_file():
        return folder, json.loads(record.read_text())
    pre = proto["pretrain"]
    processor = upop.models.folders.make_processor("clip", data["settings"]["image_size"])
    model = clip_model(len(processor.tokenizer), data["settings"]["image_size"], seed=pre["seed"], **proto["model"])
    splits = task.load_splits(data["pretrain"], ("train", "val"))
    print(f"pretraining a {upop.count_params(model):,}-parameter CLIP on {len(splits['train'].items):,} images "
          f"({pre['epochs']} epochs of {len(splits['train']):,} pairs) -> {folder}", flush=True)
    start, cpu = time.time(), _cpu_seconds()
    model, val = finetune(model, task, splits["train"], splits["val"], processor, epochs=pre["epochs"], lr=pre["lr"],
                          batch_size=pre["batch"], seed=pre["seed"], weight_decay=pre["weight_decay"],
                          warmup_steps=pre["warmup"], progress=False, workers=1, log=lambda m: print("  " + m, flush=True))
    seconds, cpu = time.time() - start, _cpu_seconds() - cpu
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    info = {"settings": pre, "model": proto["model"], "data": data["pretrain_digest"], "params": upop.count_params(model),
            "val": {k: round(v, 2) for k, v in val.items()}, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
    record.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return folder, info


def method_rows(methods, base: dict) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """``[(label, kind, config overrides)]`` for the chosen method ids, and notes on skipped rows.
    kind: "upop" (a compress run), "baseline" or "reference"."""
    fields = {f.name for f in dataclasses.fields(upop.UPopConfig)}
    rows, notes = [], []
    for mid in methods:
        if mid == "upop":
            rows.append(("upop (default)", "upop", {}))
        elif mid in VARIANTS:
            if mid not in fields:
                notes.append(f"{mid} rows skipped: this upop's UPopConfig has no {mid!r} field")
                continue
            for value in VARIANTS[mid]:
                try:
                    upop.UPopConfig(**base, **{**PAPER, mid: value})
                except ConfigError as exc:
                    notes.append(f"upop, {mid}={value} skipped: {exc}")
                    continue
                over = {**PAPER, mid: value, **(FIRST_WEIGHT if mid == "distill" else {})}
                rows.append((f"upop, {mid}={value}", "upop", over))
        elif mid == "combined":
            rows.append(("upop, " + ", ".join(f"{k}={v}" for k, v in COMBINED.items() if k in ("score", "distill")),
                         "upop", dict(COMBINED)))
        elif mid == "weight":
            for mode in VARIANTS["distill"]:
                for weight in DISTILL_WEIGHTS:
                    over = {"score": "taylor", "distill": mode, "distill_weight": weight}
                    rows.append(("upop, " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in over.items()), "upop", over))
        elif mid in ("one-shot", "uniform"):
            rows.append((mid, "upop", {**PAPER, **ablations.METHODS[mid]}))
        elif mid == "magnitude":
            rows.append(("magnitude", "baseline", {}))
        elif mid == "random":
            rows.append(("random + retraining", "baseline", {}))
        elif mid == "torch-pruning":
            if ablations.torch_pruning_version() is None:
                notes.append(ablations.PEER_SKIPPED)
            else:
                rows.append((PEER, "baseline", {}))
        elif mid == "dense":
            rows += [("dense (pretrained, zero-shot)", "reference", {}), ("dense fine-tuned", "reference", {})]
        else:
            rows.append(("task set only (from scratch)", "reference", {}))
    return rows, notes


class Bench:
    """What every row shares: the task, the pretrained model, the task-set splits and settings."""

    def __init__(self, proto: dict, cache: Path):
        self.proto, self.tr = proto, proto["train"]
        self.task = get_task("retrieval").configure(upop.UPopConfig(augment="none"))
        import fcntl

        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / "build.lock", "w") as lock:  # runs sharing the cache (run_all) build it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = build_data(cache, **proto["data"])
            self.folder, self.info = pretrained(cache, self.data, proto, self.task)
        self.dense, self.processor = upop.load_model(self.folder)
        self.splits = self.task.load_splits(self.data["task"], ("train", "val", "test", "seen"))
        self.epochs = self.tr["search_epochs"] + self.tr["retrain_epochs"]
        self.spe = steps_per_epoch(len(self.splits["train"]), self.tr["batch"])
        self.steps = self.epochs * self.spe
        self.base = dict(search_epochs=self.tr["search_epochs"], retrain_epochs=self.tr["retrain_epochs"],
                         batch_size=self.tr["batch"], lr=self.tr["lr"], retrain_lr=self.tr["retrain_lr"],
                         augment="none", latency_time=0.01)
        self.default = upop.UPopConfig(ratio=0.5, **self.base)
        self.distill = distill_setting(self.default)

    def evaluate(self, model) -> dict:
        return evaluate(self.task, model, self.splits, self.processor)

    def _retrain(self, model, seed: int, distill: dict | None):
        teacher = None
        if distill:
            from upop.distill.distiller import make_teacher

            teacher = make_teacher(self.dense)
        return retrain(model, self.task, self.splits["train"], self.splits["val"], self.processor, epochs=self.epochs,
                       lr=self.tr["retrain_lr"], batch_size=self.tr["batch"], seed=seed, teacher=teacher, distill=distill)

    def reference(self, label: str, seed: int) -> dict:
        if label.startswith("dense (pretrained"):
            return {**self.info["zero_shot"], "steps": 0}
        if label == "dense fine-tuned":  # no distillation: the teacher would be the model itself
            return {**self.evaluate(self._retrain(copy.deepcopy(self.dense), seed, None)), "steps": self.steps}
        sc = self.proto["scratch"]
        model = clip_model(len(self.processor.tokenizer), self.proto["data"]["image_size"], seed=seed,
                           **self.proto["model"])
        model, _ = finetune(model, self.task, self.splits["train"], self.splits["val"], self.processor,
                            epochs=sc["epochs"], lr=sc["lr"], batch_size=self.tr["batch"], seed=seed,
                            weight_decay=sc["weight_decay"], warmup_steps=sc["warmup"], progress=False,
                            log=lambda m: None)
        return {**self.evaluate(model), "steps": sc["epochs"] * self.spe}

    def compressed(self, cfg) -> dict:
        with tempfile.TemporaryDirectory() as out:
            result = compress(copy.deepcopy(self.dense), self.task, train=self.splits["train"], val=self.splits["val"],
                              test=self.splits["test"], processor=self.processor, config=cfg,
                              out_dir=Path(out) / "run", progress=False, log=lambda m: None)
        return {**self.evaluate(result.model), "steps": self.steps,
                "achieved": round(result.report["achieved_ratio"], 4)}

    def baseline(self, label: str, ratio: float, seed: int) -> dict:
        model, extra = copy.deepcopy(self.dense), {}
        if label in ("magnitude", "random + retraining"):
            g = torch.Generator().manual_seed(1000 + seed)
            score = ablations.unit_norms if label == "magnitude" else \
                (lambda m, grp: torch.rand(grp.num_units, generator=g))
            extra["achieved"] = round(ablations.prune_by(model, ratio, score).achieved_ratio["params"], 4)
        else:
            torch.manual_seed(seed)
            train = self.splits["train"]
            model, peer = ablations.torch_pruning_prune(
                self.dense, ratio, self.task.example_inputs(self.dense, self.processor, train, 2),
                ablations.task_gradients(self.task, self.processor, train, self.tr["batch"], seed))
            extra = {"achieved": round(peer.pop("achieved"), 4), "torch_pruning": peer}
        return {**self.evaluate(self._retrain(model, seed, self.distill)), "steps": self.steps, **extra}


def run(proto: dict, methods, cache: Path, resume: bool = False, name: str = "transfer") -> dict:
    """Every row at every ratio and seed; returns the results payload. Each finished row is also
    appended to ``cache/rows-<name>-<digest>.jsonl`` (one log per results name, so runs of several
    names can share the cache at once); ``resume`` reuses the rows found there."""
    bench = Bench(proto, cache)
    rows_spec, notes = method_rows(methods, bench.base)
    for note in notes:
        print(f"note: {note}", flush=True)
    info = bench.info
    info["zero_shot"] = bench.evaluate(bench.dense)
    print(f"pretrained CLIP ({info['seconds'] / 60:.1f} min, {info.get('cpu_seconds', 0) / 60:.1f} CPU min): "
          f"zero-shot {info['zero_shot']}", flush=True)
    setup = {k: v for k, v in proto.items() if k not in ("ratios", "seeds")}
    log = cache / f"rows-{name}-{digest({'protocol': setup, 'model': bench.folder.name})}.jsonl"
    saved = {}
    if resume and log.is_file():
        saved = {(r["method"], r["ratio"], r["seed"]): r for r in map(json.loads, log.read_text().splitlines())}
    elif log.is_file():
        log.unlink()
    rows: list[dict] = []
    unsupported: set[tuple[str, float]] = set()

    def add(label: str, ratio: float, seed: int, compute) -> dict:
        row = saved.get((label, ratio, seed))
        if row is None:
            start = time.time()
            row = {"method": label, "ratio": ratio, "seed": seed, **compute()}
            row["seconds"] = round(time.time() - start, 1)
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        rows.append(row)
        print(("reused " if (label, ratio, seed) in saved else "") + json.dumps(row), flush=True)
        return row

    for label, kind, _ in rows_spec:
        for seed in proto["seeds"] if kind == "reference" else []:
            add(label, 0.0, seed, lambda: bench.reference(label, seed))
    for ratio in proto["ratios"]:
        for seed in proto["seeds"]:
            done: dict[str, dict] = {}  # config JSON -> the row that ran it
            for label, kind, over in rows_spec:
                if kind == "baseline":
                    add(label, ratio, seed, lambda: bench.baseline(label, ratio, seed))
                elif kind == "upop":
                    cfg = upop.UPopConfig(ratio=ratio, seed=seed, **bench.base, **over)
                    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
                    twin = done.get(key)
                    if twin is not None:  # e.g. score=gradient when that is the default: the same run
                        add(label, ratio, seed, lambda: {**{k: v for k, v in twin.items() if k not in
                                                            ("method", "ratio", "seed")}, "same_as": twin["method"]})
                    elif (label, ratio) not in unsupported:
                        try:
                            done[key] = add(label, ratio, seed, lambda: bench.compressed(cfg))
                        except ConfigError as exc:  # a setting (or ratio) the config accepts but a run refuses
                            unsupported.add((label, ratio))
                            notes.append(f"{label} at ratio {ratio} skipped: {str(exc).split('; the run is saved')[0]}")
                            print(f"note: {notes[-1]}", flush=True)
    return {"rows": rows, "notes": notes, "steps": bench.steps, "pretrained": info, "data": bench.data["settings"],
            "data_digest": bench.data["digest"], "default_config": bench.default.to_dict(),
            "baseline_distill": bench.distill, "protocol": proto, "held_out": [list(p) for p in HELD_OUT],
            "torch_pruning": ablations.torch_pruning_version()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, model and steps, 1 seed, 1 ratio, few rows")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="default 0.5 0.75 0.875")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4")
    parser.add_argument("--methods", nargs="+", choices=METHOD_IDS, default=None, help="default: all")
    parser.add_argument("--cache", default="~/.cache/upop-bench/transfer", help="data and pretrained model cache")
    parser.add_argument("--name", default="transfer", help="results file name (results/NAME.json|md)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rows an interrupted run of the same protocol logged in the cache")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--cost", action="store_true", help="measure distillation's step time and peak memory")
    parser.add_argument("--steps", type=int, default=4, help="--cost: timed steps per mode")
    parser.add_argument("--cost-child", nargs=2, metavar=("PHASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cost_child or args.cost:
        from _transfer_cost import cost, cost_child

        return cost_child(*args.cost_child, args.quick) if args.cost_child else cost(args.quick, args.steps)
    proto = copy.deepcopy(QUICK if args.quick else FULL)
    proto["ratios"] = args.ratios or proto["ratios"]
    proto["seeds"] = args.seeds if args.seeds is not None else proto["seeds"]
    for r in proto["ratios"]:
        if not 0 < r < 1:
            raise SystemExit(f"--ratios: {r} is not allowed (need numbers in (0, 1), e.g. 0.5 for 2x)")
    methods = args.methods or (QUICK_METHODS if args.quick else METHOD_IDS)
    payload = run(proto, methods, Path(args.cache).expanduser(), args.resume, args.name)
    found = winners([r for r in payload["rows"] if r["ratio"] > 0], proto["ratios"])
    payload["winners"] = found
    pre = payload["pretrained"]
    md = ["## Transfer: compressing a pretrained CLIP on a task set without some attribute pairs", "",
          f"Pretrained on {proto['data']['pretrain']:,} Shapes images ({pre['params']:,} parameters, "
          f"{pre['seconds'] / 60:.0f} min); compressed on {proto['data']['task']:,} images without the held-out "
          f"(colour, kind) pairs; tested on {proto['data']['test']} images that each hold one. Every compression "
          f"trains {payload['steps']} steps on the task set; mean ± std over seeds {proto['seeds']}. "
          "Protocol: benchmarks/transfer.py.", "",
          "\"upop (default)\" is upop's defaults when the run was made (score=" + payload["default_config"]["score"]
          + ", distill=" + payload["default_config"]["distill"] + "); each \"upop, field=value\" row changes one "
          "field of the paper's search (score=gradient, distill=none).", ""]
    for metric, title in METRICS:
        md += [f"### {title}", "", table(payload["rows"], metric, proto["ratios"]), ""]
    md += ["Winner per ratio (held-out R@mean):", *winner_lines(found)]
    md += [f"\nNote: {n}." for n in payload["notes"]]
    text = "\n".join(md)
    print(text)
    write_results(args.name + ("-quick" if args.quick else ""), {**payload, "quick": args.quick}, text)


if __name__ == "__main__":
    main()
