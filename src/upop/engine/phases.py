"""The phases of a :class:`upop.engine.run.Run` on the one step loop (:mod:`upop.engine.loop`).

- :func:`search_phase`: the weights train at a constant learning rate with
  :class:`~upop.engine.callback.UPopCallback` on the loop (masks searched, METHOD §2), then the model is
  pruned (METHOD §3);
- :func:`retrain_phase`: fresh AdamW with a cosine schedule; :class:`_Validate` evaluates after
  every epoch and saves the best model to ``OUT/compressed``.

Both save the run state every ``checkpoint_every`` steps, and on a stop request at the step
boundary (:class:`_Checkpoints`); ``run`` supplies the devices, the forward that agrees across
processes, the logs and the state files.
"""

from __future__ import annotations

from typing import Callable

import torch

from upop.arch import find_groups
from upop.arch.groups import Group
from upop.config import modality_names
from upop.engine.callback import UPopCallback
from upop.checkpoint.folder import save_compressed
from upop.errors import ConfigError, show
from upop.engine.loop import LoopCallback, StepLoop, cosine
from upop.pruning.masks import attach_masks
from upop.pruning.prune import GroupPlan, PruningPlan, apply_plan
from upop.engine.runtime import (PhaseClock, PhaseResult, device_record, disk_full_guard, evaluating, loss_scale,
                                 release_host_memory, seed_everything)
from upop.search.mask_search import UPopSearch


CHECKPOINTING = {"use_reentrant": False}
"""How transformers' gradient checkpointing runs under ``gradient_checkpointing``: non-reentrant, whose
recomputation reaches the masks (parameters outside the block's inputs) and keeps the autograd graph
that data parallelism's first-step look (``Run._unused``) walks."""


def check_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Refuse ``gradient_checkpointing`` for a model whose class cannot checkpoint (transformers'
    ``supports_gradient_checkpointing`` unset, or no module with a ``gradient_checkpointing`` flag), in
    one line naming the class; checked before the run's folder is touched."""
    cls = type(model).__name__
    if not getattr(model, "supports_gradient_checkpointing", False) or not any(
            hasattr(m, "gradient_checkpointing") for m in model.modules()):
        raise ConfigError(f"gradient_checkpointing=True is not allowed for {cls}: the class does not support "
                          "gradient checkpointing (transformers' supports_gradient_checkpointing is not set on it); "
                          "run without --gradient-checkpointing")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn transformers' gradient checkpointing on for ``model`` (:data:`CHECKPOINTING`): its blocks
    recompute their activations, masked producers included, in the backward pass (training mode
    only: evaluations run as they are). Called at the start of each phase, so it holds through
    retraining and after a resume; calling it again replaces the embedding hook transformers adds
    rather than adding a second one."""
    check_gradient_checkpointing(model)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINTING))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING))


def searched_groups(groups: list[Group], modalities: str, model: torch.nn.Module) -> list[Group]:
    """The groups the search ranks under the ``modalities`` setting: every group for ``"all"``, else
    those of the named modalities (the others get no mask and stay dense). A named modality of which
    ``model`` has no group is refused in one line naming the modalities it has."""
    wanted = modality_names(modalities)
    if wanted is None:
        return list(groups)
    have = list(dict.fromkeys(g.modality for g in groups))
    missing = [m for m in wanted if m not in have]
    if missing:
        raise ConfigError(f"modalities={show(modalities)} is not allowed for {type(model).__name__}: the model has "
                          f"modalities {', '.join(have)}; {', '.join(missing)} selects no group")
    return [g for g in groups if g.modality in wanted]


def with_dense_groups(plan: PruningPlan, groups: list[Group]) -> PruningPlan:
    """``plan`` (of the searched groups) with every other group of ``groups`` (all of the model's, in
    model order) keeping all its units, so that the plan names every group, as a plan of the whole
    model does (:func:`upop.pruning.prune.apply_plan` replays it on a dense model); its achieved
    ratios stay those of the searched groups."""
    plan.groups = {g.name: plan.groups.get(g.name) or GroupPlan(g.kind, g.modality, g.layer, g.num_units,
                                                                list(range(g.num_units)), g.granularity)
                   for g in groups}
    return plan


class _Checkpoints(LoopCallback):
    """Save the run state every ``checkpoint_every`` steps (and when ``also(done)``), stop at a
    step boundary when asked, and count the step for ``stop_after``."""

    def __init__(self, run, phase: str, total: int, save: Callable[[int], None],
                 also: Callable[[int], bool] = lambda done: False, last: bool = False):
        self.run, self.phase, self.total, self.save, self.also, self.last = run, phase, total, save, also, last

    def step_end(self, done: int, stop: bool) -> None:
        every = done % self.run.config.checkpoint_every == 0
        if (every and (self.last or done < self.total)) or self.also(done):
            self.save(done)
        self.run.after_step(stop, self.phase, done, self.total, lambda: self.save(done))
        self.run.tick()


def _loop(run, phase: str, wrapped, optimizer, callbacks, scheduler=None) -> StepLoop:
    """The step loop of ``run``'s ``phase``: its forward agrees across processes, backward and
    clipping are the Accelerator's, records go to ``log.jsonl``."""
    acc, cfg = run.acc, run.config
    clip = (lambda: acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)) if cfg.max_grad_norm else None
    return StepLoop(phase, wrapped, optimizer, run.task_loss, scheduler=scheduler, callbacks=callbacks,
                    forward=lambda compute, step: run.forward(compute, phase, step), backward=acc.backward,
                    clip=clip, record=run.record)


def search_phase(run, state: dict | None) -> PruningPlan:
    """The search (from ``state`` when resuming), then the prune; returns the plan."""
    cfg, model, acc = run.config, run.model, run.acc
    # text length of this data sets the FLOPs cost of text units (vision: from the config)
    every = find_groups(model, text_tokens=run.task.text_tokens(run.processor, run.train_set),
                        granularity=cfg.granularity)
    groups = searched_groups(every, cfg.modalities, model)  # --modalities: the others stay dense
    model.to(acc.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    masks = attach_masks(model, groups)
    search = UPopSearch(masks, cfg.ratio, run.search_steps, run.interval, cfg.cost, cfg.method, cfg.w_attn, cfg.w_mlp,
                        round_to=run.round_to, allocation=cfg.allocation, score=cfg.score,
                        ranking=None if cfg.ranking == "auto" else cfg.ranking,
                        unit_costs=run.latency_costs(model, groups) if cfg.cost == "latency" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        search.load_state_dict(state["search"])
        start = state["step"]
        run.log(f"resuming the search at step {start}/{run.search_steps}")
    else:
        seed_everything(cfg.seed, acc.process_index)
    wrapped, optimizer = run.prepare(model, optimizer, "search", start, run.search_steps)
    masks.to(acc.device)
    if state is not None:
        run.load_scaler(state)
        run.restore_rng(state)
    wrapped.train()
    run.record({**device_record("search", model, cfg.precision), "round_to": run.round_to,
              "round_to_why": run.round_to_why})
    clock = PhaseClock("search", acc.device)

    upop = UPopCallback(masks, search, lambda: loss_scale(acc), identical=run.identical if acc.num_processes > 1 else None)

    def save(done: int) -> None:
        run.save_state({"phase": "search", "step": done, "model": acc.unwrap_model(wrapped).state_dict(),
                         "optimizer": optimizer.state_dict(), "search": upop.state_dict(),
                         "scaler": run.scaler_state()})

    bar = run.bar(run.search_steps, start, "search")
    upop.bar = bar
    loop = _loop(run, "search", wrapped, optimizer, [upop, _Checkpoints(run, "search", run.search_steps, save)])
    run.run_loop(loop, "search", start, run.search_steps, bar)
    clock.steps = run.search_steps - start
    # steps whose mask gradients overflowed (fp16: the scaler skipped them too) add nothing to the scores
    run.record({**clock.record(), "skipped_steps": search.skipped_steps})
    model = acc.unwrap_model(wrapped)
    # the search's optimizer (2x the weights in fp32) and Accelerate's references to it and
    # to the wrapper are released before retraining builds its own
    wrapped = optimizer = loop = None  # noqa: F841 (dropped references)
    acc.free_memory()
    run.check_same_weights(model, "search", run.search_steps)
    searched = {"modalities": cfg.modalities} if cfg.modalities != "all" else {}
    plan = upop.prune(model, base_model=run.base_model,
                      settings={"search_epochs": cfg.search_epochs, "seed": cfg.seed, "task": run.task.name,
                                **searched})
    if len(groups) < len(every):
        plan = with_dense_groups(plan, every)
    run.check_same_plan(plan)
    release_host_memory()  # the search's optimizer and the sliced-away weights
    run.model = model
    run.log(f"pruned: removed {plan.achieved_ratio['params']:.1%} of prunable params, "
            f"{plan.achieved_ratio['flops']:.1%} of prunable FLOPs")
    run.save_state({"phase": "retrain", "step": 0, "plan": plan.to_dict(), "model": model.state_dict(),
                     "best": None, "best_metrics": {}, "history": []})
    run.tick()  # pruning counts as one step for stop_after
    return plan


class _Validate(LoopCallback):
    """Retraining: the bar's loss; after every epoch (and the last step) evaluate on validation
    and save the best model to ``OUT/compressed``."""

    def __init__(self, run, wrapped, plan: PruningPlan, compressed_dir, bar, best, best_metrics, history):
        self.run, self.wrapped, self.plan, self.dir, self.bar = run, wrapped, plan, compressed_dir, bar
        self.best, self.best_metrics, self.history = best, best_metrics, history

    def after_step(self, step: int, record: dict) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def step_end(self, done: int, stop: bool) -> None:
        run, cfg = self.run, self.run.config
        if not (done % run.spe == 0 or done == run.retrain_steps):
            return
        model = run.acc.unwrap_model(self.wrapped)
        run.check_same_weights(model, "retrain", done)
        with evaluating(model, run.acc.device, cfg.eval_precision, workers=cfg.workers):
            metrics = run.task.evaluate(model, run.val_set, run.processor, cfg.eval_batch_size, accelerator=run.acc)
        value = metrics[run.task.main_metric]
        self.history.append({"step": done, **metrics})
        run.record({"phase": "val", "step": done, "eval_precision": cfg.eval_precision, **metrics})
        if run.task.is_better(value, self.best):
            self.best, self.best_metrics = value, metrics
            if run.acc.is_main_process:
                with disk_full_guard(self.dir, run.state_dir):
                    save_compressed(model, self.dir, processor=run.processor, plan=self.plan)


def retrain_phase(run, plan: PruningPlan, state: dict | None) -> PhaseResult:
    """Retrain the pruned model (from ``state`` when resuming); returns the plan, the best
    validation metrics and their history."""
    cfg, model, acc = run.config, run.model, run.acc
    if state is not None:  # rebuild the pruned shape from the dense model, then load
        if getattr(model, "upop_plan", None) is None:
            apply_plan(model, plan)
        model.load_state_dict(state["model"])
    model.to(acc.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.retrain_lr or cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(max(1, run.retrain_steps)))
    start, best, best_metrics, history = 0, None, {}, []
    if state is not None:
        start = state["step"]
        best, best_metrics, history = state["best"], state["best_metrics"], state["history"]
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        if start:
            run.log(f"resuming the retraining at step {start}/{run.retrain_steps}")
    compressed_dir = run.out / "compressed"
    wrapped, optimizer = run.prepare(model, optimizer, "retrain", start, run.retrain_steps)
    if state is not None:
        run.load_scaler(state)
        run.restore_rng(state)
    wrapped.train()
    run.record(device_record("retrain", model, cfg.precision))
    clock = PhaseClock("retrain", acc.device)
    bar = run.bar(run.retrain_steps, start, "retrain")
    val = _Validate(run, wrapped, plan, compressed_dir, bar, best, best_metrics, history)

    def save(done: int) -> None:
        run.save_state({"phase": "retrain", "step": done, "plan": plan.to_dict(),
                         "model": acc.unwrap_model(wrapped).state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": run.scaler_state(),
                         "best": val.best, "best_metrics": val.best_metrics, "history": val.history})

    checkpoints = _Checkpoints(run, "retrain", run.retrain_steps, save, also=lambda done: done % run.spe == 0, last=True)
    loop = _loop(run, "retrain", wrapped, optimizer, [val, checkpoints], scheduler=scheduler)
    run.run_loop(loop, "retrain", start, run.retrain_steps, bar)
    clock.steps = run.retrain_steps - start
    run.record(clock.record())
    model = acc.unwrap_model(wrapped)
    best, best_metrics, history = val.best, val.best_metrics, val.history
    wrapped = optimizer = scheduler = loop = val = None  # noqa: F841 (dropped references)
    acc.free_memory()
    if run.retrain_steps == 0 or not _main_sees(acc, compressed_dir / "upop_plan.json"):
        with evaluating(model, acc.device, cfg.eval_precision, workers=cfg.workers):
            best_metrics = run.task.evaluate(model, run.val_set, run.processor, cfg.eval_batch_size, accelerator=acc)
        if acc.is_main_process:
            with disk_full_guard(compressed_dir, run.state_dir):
                save_compressed(model, compressed_dir, processor=run.processor, plan=plan)
    run.save_state({"phase": "done", "step": run.retrain_steps, "plan": plan.to_dict(), "model": {},
                     "best": best, "best_metrics": best_metrics, "history": history})
    run.model = model
    return PhaseResult(plan=plan, best_metrics=best_metrics, history=history)


def _main_sees(acc, file) -> bool:
    """Whether the main process sees ``file``, the same answer on every process: each process
    asking its own file system (a network one may lag) could send one of them alone into an
    evaluation's collectives, where it would wait forever."""
    seen = [file.is_file() if acc.is_main_process else None]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(seen)
    return bool(seen[0])
