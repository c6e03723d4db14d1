"""The training loop of a UPop run: search -> prune -> retrain, resumable at any step.

One :class:`Run` drives the phases on Accelerate (devices, mixed precision, multi-process):

- **search** (METHOD §2): weights train with a constant learning rate; mask gradients are
  accumulated and the masks re-selected and projected every ``interval`` steps;
- **prune** (METHOD §3): the units whose mask is 0 are sliced out;
- **retrain**: fresh AdamW, cosine schedule; the best checkpoint on validation is kept.

Every ``checkpoint_every`` steps, and at each phase boundary, the run writes ``state/run.pt``
atomically (temp file + rename): weights, optimizer, scheduler, masks and accumulated scores,
search state, RNG states and the data position. ``resume=True`` continues from it. The data
order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .arch import find_groups
from .checkpoint import load_compressed, save_compressed
from .config import UPopConfig
from .errors import ConfigError, UPopError
from .masks import attach_masks
from .prune import PruningPlan, apply_plan, prune
from .search import UPopSearch
from .tasks import Task

STATE_FILE = "run.pt"


class TrainingError(UPopError):
    """The run cannot go on (non-finite loss or mask gradient); the last checkpoint is intact."""


def _accelerator(precision: str):
    from accelerate import Accelerator

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, position: int, rank: int = 0, world: int = 1) -> list[int]:
    """Sample indices of batch ``position`` of ``epoch`` for process ``rank`` (a pure function)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    global_bs = batch_size * world
    chunk = perm[position * global_bs : (position + 1) * global_bs]
    return chunk[rank::world].tolist()


class StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is the collated training batch of step ``start + i``: the samples of
    :func:`batch_indices` for that step's (epoch, position), collated after ``set_epoch(epoch)``.
    A pure function of the step, so DataLoader workers produce exactly the in-process batches."""

    def __init__(self, dataset, collate, *, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1):
        self.dataset, self.collate, self.batch_size, self.seed = dataset, collate, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.spe = steps_per_epoch(len(dataset), batch_size, world)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> dict:
        epoch, pos = divmod(self.start + i, self.spe)
        idx = batch_indices(len(self.dataset), self.batch_size, self.seed, epoch, pos, self.rank, self.world)
        if hasattr(self.collate, "set_epoch"):
            self.collate.set_epoch(epoch)
        return self.collate([self.dataset[j] for j in idx])


def step_batches(dataset, collate, *, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1, workers: int = 0) -> Iterator[dict]:
    """The training batches of steps ``start .. stop-1`` in order, built in this process
    (``workers=0``) or ahead of time by ``workers`` DataLoader processes."""
    steps = StepBatches(dataset, collate, batch_size=batch_size, seed=seed, start=start, stop=stop, rank=rank,
                        world=world)
    if workers == 0 or len(steps) == 0:
        return (steps[i] for i in range(len(steps)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after tokenizer use
    # the generator keeps the DataLoader from drawing its worker seed from the global RNG, so a
    # run with workers draws the same dropout masks as one without (and a resume stays identical)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), prefetch_factor=2,
                                         generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Full batches per epoch (the ragged tail is dropped, as contrastive losses need full batches)."""
    return max(1, n // (batch_size * world))


def check_output_dir(out: Path, min_free_bytes: int) -> None:
    """Fail before training if ``out`` cannot be written or its disk is nearly full."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".upop-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {out} is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(out).free
    if free < min_free_bytes:
        raise ConfigError(
            f"output folder {out}: only {free / 2**20:.0f} MiB free on its disk, need about {min_free_bytes / 2**20:.0f} MiB"
        )


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@dataclass
class PhaseResult:
    plan: PruningPlan
    best_metrics: dict[str, float]
    history: list[dict]


class Run:
    """One search -> prune -> retrain run writing into ``out_dir``.

    ``model`` must be the dense model, as loaded from ``base_model`` (also on resume: the run
    rebuilds the pruned model from it and the saved plan).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train,
        val,
        config: UPopConfig,
        processor,
        out_dir: str | os.PathLike,
        resume: bool = False,
        base_model: str = "",
        log: Callable[[str], None] = print,
        progress: bool = True,
        stop_after: int | None = None,
    ):
        self.model, self.task, self.train_set, self.val_set = model, task, train, val
        self.config, self.processor = config, processor
        self.out = Path(out_dir)
        self.state_dir = self.out / "state"
        self.resume, self.base_model, self.log, self.progress = resume, base_model, log, progress
        self.stop_after = stop_after  # testing hook: stop (as if killed) after this many total steps
        self.acc = _accelerator(config.precision)
        self.collate = task.collator(processor, seed=config.seed)
        self.spe = steps_per_epoch(len(train), config.batch_size, self.acc.num_processes)
        self.search_steps = config.search_epochs * self.spe
        self.retrain_steps = config.retrain_epochs * self.spe
        self.interval = config.resolved_interval(self.search_steps)
        self._steps_done = 0

    # helpers ---------------------------------------------------------------------------------
    def _batches(self, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's training batches of steps ``start .. stop-1``, on the device."""
        for batch in step_batches(self.train_set, self.collate, batch_size=self.config.batch_size,
                                  seed=self.config.seed, start=start, stop=stop, rank=self.acc.process_index,
                                  world=self.acc.num_processes,
                                  workers=self.config.resolved_workers(self.acc.num_processes)):
            yield {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")

    def _save_state(self, state: dict) -> None:
        if self.acc.is_main_process:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            state["rng"] = _rng_state()
            _atomic_torch_save(state, self.state_dir / STATE_FILE)
        self.acc.wait_for_everyone()

    def load_state(self) -> dict | None:
        file = self.state_dir / STATE_FILE
        if not file.is_file():
            return None
        # weights_only: a state file can hold tensors and plain data, never code.
        return torch.load(file, map_location="cpu", weights_only=True)

    def _identical(self, tensors) -> bool:
        """True if every process holds exactly the same values in ``tensors`` (a digest is compared)."""
        from accelerate.utils import gather_object

        mine = torch.cat([t.detach().double().cpu().flatten() for t in tensors])
        digest = [float(mine @ torch.arange(1, mine.numel() + 1, dtype=torch.float64)), float(mine.sum())]
        gathered = gather_object([digest])
        return all(d == gathered[0] for d in gathered)

    def _check_same_weights(self, model: nn.Module, phase: str, step: int) -> None:
        """Every process must hold the same weights (data parallelism averages the gradients); a
        task whose loss bypasses the wrapped model's forward would let them drift apart."""
        if self.acc.num_processes == 1:
            return
        identical = self._identical(p for p in model.parameters())
        self._log({"phase": "sync", "after": phase, "step": step, "processes": self.acc.num_processes,
                   "weights_identical": identical})
        if not identical:
            raise TrainingError(f"the {self.acc.num_processes} processes hold different weights after {phase} step "
                                f"{step}: task {self.task.name!r} does not synchronise its gradients; this is a bug, "
                                "please report it")

    def _check_same_plan(self, plan: PruningPlan) -> None:
        """Every process must have chosen the same plan (masks are kept identical by averaging
        the mask gradients); a mismatch stops the run instead of saving a wrong model."""
        if self.acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        mine = json.dumps({k: v.kept for k, v in sorted(plan.groups.items())})
        plans = gather_object([mine])
        identical = all(p == plans[0] for p in plans)
        self._log({"phase": "prune", "processes": self.acc.num_processes, "plans_identical": identical})
        if not identical:
            raise TrainingError(f"the {self.acc.num_processes} processes chose different plans; this is a bug, please report it")

    def _tick(self) -> None:
        self._steps_done += 1
        if self.stop_after is not None and self._steps_done >= self.stop_after:
            raise KeyboardInterrupt(f"stopped after {self._steps_done} steps (stop_after)")

    def _check_finite(self, loss: torch.Tensor, phase: str, step: int) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"non-finite loss ({float(loss.detach())}) at {phase} step {step}; "
                f"the last good checkpoint is in {self.state_dir}; lower --lr or use --precision fp32"
            )

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not (self.progress and self.acc.is_main_process),
                    dynamic_ncols=True, leave=False)

    # phases ----------------------------------------------------------------------------------
    def run(self) -> PhaseResult:
        """Run (or resume) every phase; returns the plan and the best validation metrics."""
        state = self.load_state() if self.resume else None
        if state is not None and state["phase"] == "done":
            self.model = load_compressed(self.out / "compressed")
            return PhaseResult(PruningPlan.from_dict(state["plan"]), state["best_metrics"], state["history"])
        if state is None or state["phase"] == "search":
            plan = self._search(state)
            state = None
        else:
            plan = PruningPlan.from_dict(state["plan"])
        return self._retrain(plan, state)

    def _search(self, state: dict | None) -> PruningPlan:
        cfg, model = self.config, self.model
        # text length of this data sets the FLOPs cost of text units (vision: from the config)
        groups = find_groups(model, text_tokens=self.task.text_tokens(self.processor, self.train_set))
        masks = attach_masks(model, groups)
        search = UPopSearch(masks, cfg.ratio, self.search_steps, self.interval, cfg.cost, cfg.method, cfg.w_attn, cfg.w_mlp,
                            round_to=cfg.round_to, allocation=cfg.allocation)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            search.load_state_dict(state["search"])
            _set_rng_state(state["rng"])
            start = state["step"]
            self.log(f"resuming the search at step {start}/{self.search_steps}")
        wrapped, optimizer = self.acc.prepare(model, optimizer)
        masks.to(self.acc.device)
        wrapped.train()
        bar = self._bar(self.search_steps, start, "search")
        for step, batch in zip(range(start, self.search_steps), self._batches(start, self.search_steps)):
            with self.acc.autocast():
                task_loss = self.task.loss(wrapped, batch)
                loss = task_loss + search.sparsity_loss()
            self._check_finite(loss, "search", step)
            self.acc.backward(loss)
            scaler = getattr(self.acc, "scaler", None)
            try:
                update = search.step(step, grad_scale=scaler.get_scale() if scaler is not None else 1.0,
                                     skip_nonfinite=scaler is not None)
            except FloatingPointError as exc:
                raise TrainingError(f"{exc}; the last good checkpoint is in {self.state_dir}") from None
            if cfg.max_grad_norm:
                self.acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            p_t = update.ratio if update else (search.history[-1].ratio if search.history else 0.0)
            bar.set_postfix(loss=f"{task_loss.item():.4f}", p_t=f"{p_t:.3f}")
            bar.update(1)
            record = {"phase": "search", "step": step, "loss": task_loss.item(), "p_t": p_t}
            if update:
                record["removed"] = update.removed
                if self.acc.num_processes > 1:
                    record["masks_identical"] = self._identical(m for _, m in masks.items())
            self._log(record)
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < self.search_steps:
                self._save_state({"phase": "search", "step": done, "model": self.acc.unwrap_model(wrapped).state_dict(),
                                  "optimizer": optimizer.state_dict(), "search": search.state_dict()})
            self._tick()
        bar.close()
        model = self.acc.unwrap_model(wrapped)
        settings = {**search.settings(), "search_epochs": cfg.search_epochs, "seed": cfg.seed, "task": self.task.name}
        self._check_same_weights(model, "search", self.search_steps)
        plan = prune(model, masks, base_model=self.base_model, search=settings)
        self._check_same_plan(plan)
        self.model = model
        self.log(f"pruned: removed {plan.achieved_ratio['params']:.1%} of prunable params, "
                 f"{plan.achieved_ratio['flops']:.1%} of prunable FLOPs")
        self._save_state({"phase": "retrain", "step": 0, "plan": plan.to_dict(), "model": model.state_dict(),
                          "best": None, "best_metrics": {}, "history": []})
        self._tick()  # pruning counts as one step for stop_after
        return plan

    def _retrain(self, plan: PruningPlan, state: dict | None) -> PhaseResult:
        cfg = self.config
        model = self.model
        if state is not None:  # rebuild the pruned shape from the dense model, then load
            if getattr(model, "upop_plan", None) is None:
                apply_plan(model, plan)
            model.load_state_dict(state["model"])
        lr = cfg.retrain_lr or cfg.lr
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        total = max(1, self.retrain_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        start, best, best_metrics, history = 0, None, {}, []
        if state is not None:
            start = state["step"]
            best, best_metrics, history = state["best"], state["best_metrics"], state["history"]
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            if start:
                self.log(f"resuming the retraining at step {start}/{self.retrain_steps}")
        compressed_dir = self.out / "compressed"
        wrapped, optimizer = self.acc.prepare(model, optimizer)
        wrapped.train()
        bar = self._bar(self.retrain_steps, start, "retrain")
        for step, batch in zip(range(start, self.retrain_steps), self._batches(start, self.retrain_steps)):
            with self.acc.autocast():
                loss = self.task.loss(wrapped, batch)
            self._check_finite(loss, "retrain", step)
            self.acc.backward(loss)
            if cfg.max_grad_norm:
                self.acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
            self._log({"phase": "retrain", "step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
            done = step + 1
            if done % self.spe == 0 or done == self.retrain_steps:
                self._check_same_weights(self.acc.unwrap_model(wrapped), "retrain", done)
                metrics = self.task.evaluate(self.acc.unwrap_model(wrapped), self.val_set, self.processor, cfg.eval_batch_size,
                                             accelerator=self.acc)
                value = metrics[self.task.main_metric]
                history.append({"step": done, **metrics})
                self._log({"phase": "val", "step": done, **metrics})
                if best is None or value > best:
                    best, best_metrics = value, metrics
                    if self.acc.is_main_process:
                        save_compressed(self.acc.unwrap_model(wrapped), compressed_dir, processor=self.processor, plan=plan)
            if done % cfg.checkpoint_every == 0 or done % self.spe == 0:
                self._save_state({"phase": "retrain", "step": done, "plan": plan.to_dict(),
                                  "model": self.acc.unwrap_model(wrapped).state_dict(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "best": best, "best_metrics": best_metrics, "history": history})
            self._tick()
        bar.close()
        model = self.acc.unwrap_model(wrapped)
        if self.retrain_steps == 0 or not (compressed_dir / "upop_plan.json").is_file():
            best_metrics = self.task.evaluate(model, self.val_set, self.processor, cfg.eval_batch_size, accelerator=self.acc)
            if self.acc.is_main_process:
                save_compressed(model, compressed_dir, processor=self.processor, plan=plan)
        self._save_state({"phase": "done", "step": self.retrain_steps, "plan": plan.to_dict(), "model": {},
                          "best": best, "best_metrics": best_metrics, "history": history})
        self.model = model
        return PhaseResult(plan=plan, best_metrics=best_metrics, history=history)


__all__ = ["Run", "TrainingError", "batch_indices", "check_output_dir", "finetune", "steps_per_epoch"]


def finetune(
    model: nn.Module, task: Task, train, val, processor, *, epochs: int, lr: float, batch_size: int,
    seed: int = 0, weight_decay: float = 0.05, warmup_steps: int = 0, log: Callable[[str], None] = print,
    progress: bool = True, workers: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """Plain training of ``model`` on ``task`` (AdamW, warm-up then cosine), keeping the best
    weights on validation. Used to train the demo model and as the baseline in benchmarks."""
    from tqdm.auto import tqdm

    collate = task.collator(processor, seed=seed)
    spe = steps_per_epoch(len(train), batch_size)
    total = epochs * spe
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (s - warmup_steps) / max(1, total - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    torch.manual_seed(seed)
    best, best_state, best_metrics = None, None, {}
    bar = tqdm(total=total, desc="train", disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(step_batches(train, collate, batch_size=batch_size, seed=seed, start=0, stop=total,
                                              workers=workers)):
        epoch = step // spe
        model.train()
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if (step + 1) % spe == 0:
            metrics = task.evaluate(model, val, processor)
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} " + " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
            if best is None or metrics[task.main_metric] > best:
                best, best_metrics = metrics[task.main_metric], metrics
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_metrics
