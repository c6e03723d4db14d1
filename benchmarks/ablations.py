"""Quality with the paper's ablations, on Shapes retrieval (CLIP) and Shapes classification (ViT),
at p = 0.5 and 0.75, over seeds, with the same total training steps for every method:

- upop        unified + progressive, upop's defaults (kept widths rounded, ``round_to="auto"``);
- upop, free widths   the same with ``round_to=1`` (the paper): what rounding costs in quality;
- one-shot    same search, masks cut to 0 at once at the end of the search;
- uniform     the same ratio in every layer (ranked within it): the non-unified ablation;
- magnitude   per-layer L2 norm of each unit's weights, pruned at once, then retrained for the
              search + retrain steps;
- random + retraining: random units pruned per layer, then the same retraining as "magnitude" (the
  control: a criterion only matters where it beats this);
- random, no retraining (4x): how much a careless cut loses (the benchmark must discriminate);
- torch-pruning (optional, when ``torch_pruning`` is installed: ``pip install -e .[peer]``): the
  Torch-Pruning library's global Taylor importance, whole attention heads and MLP neurons, the
  same parameter budget, then the same retraining as "magnitude".

    python benchmarks/ablations.py            # full: 3 seeds, both tasks (about an hour on 2 cores)
    python benchmarks/ablations.py --tasks retrieval --name ablations-retrieval   # one task
    python benchmarks/ablations.py --quick    # tiny, 1 seed, CI-sized
    python benchmarks/ablations.py --tasks retrieval --name ablations-retrieval --resume   # go on after a stop

Every finished row is appended to ``--cache``/``rows-<name>-<digest>.jsonl`` (the digest covers this
script's source and its arguments); ``--resume`` reuses the rows found there, so a run of several
hours can be stopped and continued (without it, the log is started afresh). Rows are reused as
they were computed: resume only while the engine's code is unchanged.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import upop  # noqa: E402
import upop.models.folders
from upop.api import compress  # noqa: E402
from upop.tasks import get_task, task_names  # noqa: E402
from upop.engine.run import batch_indices, finetune, steps_per_epoch  # noqa: E402

METHODS = {
    "upop": dict(method="upop", allocation="unified"),  # upop's defaults: widths rounded (round_to "auto")
    "upop, free widths": dict(method="upop", allocation="unified", round_to=1),  # the paper's widths
    "one-shot": dict(method="one-shot", allocation="unified"),
    "uniform": dict(method="upop", allocation="uniform"),
    # the budget in measured time (--cost latency) with the Taylor score: units ranked by importance per
    # millisecond (upop's ranking for it) vs by the score alone (the paper's ranking): what the ranking
    # costs or gains in quality at the same time budget
    "upop, cost latency, taylor, per-ms ranking": dict(method="upop", allocation="unified", cost="latency",
                                                       score="taylor", ranking="per-cost"),
    "upop, cost latency, taylor, score ranking": dict(method="upop", allocation="unified", cost="latency",
                                                      score="taylor", ranking="score"),
}
#: the rows that are not UPop runs (``--methods``)
BASELINES = ("magnitude", "random + retraining", "torch-pruning", "random, no retraining")


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


# Torch-Pruning side-by-side (optional extra: pip install -e .[peer]) ---------------------------

PEER_SKIPPED = "torch-pruning not installed: side-by-side skipped (pip install -e .[peer])"
PEER_LABELS = {"taylor": "torch-pruning (global Taylor)", "magnitude": "torch-pruning (global magnitude)"}
PEER_TAYLOR_BATCHES = 4  # training batches whose loss gradients feed the Taylor importance


def torch_pruning_version() -> str | None:
    """Installed Torch-Pruning version (the distribution's; the module's ``__version__`` can lag),
    or None when it is not installed."""
    try:
        import torch_pruning
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return getattr(torch_pruning, "__version__", "unknown")


def task_gradients(task, processor, train, batch_size: int, seed: int, batches: int = PEER_TAYLOR_BATCHES):
    """``grad_fn(model)``: backward of the task loss on the first ``batches`` training batches of
    epoch 0, in the order ``finetune`` uses for ``seed`` (gradients accumulate)."""
    collate = task.collator(processor, seed=seed)

    def grad_fn(model: nn.Module) -> None:
        if hasattr(collate, "set_epoch"):
            collate.set_epoch(0)
        model.train()
        for pos in range(min(batches, steps_per_epoch(len(train), batch_size))):
            batch = collate([train[i] for i in batch_indices(len(train), batch_size, seed, 0, pos)])
            task.loss(model, batch).backward()

    return grad_fn


def _peer_layers(model: nn.Module, groups) -> tuple[dict, dict, list]:
    """What Torch-Pruning may prune, from UPop's own groups: the q/k/v Linears (whole heads) and
    the fc1 Linears (neurons). Every other root layer (out-proj, fc2, patch embedding, projections,
    classifier) is ignored, so the residual width never changes.

    Returns ({q/k/v Linear: heads}, {root Linear: channels per unit}, ignored layers)."""
    heads, unit = {}, {}
    for g in groups:
        if g.fused_qkv:
            raise ValueError(f"{g.name}: fused QKV is not wired for the Torch-Pruning side-by-side")
        size = g.num_units if g.kind == "attention" else 1  # head_dim channels per head, or 1 neuron
        for name in (*g.producers, g.consumer):
            unit[model.get_submodule(name)] = size
        if g.kind == "attention":
            heads.update({model.get_submodule(name): g.num_heads for name in g.producers})
    keep = set(heads) | {model.get_submodule(g.producers[0]) for g in groups if g.kind == "mlp"}
    roots = (nn.Linear, nn.modules.conv._ConvNd, nn.LSTM)
    ignored = [m for m in model.modules() if isinstance(m, roots) and m not in keep]
    return heads, unit, ignored


def _set_heads(model: nn.Module, groups) -> None:
    """Make each attention forward match its pruned q/k/v: head_dim (and the stored scale) stay,
    the head count is q's rows / head_dim (CLIP: ``num_heads``; ViT: ``num_attention_heads``;
    BERT-style ``all_head_size`` if present)."""
    for g in groups:
        if g.kind != "attention":
            continue
        module = model.get_submodule(g.module)
        heads = model.get_submodule(g.producers[0]).out_features // g.num_units
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, heads)
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = heads * g.num_units


def _peer_importance(kind: str):
    import torch_pruning as tp

    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    raise ValueError(f"importance must be 'taylor' or 'magnitude', not {kind!r}")


def _prune_once(dense: nn.Module, groups, example_inputs: dict, grads: dict, kind: str, head_ratio: float,
                channel_ratio: float) -> tuple[nn.Module, int]:
    """A pruned copy of ``dense``: one global Torch-Pruning step with ``head_ratio`` of the heads
    and ``channel_ratio`` of the channels. A layer is never emptied: when the step would remove
    all of a layer's heads (neurons), its most important one (same importance) is kept.
    Returns the copy and how many layers that guard saved."""
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    heads, unit, ignored = _peer_layers(model, groups)
    with warnings.catch_warnings():
        # class embedding / logit scale / position embeddings carry the residual width, which no
        # root layer may prune here (all ignored), so Torch-Pruning's guess for them never applies
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, importance=_peer_importance(kind), global_pruning=True,
            pruning_ratio=channel_ratio, head_pruning_ratio=head_ratio, num_heads=heads,
            prune_num_heads=True, prune_head_dims=False, ignored_layers=ignored,
            in_channel_groups={}, out_channel_groups={},  # fresh dicts: the library's defaults are shared
        )
    for name, p in model.named_parameters():
        p.grad = grads[name].clone() if name in grads else None
    saved, dg = 0, pruner.DG
    # The library drops a group that would empty its layer (all of a layer's heads under the global
    # threshold), leaving that layer whole: the removed share then falls as the ratio rises. Let
    # such groups through and keep the layer's most important unit instead (checked again below).
    check = type(dg).check_pruning_group.__get__(dg)
    dg.check_pruning_group = lambda group: True
    for group in pruner.step(interactive=True):
        root, fn, idxs = group[0].dep.target.module, group[0].dep.handler, sorted(set(group[0].idxs))
        n = dg.get_out_channels(root) if dg.is_out_channel_pruning_fn(fn) else dg.get_in_channels(root)
        if len(idxs) >= n:
            size = unit[root]
            imp = pruner.estimate_importance(dg.get_pruning_group(root, fn, list(range(n))))
            best = int(imp.view(-1, size).mean(1).argmax())
            group = dg.get_pruning_group(root, fn, [i for i in idxs if i // size != best])
            saved += 1
        if check(group):
            group.prune()
    model.zero_grad(set_to_none=True)
    _set_heads(model, groups)
    return model, saved


def _check_peer(dense: nn.Module, model: nn.Module, groups, example_inputs: dict) -> None:
    """Hidden sizes kept, whole heads removed, only prunable parameters gone, forward runs with
    the dense output shapes."""
    for g in groups:
        d_lin, p_lin = dense.get_submodule(g.consumer), model.get_submodule(g.consumer)
        if p_lin.out_features != d_lin.out_features:
            raise RuntimeError(f"{g.consumer}: residual width changed ({d_lin.out_features} -> {p_lin.out_features})")
        widths = {model.get_submodule(n).out_features for n in g.producers} | {p_lin.in_features}
        if len(widths) != 1 or not all(dense.get_submodule(n).in_features == model.get_submodule(n).in_features
                                       for n in g.producers):
            raise RuntimeError(f"{g.name}: inconsistent widths after pruning {sorted(widths)}")
        if g.kind == "attention" and widths.pop() % g.num_units:
            raise RuntimeError(f"{g.name}: not whole heads of {g.num_units} channels")
    removed = upop.count_params(dense) - upop.count_params(model)
    pruned_cost = upop.prunable_cost(groups) - upop.prunable_cost(upop.find_groups(model))
    if removed != pruned_cost:
        raise RuntimeError(f"{removed} parameters removed but {pruned_cost} of them prunable: something outside "
                           "the attention heads and MLP neurons was pruned")
    modes = dense.training, model.training
    with torch.no_grad():
        dense_out, out = dense.eval()(**example_inputs), model.eval()(**example_inputs)
    dense.train(modes[0]), model.train(modes[1])

    def same_shapes(a, b, where: str) -> None:
        for key, value in a.items():
            other = b.get(key) if hasattr(b, "get") else None
            if hasattr(value, "items"):
                same_shapes(value, other if other is not None else {}, f"{where}{key}.")
            elif torch.is_tensor(value) and (not torch.is_tensor(other) or other.shape != value.shape):
                raise RuntimeError(f"output {where}{key}: shape {tuple(value.shape)} dense, "
                                   f"{tuple(getattr(other, 'shape', ()))} pruned")

    same_shapes(dense_out, out, "")


def torch_pruning_prune(dense: nn.Module, ratio: float, example_inputs: dict,
                        grad_fn: Callable[[nn.Module], None] | None = None, importance: str = "taylor",
                        tol: float = 1e-3, iters: int = 14) -> tuple[nn.Module, dict]:
    """Prune a copy of ``dense`` with Torch-Pruning to ``ratio`` of UPop's prunable parameters.

    Torch-Pruning ranks whole attention heads globally (``head_pruning_ratio``, heads of every
    layer and tower together) and MLP neurons globally (``pruning_ratio``), both in units, not
    parameters. The budget match: bisect one ratio used for both until the removed share of the
    prunable parameters (q/k/v/o and fc1/fc2 weights and biases, ``upop.prunable_cost``) is within
    ``tol`` of ``ratio``; heads are coarse, so then keep that head ratio and bisect the neuron ratio
    alone. Each try prunes a fresh copy (same importance: ``grad_fn(model)`` runs the backward the
    Taylor importance needs once, on a copy; its gradients are given to every try).

    Returns the pruned model (hidden sizes unchanged, forward checked) and an info dict: the
    achieved ratio (defined like UPop's ``achieved_ratio``), the two Torch-Pruning ratios, the heads
    and neurons kept, the importance, the tries and how many layers the keep-one guard saved.
    """
    groups = upop.find_groups(dense)
    grads = {}
    if importance == "taylor":
        if grad_fn is None:
            raise ValueError("the Taylor importance needs grad_fn (a backward of the task loss)")
        probe = copy.deepcopy(dense)
        probe.zero_grad(set_to_none=True)
        grad_fn(probe)
        grads = {n: p.grad.detach().clone() for n, p in probe.named_parameters() if p.grad is not None}
        del probe
    total = upop.prunable_cost(groups)
    best: dict = {}  # the try closest to the budget
    tries = 0

    def attempt(head_ratio: float, channel_ratio: float) -> float:
        nonlocal tries
        model, saved = _prune_once(dense, groups, example_inputs, grads, importance, head_ratio, channel_ratio)
        achieved = 1 - upop.prunable_cost(upop.find_groups(model)) / total
        tries += 1
        if not best or abs(achieved - ratio) < abs(best["achieved"] - ratio):
            best.update(achieved=achieved, head_ratio=head_ratio, channel_ratio=channel_ratio, layers_saved=saved,
                        model=model)
        return achieved

    def bisect(fn: Callable[[float], float]) -> None:
        lo, hi = 0.0, 0.999
        for _ in range(iters):
            mid = (lo + hi) / 2
            achieved = fn(mid)
            if abs(achieved - ratio) <= tol:
                return
            lo, hi = (mid, hi) if achieved < ratio else (lo, mid)

    bisect(lambda r: attempt(r, r))
    if abs(best["achieved"] - ratio) > tol:
        head_ratio = best["head_ratio"]
        bisect(lambda c: attempt(head_ratio, c))
    model = best.pop("model")
    _check_peer(dense, model, groups, example_inputs)
    pruned = upop.find_groups(model)

    def count(gs, kind: str) -> int:
        return sum(g.num_heads if kind == "attention" else g.num_units for g in gs if g.kind == kind)

    info = {**best, "importance": importance, "tries": tries,
            "heads_kept": f"{count(pruned, 'attention')}/{count(groups, 'attention')}",
            "neurons_kept": f"{count(pruned, 'mlp')}/{count(groups, 'mlp')}"}
    return model.train(), info


def setup(task_name: str, quick: bool, work: Path):
    """Dense model, processor and splits for a task (trained here when no shipped model exists)."""
    # no training augmentation: Shapes classes are colours, which RandAugment's colour ops change
    task = get_task(task_name).configure(upop.UPopConfig(augment="none"))
    if task_name == "retrieval":
        from upop.data.shapes import write_retrieval
        from upop.cli.demo import DEMO_DATA, demo_model_path

        data = dict(DEMO_DATA) if not quick else dict(train=48, val=16, test=32, image_size=32, seed=0)  # 2 captions each
        write_retrieval(work / "retrieval", **data)
        if quick:
            upop.models.folders.make_model_folder("clip", work / "clip", size="tiny", image_size=32)
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
    model = upop.models.folders.make_model("vit", size="small" if not quick else "tiny", image_size=32, num_labels=num_labels)
    processor = upop.models.folders.make_processor("vit", 32)
    model, _ = finetune(model, task, splits["train"], splits["val"], processor, epochs=30 if not quick else 2,
                        lr=1e-3, batch_size=64 if not quick else 16, progress=False, log=lambda m: None, warmup_steps=50)
    return task, model, processor, splits, work / "classification"


def _head() -> str | None:
    """The checkout's git commit (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


COMMIT = _head()


class RowLog:
    """Finished rows, appended to a JSON-lines file as they come, keyed by (task, method, ratio,
    seed); with ``resume`` the rows already in the file are reused instead of recomputed."""

    def __init__(self, path: Path | None, resume: bool):
        self.path, self.saved = path, {}
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: recomputed
                    continue
                self.saved[self.key(row)] = row
        elif path.is_file():
            path.unlink()

    @staticmethod
    def key(row: dict) -> tuple:
        return row["task"], row["method"], row["ratio"], row["seed"]

    def has(self, task: str, method: str, ratio: float, seed: int) -> bool:
        return (task, method, ratio, seed) in self.saved

    def add(self, rows: list[dict], row_or_compute) -> None:
        """Append a row (a dict, or a callable returning one, called only when not saved)."""
        row = row_or_compute() if callable(row_or_compute) else row_or_compute
        reused = self.key(row) in self.saved
        if not reused:
            row.setdefault("commit", COMMIT)  # which code made it (rows of a resumed run may differ)
        if not reused and self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        rows.append(row)
        print(("reused " if reused else "") + json.dumps(row), flush=True)


def run_task(task_name: str, quick: bool, seeds: list[int], ratios: list[float], work: Path,
             peer: str | None = None, log: RowLog | None = None, methods=None) -> list[dict]:
    """Every method on one task (or those in ``methods``: names of METHODS and BASELINES); ``peer``
    ("taylor" or "magnitude") adds the Torch-Pruning row. Rows found in ``log`` are reused."""
    log = log or RowLog(None, False)
    wanted = set(methods) if methods else set(METHODS) | set(BASELINES)
    task, dense, processor, splits, data = setup(task_name, quick, work)
    metric = task.main_metric
    rows: list[dict] = []
    if log.has(task_name, "dense", 0.0, 0):
        log.add(rows, log.saved[(task_name, "dense", 0.0, 0)])
    else:
        log.add(rows, {"task": task_name, "method": "dense", "ratio": 0.0, "seed": 0,
                       "metric": task.evaluate(dense, splits["test"], processor)[metric]})
    epochs = (1, 1) if quick else (1, 2)
    batch = 16 if quick else 64
    lr = {"retrieval": (1e-4, 5e-4), "classification": (1e-4, 5e-4)}[task_name]
    for ratio in ratios:
        for seed in seeds:
            for method, settings in METHODS.items():
                if method not in wanted:
                    continue
                if log.has(task_name, method, ratio, seed):
                    log.add(rows, log.saved[(task_name, method, ratio, seed)])
                    continue
                cfg = upop.UPopConfig(ratio=ratio, search_epochs=epochs[0], retrain_epochs=epochs[1], batch_size=batch,
                                      lr=lr[0], retrain_lr=lr[1], seed=seed, latency_time=0.05, augment="none",
                                      **{"score": "gradient", "distill": "none", **settings})  # the paper's score, no distillation, as these results were made
                with tempfile.TemporaryDirectory() as out:
                    result = compress(copy.deepcopy(dense), task, train=splits["train"], val=splits["val"],
                                      test=splits["test"], processor=processor, config=cfg, out_dir=Path(out) / "run",
                                      progress=False, log=lambda m: None)
                log.add(rows, {"task": task_name, "method": method, "ratio": ratio, "seed": seed,
                               "metric": result.report["compressed"]["metrics"][metric],
                               "achieved": result.report["achieved_ratio"],
                               "achieved_by_cost": result.report.get("achieved_ratio_by_cost")})

            def retrained(make, method: str) -> None:
                """Prune with ``make()`` (model, extra row fields), retrain for the search + retrain
                steps, evaluate, add its row (or reuse the logged one)."""
                if method not in wanted and not (method in PEER_LABELS.values() and "torch-pruning" in wanted):
                    return
                if log.has(task_name, method, ratio, seed):
                    log.add(rows, log.saved[(task_name, method, ratio, seed)])
                    return
                model, extra = make()
                model, _ = finetune(model, task, splits["train"], splits["val"], processor, epochs=sum(epochs),
                                    lr=lr[1], batch_size=batch, seed=seed, weight_decay=0.0, progress=False,
                                    log=lambda m: None)
                log.add(rows, {"task": task_name, "method": method, "ratio": ratio, "seed": seed,
                               "metric": task.evaluate(model, splits["test"], processor)[metric], **extra})

            def by_magnitude():
                model = copy.deepcopy(dense)
                prune_by(model, ratio, unit_norms)
                torch.manual_seed(seed)
                return model, {}

            def at_random():  # control: which units go matters only if this is clearly worse than the criteria above
                model = copy.deepcopy(dense)
                g = torch.Generator().manual_seed(1000 + seed)
                prune_by(model, ratio, lambda m, grp: torch.rand(grp.num_units, generator=g))
                torch.manual_seed(seed)
                return model, {}

            def by_peer():
                torch.manual_seed(seed)
                model, info = torch_pruning_prune(
                    dense, ratio, task.example_inputs(dense, processor, splits["train"], 2),
                    task_gradients(task, processor, splits["train"], batch, seed), importance=peer)
                return model, {"achieved": info.pop("achieved"), "torch_pruning": info}

            retrained(by_magnitude, "magnitude")
            retrained(at_random, "random + retraining")
            if peer:
                retrained(by_peer, PEER_LABELS[peer])
    for seed in seeds if "random, no retraining" in wanted else ():
        def cut():
            model = copy.deepcopy(dense)
            g = torch.Generator().manual_seed(seed)
            prune_by(model, 0.75, lambda m, grp: torch.rand(grp.num_units, generator=g))
            return {"task": task_name, "method": "random, no retraining", "ratio": 0.75, "seed": seed,
                    "metric": task.evaluate(model, splits["test"], processor)[metric]}

        saved = log.saved.get((task_name, "random, no retraining", 0.75, seed))
        log.add(rows, saved if saved is not None else cut)
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
    parser.add_argument("--cache", default="~/.cache/upop-bench/ablations", help="where finished rows are logged")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *BASELINES], default=None,
                        help="only these rows (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rows an interrupted run with the same script and arguments logged")
    args = parser.parse_args()
    protocol = {k: v for k, v in vars(args).items() if k not in ("cache", "resume")}
    key = hashlib.sha256((Path(__file__).read_text() + json.dumps(protocol, sort_keys=True)).encode()).hexdigest()[:12]
    log = RowLog(Path(args.cache).expanduser() / f"rows-{args.name}-{key}.jsonl", args.resume)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    ratios = [0.5] if args.quick else [0.5, 0.75]
    tp_version = torch_pruning_version()
    peer = "taylor" if tp_version else None
    if peer is None:
        print(PEER_SKIPPED)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for task_name in args.tasks:
            if task_name not in task_names():
                print(f"skipping {task_name}: no such task in this version")
                continue
            rows += run_task(task_name, args.quick, seeds, ratios, Path(work), peer, log, args.methods)
    text = table(rows)
    print(text)
    metric_names = {"retrieval": "R-mean (%)", "classification": "top-1 (%)"}
    note = ("\n\nMetrics: " + ", ".join(f"{t}: {m}" for t, m in metric_names.items() if t in args.tasks) +
            ". Every method trains for the same number of steps (search + retrain, or retrain only).")
    if any("cost latency" in r["method"] for r in rows):
        note += (" The cost latency rows remove the given share of the prunable time (measured per unit at the "
                 "run's start), not of the parameters (JSON rows: achieved_by_cost), with the Taylor score; they "
                 "differ only in the ranking: importance per millisecond (upop's, for this cost) or the score "
                 "alone (the paper's).")
    if any(r["method"] in PEER_LABELS.values() for r in rows):
        how = {"taylor": f"Taylor importance (loss gradients of {PEER_TAYLOR_BATCHES} training batches)",
               "magnitude": "L2 magnitude importance"}[peer]
        note += (f" The {PEER_LABELS[peer]} row is Torch-Pruning {tp_version}: its {how} prunes whole attention "
                 "heads (head dim kept) and MLP neurons, each ranked globally over every layer and tower (a layer "
                 "keeps at least one); its head and neuron ratios are bisected to remove the same share of the "
                 "prunable parameters as UPop (achieved share in the JSON rows); then it is retrained exactly like "
                 "magnitude.")
    write_results(args.name + ("-quick" if args.quick else ""),
                  {"rows": rows, "quick": args.quick, "torch_pruning": tp_version},
                  "## Quality with the paper's ablations\n\n" + text + note)


if __name__ == "__main__":
    main()
