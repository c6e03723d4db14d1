"""UPop inside a ``transformers.Trainer``: search, prune and retrain in one ``trainer.train()``.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    callback = upop.add_upop(trainer, ratio=0.5)   # search the first half of the steps
    trainer.train()                                             # search -> prune -> retrain
    upop.save_compressed(trainer.model, "out/compressed")       # callback.plan: what was kept

The first ``search_steps`` optimizer steps run the UPop search (METHOD §2): masks are attached
when training begins, their gradients (accumulated by autograd over the micro-batches of a
gradient-accumulation step) are taken once per optimizer step, divided by the fp16 loss scale,
and the masks are re-selected every ``interval`` steps. The weights train at a constant learning
rate meanwhile. After the last search step the model is pruned in place, the optimizer is given
the pruned parameters with a fresh state, the Trainer's learning-rate schedule (its
``lr_scheduler_type`` and warmup) restarts over the remaining steps, and training continues as
the retraining. A scheduler passed to the Trainer yourself is left as it is.

The L1 sparsity term of METHOD §2 is not added to the loss: its gradient on a live mask is the
constant ``w_attn`` (attention) or ``w_mlp`` (MLP), so the callback adds that constant to the mask
gradients directly, which is the same sum of gradients (kept for parity; it does not change the
ranking) and leaves the Trainer's ``compute_loss`` untouched.

Distillation (``distill="logits"`` or ``"logits+hidden"``): a frozen copy of the model taken at
:meth:`UPopTrainerCallback.attach` is the teacher, and :class:`upop.integrations.transformers.distill.TrainerDistiller`
adds the term to the loss of every training forward through hooks on the model, during the
search and the retraining.

Checkpoints: every Trainer checkpoint of the search holds ``upop_search.pt`` (the search state and
masks); after pruning, a checkpoint holds the pruned weights and ``upop_plan.json``. With
``trainer.train(resume_from_checkpoint=...)`` the callback replays the plan on the dense model
before the Trainer loads the pruned weights (it wraps the Trainer's weight loading; for a
Trainer whose loading it cannot wrap, call :func:`prepare_resume` first) and restores the search,
so a resumed run ends with the plan of an uninterrupted one.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.optimization import get_constant_schedule
from transformers.trainer_callback import TrainerCallback

from upop.integrations.transformers.glue import (load_compressed_weights, load_renamed_weights,
                                                 rewrap_ddp, swap_parameters)
from upop.arch import find_groups
from upop.engine.callback import UPopCallback
from upop.engine.phases import searched_groups, with_dense_groups
from upop.engine.runtime import loss_scale
from upop.checkpoint.folder import read_plan
from upop.config import ResolvedSettings, UPopConfig, decide_distill
from upop.errors import CheckpointError, ConfigError, show
from upop.pruning.masks import Masks, attach_masks
from upop.pruning.prune import PLAN_FILE, PruningPlan, apply_plan
from upop.runs.rundir import torch_save_atomic, write_text_atomic
from upop.search.mask_search import UPopSearch, resolve_round_to
from upop.integrations.transformers.distill import TrainerDistiller

SEARCH_FILE = "upop_search.pt"
"""The search state in a Trainer checkpoint folder written during the search."""
SEARCH_FORMAT = 1
DEFAULT_SEARCH_FRACTION = 0.5
"""The share of the run's optimizer steps the search takes when no length is given."""


class UPopTrainerCallback(TrainerCallback):
    """Run the UPop search during the first optimizer steps of ``Trainer.train()``, then prune and retrain.

    Args:
        ratio: share of the prunable cost to remove, in (0, 1) (0.5 is the paper's "2x").
        search_steps / search_epochs / search_fraction: the search length, at most one of them:
            optimizer steps, epochs of the train dataloader, or a share of ``state.max_steps``
            (default :data:`DEFAULT_SEARCH_FRACTION`, half the run). The rest of the run retrains.
        interval: re-select every ``interval`` search steps; default: the steps per 1% of
            compression (METHOD §5), below ``search_steps``.
        cost, method, score, allocation, w_attn, w_mlp, unit_costs: as for :class:`upop.UPopSearch` (``score``
            defaults to ``"taylor"`` here, as in ``upop compress``; ``UPopSearch`` keeps the paper's ``"gradient"``).
        round_to: kept widths are multiples of this; ``"auto"`` (default) picks it per device
            (:func:`upop.search.mask_search.resolve_round_to`).
        granularity: ``"head-dim"`` (the paper), ``"head"`` (whole attention heads) or ``"both"``
            (heads and head-dim channels ranked together; see :func:`upop.find_groups`).
        modalities: ``"all"`` (every group, the unified search) or a comma list of the group
            modalities to search (``"text"``: a vision-language model's language model only); the
            other groups stay dense and ``ratio`` is a share of the searched groups' cost.
        text_tokens: text length for FLOPs costs of text units (default: the model's maximum).
        distill, distill_weight, distill_temperature, teacher_precision: distillation from the dense
            model during the search and the retraining, as ``upop compress --distill`` (``"none"``,
            default; ``"auto"`` is ``"none"`` here: the Trainer's loop has no cached teacher, so
            ``upop compress``'s free distillation does not exist; ``"logits"`` or ``"logits+hidden"``), read off the model output's
            ``logits_per_image`` or ``logits`` (:mod:`upop.integrations.transformers.distill`). The teacher is a frozen
            copy of ``trainer.model`` made when the callback is attached (the dense model: attach
            before training, also when resuming), or ``teacher`` if given.
        trainer: the Trainer; or call :meth:`attach` / use :func:`add_upop`.

    The settings are checked by :class:`upop.UPopConfig` (the same errors as ``upop compress``) and
    kept as :attr:`config`; when training begins they are resolved for the run
    (:meth:`upop.UPopConfig.resolve`: ``interval``, ``ranking``, ``round_to`` decided, with reasons) into
    :attr:`settings`.

    After training: ``trainer.model`` is pruned, :attr:`plan` is its :class:`upop.PruningPlan`,
    :attr:`search` the finished :class:`upop.UPopSearch` (history, accumulated scores).
    """

    def __init__(self, ratio: float = 0.5, *, search_steps: int | None = None, search_epochs: float | None = None,
                 search_fraction: float | None = None, interval: int | None = None, cost: str = "params",
                 method: str = "upop", score: str = "taylor", round_to: int | str = "auto",
                 allocation: str = "unified", granularity: str = "head-dim", modalities: str = "all",
                 w_attn: float = 6.4e-3,
                 w_mlp: float = 2e-4, unit_costs: dict[str, float] | None = None, text_tokens: int | None = None,
                 distill: str = "none", distill_weight: float = 4.0, distill_temperature: float = 1.0,
                 teacher_precision: str = "fp32", teacher: nn.Module | None = None, trainer=None):
        #: the settings, checked by UPopConfig's one validation
        self.config = UPopConfig(ratio=ratio, interval=interval, cost=cost, method=method, score=score,
                                 round_to=round_to, allocation=allocation, granularity=granularity,
                                 modalities=modalities, w_attn=w_attn,
                                 w_mlp=w_mlp, distill=distill, distill_weight=distill_weight,
                                 distill_temperature=distill_temperature, teacher_precision=teacher_precision)
        #: the settings resolved for the run (made when training begins)
        self.settings: ResolvedSettings | None = None
        self.distill = {"mode": decide_distill(distill, None, cache=False)[0], "teacher": teacher}
        self.distiller: TrainerDistiller | None = None
        given = {k: v for k, v in (("search_steps", search_steps), ("search_epochs", search_epochs),
                                   ("search_fraction", search_fraction)) if v is not None}
        if len(given) > 1:
            raise ConfigError(f"give at most one of search_steps, search_epochs, search_fraction; got {show(given)}")
        _check_length(given)
        self.unit_costs, self.text_tokens = unit_costs, text_tokens
        self._length = given or {"search_fraction": DEFAULT_SEARCH_FRACTION}
        self.search_steps: int | None = None  # resolved when training begins
        self.search: UPopSearch | None = None
        self.masks: Masks | None = None
        self._every: list = []  # every group of the model (the plan names them all; the search ranks ``modalities``')
        self.core: UPopCallback | None = None  # drives masks and search on each step (upop.engine.callback)
        self.plan: PruningPlan | None = None
        self.trainer = None
        self._resume_dir: Path | None = None
        if trainer is not None:
            self.attach(trainer)

    # wiring ----------------------------------------------------------------------------------
    def attach(self, trainer) -> "UPopTrainerCallback":
        """Give the callback its Trainer (to swap the optimizer's parameters and the schedule) and
        wrap the Trainer's checkpoint loading so that a pruned checkpoint resumes (see
        :func:`prepare_resume`) and is loaded by ``load_best_model_at_end``: its weights are
        ``model.upop.safetensors``, which the Trainer does not look for. Does not register the
        callback: :func:`add_upop` does both."""
        self.trainer = trainer
        self._start_distilling()
        original = getattr(trainer, "_load_from_checkpoint", None)
        if callable(original) and not getattr(original, "_upop_wrapped", False):
            def load(resume_from_checkpoint, model=None):
                self._resume_dir = Path(resume_from_checkpoint)
                target = model if model is not None else trainer.model
                _prepare(target, resume_from_checkpoint, trainer.optimizer)
                fsdp = getattr(trainer, "is_fsdp_enabled", False)
                loaded = None if fsdp else load_compressed_weights(target, self._resume_dir)
                if loaded is not None:  # a pruned checkpoint: model.upop.safetensors, unknown to the Trainer
                    trainer._issue_warnings_after_load(loaded)
                    return None
                result = original(resume_from_checkpoint, model)
                load_renamed_weights(target, Path(resume_from_checkpoint))
                return result

            load._upop_wrapped = True
            trainer._load_from_checkpoint = load
        best = getattr(trainer, "_load_best_model", None)
        if callable(best) and not getattr(best, "_upop_wrapped", False):
            def load_best():
                folder = trainer.state.best_model_checkpoint
                plain = folder and not (getattr(trainer, "is_deepspeed_enabled", False)
                                         or getattr(trainer, "is_fsdp_enabled", False))
                loaded = load_compressed_weights(trainer.model, Path(folder)) if plain else None
                if loaded is None:
                    return best()
                trainer._issue_warnings_after_load(loaded)
                return None

            load_best._upop_wrapped = True
            trainer._load_best_model = load_best
        return self

    def _start_distilling(self) -> None:
        """Hook the distillation on the Trainer's model; the first time, the teacher is copied from
        it (or from ``teacher``) and kept for later ``train()`` calls of this callback."""
        d, cfg = self.distill, self.config
        if d["mode"] == "none" or self.distiller is not None:
            return
        self.distiller = TrainerDistiller(self.trainer.model, d["mode"], cfg.distill_weight, cfg.distill_temperature,
                                          d["teacher"], cfg.teacher_precision)
        d["teacher"] = self.distiller.teacher

    def on_train_end(self, args, state, control, **kwargs):
        """The distillation hooks come off: later forwards of the model (another Trainer, your own
        loop) are the model's own; a further ``train()`` with this callback hooks them again."""
        if self.distiller is not None:
            self.distiller.close()
            self.distiller = None

    def _need_trainer(self, args):
        trainer = self.trainer
        if trainer is None:
            raise ConfigError("UPopTrainerCallback has no Trainer: create it with upop.add_upop(trainer, "
                              "...), or call callback.attach(trainer) before trainer.train()")
        if args.n_gpu > 1:
            raise ConfigError(f"n_gpu={args.n_gpu}: UPopTrainerCallback does not support DataParallel (several GPUs in "
                              "one process); launch one process per GPU with torchrun or accelerate launch")
        for flag in ("is_deepspeed_enabled", "is_fsdp_enabled"):
            if getattr(trainer, flag, False):
                raise ConfigError(f"UPopTrainerCallback does not support {flag[3:-8]} (the pruning replaces sharded "
                                  "parameters); use DDP (torchrun) or a single process")
        return trainer

    # the phases ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        trainer = self._need_trainer(args)
        self._start_distilling()
        model = trainer.model
        self.search_steps = self._resolve_search_steps(state, train_dataloader, args)
        (kind, value), = self._length.items()
        self.settings = self.config.resolve(None, device_type=args.device.type, processes=args.world_size,
                                            search_steps=self.search_steps,
                                            length=f"{kind}={value} of max_steps={state.max_steps}")
        resume = None
        if state.global_step > 0:
            resume = self._resume_dir or Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if getattr(model, "upop_plan", None) is not None:  # a resumed retraining: the plan was replayed
            if resume is None or state.global_step < self.search_steps:
                raise ConfigError("the model is already pruned (it carries a upop plan) and no checkpoint after the "
                                  "search is resumed; UPopTrainerCallback prunes a dense model (train a compressed "
                                  "one without it)")
            self.plan = model.upop_plan
            self._set_schedule(trainer, resume, retrain=True)
            return
        if state.global_step >= self.search_steps:
            raise CheckpointError(f"resuming at step {state.global_step}, after the search's {self.search_steps} "
                                  f"steps, but {show(resume)} has no {PLAN_FILE}")
        if self.masks is not None:  # left by an earlier train() that stopped during the search
            self.masks.remove()
        s = self.settings
        self._every = find_groups(model, text_tokens=self.text_tokens, granularity=s["granularity"])
        groups = searched_groups(self._every, s["modalities"], model)
        self.settings = s = s.decide("round_to", *resolve_round_to(s["round_to"], groups, args.device.type,
                                                                   s["allocation"]))
        self.masks = attach_masks(model, groups)
        try:
            self.search = UPopSearch(self.masks, s["ratio"], self.search_steps, s["interval"], s["cost"], s["method"],
                                     s["w_attn"], s["w_mlp"], round_to=s["round_to"], allocation=s["allocation"],
                                     unit_costs=self.unit_costs, score=s["score"], ranking=s["ranking"])
            self.core = UPopCallback(self.masks, self.search)  # the UPop part of each step (upop.engine.callback)
            if resume is not None:
                self._load_search(resume, state.global_step)
        except BaseException:
            self.masks.remove()
            self.masks = self.search = self.core = None
            raise
        self.plan = None
        self._set_schedule(trainer, resume, retrain=False)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """After the last backward of an optimizer step: take the mask gradients (once per step)."""
        search = self.search
        if search is None or self.plan is not None or search.done:
            return
        scale, scaled = loss_scale(self.trainer.accelerator)
        self.core.grad_scale = lambda: (scale, scaled)
        self.core.add_sparsity_grad(scale)  # d/dzeta of w * |zeta|, in the loss scale of the task gradients
        self.core.after_backward(state.global_step, {})

    def on_step_end(self, args, state, control, **kwargs):
        if self.search is not None and self.plan is None and self.search.done:
            self._prune_and_switch(args)

    def on_save(self, args, state, control, **kwargs):
        """Write the search state (during the search) or make sure the plan is there (after)."""
        if not args.should_save or (self.search is None and self.plan is None):
            return
        folder = self._checkpoint_folder(args, state)
        if not folder.is_dir():
            raise CheckpointError(f"UPopTrainerCallback: the Trainer's checkpoint folder {show(folder)} is missing")
        if self.plan is None:
            torch_save_atomic({"format_version": SEARCH_FORMAT, "search_steps": self.search_steps,
                               "search": self.search.state_dict()}, folder / SEARCH_FILE)
        elif not (folder / PLAN_FILE).is_file():
            write_text_atomic(folder / PLAN_FILE, self.plan.to_json())

    # helpers ---------------------------------------------------------------------------------
    def _resolve_search_steps(self, state, dataloader, args) -> int:
        total = int(state.max_steps)
        (kind, value), = self._length.items()
        if kind == "search_steps":
            steps = int(value)
        elif kind == "search_fraction":
            steps = max(1, round(total * value))
        else:
            if dataloader is None or not hasattr(dataloader, "__len__"):
                raise ConfigError("search_epochs needs a train dataloader with a length; give search_steps instead")
            batches = len(dataloader)
            per_epoch = max(batches // args.gradient_accumulation_steps
                            + int(batches % args.gradient_accumulation_steps > 0), 1)
            steps = max(1, round(value * per_epoch))
        if steps > total:
            raise ConfigError(f"{kind}={show(value)} gives a search of {steps} optimizer steps, more than the run's "
                              f"max_steps={total}; lower it or train longer")
        return steps

    def _load_search(self, folder: Path, step: int) -> None:
        file = folder / SEARCH_FILE
        if not file.is_file():
            raise CheckpointError(f"{show(file)} is missing: resuming at step {step} of the search needs a checkpoint "
                                  "written by a run with UPopTrainerCallback")
        saved = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format_version") != SEARCH_FORMAT or "search" not in saved:
            raise CheckpointError(f"{show(file)}: not a upop search state (format {SEARCH_FORMAT})")
        if saved.get("search_steps") != self.search_steps:
            raise ConfigError(f"{show(file)} was saved by a search of {saved.get('search_steps')} steps; this run's "
                              f"search has {self.search_steps}; resume with the same length and max_steps")
        try:
            self.search.load_state_dict(saved["search"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{show(file)}: does not fit this model's groups ({exc})") from None
        if self.search.step_count != step:
            raise CheckpointError(f"{show(file)} is at search step {self.search.step_count}, the Trainer at {step}")

    def _prune_and_switch(self, args) -> None:
        """Prune in place, hand the optimizer the pruned parameters (fresh state), restart the schedule."""
        trainer = self.trainer
        model = trainer.model
        before = {id(p): name for name, p in model.named_parameters()}
        settings = {"search_steps": self.search_steps, "seed": args.seed,
                    "trainer": "transformers.Trainer"}
        if self.config.modalities != "all":
            settings["modalities"] = self.config.modalities
        plan = with_dense_groups(self.core.prune(model, settings=settings), self._every)
        swap_parameters(trainer.optimizer, before, dict(model.named_parameters()))
        rewrap_ddp(trainer)
        self.plan = plan
        self._set_schedule(trainer, None, retrain=True)

    def _set_schedule(self, trainer, resume: Path | None, retrain: bool) -> None:
        """The Trainer-made scheduler becomes a constant one (search) or the Trainer's own type over
        the retraining steps; on resume it takes the state the checkpoint saved."""
        if not getattr(trainer, "_created_lr_scheduler", False):
            return  # a scheduler the user passed to the Trainer is theirs
        optimizer = trainer.optimizer
        lrs = [g["lr"] for g in optimizer.param_groups]  # on resume: restored with the optimizer state
        if retrain:
            trainer.lr_scheduler = None
            trainer.create_scheduler(num_training_steps=max(1, trainer.state.max_steps - self.search_steps),
                                     optimizer=optimizer)
        else:
            trainer.lr_scheduler = get_constant_schedule(optimizer)
        saved = resume / "scheduler.pt" if resume is not None else None
        if saved is not None and saved.is_file():
            trainer.lr_scheduler.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
        trainer.callback_handler.lr_scheduler = trainer.lr_scheduler

    def _checkpoint_folder(self, args, state) -> Path:
        out = args.output_dir
        get = getattr(self.trainer, "_get_output_dir", None)
        if callable(get):
            out = get(trial=getattr(self.trainer, "_trial", None))
        return Path(out) / f"checkpoint-{state.global_step}"


def add_upop(trainer, ratio: float = 0.5, **kwargs) -> UPopTrainerCallback:
    """Create a :class:`UPopTrainerCallback` (``ratio`` and ``kwargs`` as its arguments), attach it
    to ``trainer`` and register it; ``trainer.train()`` then searches, prunes and retrains."""
    callback = UPopTrainerCallback(ratio, trainer=trainer, **kwargs)
    trainer.add_callback(callback)
    return callback


def prepare_resume(model: nn.Module, checkpoint_dir: str | os.PathLike) -> PruningPlan | None:
    """Shape dense ``model`` like the pruned model a Trainer checkpoint holds, before its weights load.

    A checkpoint written after the search has ``upop_plan.json``: the plan is replayed on ``model``
    (no weights change; they load next) and returned. A checkpoint of the search has none: nothing
    changes and None is returned. :func:`add_upop` / :meth:`UPopTrainerCallback.attach` call this
    by themselves when the Trainer loads a checkpoint; call it yourself only for a Trainer whose
    loading they cannot wrap (e.g. a subclass that loads checkpoints its own way).
    """
    return _prepare(model, checkpoint_dir, None)


def _prepare(model: nn.Module, checkpoint_dir, optimizer) -> PruningPlan | None:
    folder = Path(checkpoint_dir)
    if not (folder / PLAN_FILE).is_file():
        return None
    plan = read_plan(folder)
    current = getattr(model, "upop_plan", None)
    if current is not None:
        if current.to_dict()["groups"] != plan.to_dict()["groups"]:
            raise CheckpointError(f"{show(folder)}: its plan differs from the one this model was pruned with")
        return current
    before = {id(p): name for name, p in model.named_parameters()}
    apply_plan(model, plan)
    if optimizer is not None:  # an optimizer given to the Trainer over the dense parameters
        swap_parameters(optimizer, before, dict(model.named_parameters()))
    return plan


def _check_length(given: dict[str, Any]) -> None:
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number, got {show(value)}")
        if name == "search_steps" and (not isinstance(value, numbers.Integral) or value < 1):
            raise ConfigError(f"search_steps must be an integer >= 1, got {show(value)}")
        if name == "search_epochs" and not value > 0:
            raise ConfigError(f"search_epochs must be > 0, got {show(value)}")
        if name == "search_fraction" and not 0 < value <= 1:
            raise ConfigError(f"search_fraction must be in (0, 1], got {show(value)}")
