"""Run settings: :class:`UPopConfig`, validated on construction and mirrored by the CLI options, and
:class:`ResolvedSettings`, what one run runs with (frozen, versioned): every ``auto`` / unset default
decided once, with the reason, by :meth:`UPopConfig.resolve`. ``run.json``, the report and resume's
comparison read the resolved settings; ``compress``, its :class:`~upop.engine.run.Run` and the
Trainer callback get them passed down instead of deciding again."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from upop.errors import ConfigError, show
from upop.search.allocations import get_allocation
from upop.search.rankings import get_ranking, resolve_ranking
from upop.search.settings import ALLOCATIONS, COSTS, DISTILL_SETTINGS, METHODS, RANKING_SETTINGS, SCORES
from upop.tasks.registry import caches_teacher

PRECISIONS = ("fp32", "bf16", "fp16")

TRACKERS = ("none", "tensorboard", "wandb")
"""The ``report_to`` choices: Accelerate's trackers upop supports (or none)."""

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install 'upop[tracking]' (or pip install tensorboard)"),
                    "wandb": ("wandb", "pip install wandb")}
"""Per tracker: the package it needs and the command that installs it (:func:`check_tracker`)."""


MODALITY_NAMES = ("text", "vision", "fusion", "decoder")
"""The group modalities ``modalities`` may name: those of :data:`upop.arch.groups.MODALITIES` (kept here
too: this module imports no torch)."""


def modality_names(setting: object) -> tuple[str, ...] | None:
    """The modalities a ``modalities`` setting names, in its order, or None for ``"all"`` (every
    group); ValueError for anything but ``"all"`` or a comma list of :data:`MODALITY_NAMES`, each once
    (what :meth:`UPopConfig.validate` refuses)."""
    names = tuple(part.strip() for part in setting.split(",")) if isinstance(setting, str) else ()
    if names == ("all",):
        return None
    if not names or not all(n in MODALITY_NAMES for n in names) or len(set(names)) != len(names):
        raise ValueError(f"modalities={setting!r}: not all or a comma list of {', '.join(MODALITY_NAMES)}")
    return names


SEED_RANGE = (0, 2**32 - 1)
"""Seeds every generator takes (NumPy's are 32-bit)."""

INT_RANGES: dict[str, tuple[int, int]] = {
    "search_epochs": (1, 10_000), "retrain_epochs": (0, 10_000), "batch_size": (1, 65_536),
    "eval_batch_size": (1, 65_536), "interval": (1, 10**9), "round_to": (1, 4096), "seed": SEED_RANGE,
    "checkpoint_every": (1, 10**9), "workers": (0, 256), "latency_batch_size": (1, 4096), "itm_k": (1, 10_000),
    "vqa_k": (1, 10_000), "caption_beams": (1, 64), "progress_every": (1, 86_400), "block_length": (2, 1 << 20),
}
"""The documented range of every integer setting (checked by :meth:`UPopConfig.validate` and by the
command line's parser, and named in each option's help): far beyond any real run, small enough that
no value can overflow a generator, an allocation or a loop."""

LATENCY_TIME_RANGE = (0.01, 60.0)
"""Seconds ``latency_time`` may be: 3 x this is each model's timing budget (a round of 0 ms times nothing)."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest ``--config`` file read (1 MiB; a settings file is a few hundred bytes)."""
MAX_YAML_ALIASES = 16
MAX_YAML_DEPTH = 32
"""YAML aliases (``*name``) and nesting levels a config file may use: a flat mapping of settings
needs neither; a few aliases are allowed, a "billion laughs" alias bomb is refused while parsing."""


SETTINGS_VERSION = 1
"""Version of :class:`ResolvedSettings` as ``run.json``, the report and every run fingerprint store
it. Runs written before settings had a version are version 0; resume brings an older version to this
one by the explicit steps of :data:`upop.engine.resume.MIGRATIONS` and refuses a newer one."""

DECIDED = ("distill", "ranking", "interval", "retrain_lr", "workers", "round_to", "latency_batch_size")
"""The settings whose ``auto`` / unset default :meth:`UPopConfig.resolve` decides, each with a reason
(``round_to`` only once the model's groups are known: the run records it)."""

AUTO_INTS = ("round_to", "latency_batch_size")
"""Integer settings that may also be ``"auto"`` (decided by :meth:`UPopConfig.resolve` or the run)."""

LATENCY_BATCH_GPU = 32
"""``latency_batch_size="auto"`` on an accelerator: batch 1 is launch-bound on a modern GPU (the time is
the kernels' launches, not their work), so pruned and dense models time alike; 32 is a deploy batch
at which the work shows. On the CPU ``auto`` is 1 (what runs and the benchmarks timed before)."""

DECIDED_LATER = {"latency_batch_size": "recorded before latency_batch_size was decided: the value the run set"}
"""Decided settings added to :data:`DECIDED` after :data:`SETTINGS_VERSION` 1 was written: a run.json of
that version lacks their reason; :meth:`ResolvedSettings.from_dict` fills it with this one."""

UNSET_DEFAULTS = ("interval", "retrain_lr", "workers", "itm_k", "block_length")
"""Settings that may be left unset (None): a default is decided for them (``itm_k`` by the BLIP
retrieval evaluation, from the test split's size; ``block_length`` by the lm task, from the tokenizer
and the model)."""

AS_SET = "as set"
"""The reason of a decided setting the user set."""

def _f(default, help: str, **kw):
    """A setting: its default, its help line and metadata (``choices``; ``task=True`` for a task
    setting; ``group``: the section of ``upop compress --help`` it is listed in)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class UPopConfig:
    """Settings of one UPop run (search -> prune -> retrain). Defaults suit the demo model; the
    published settings per task are in docs/method.md (METHOD section 5)."""

    ratio: float = _f(0.5, "share of the prunable cost to remove, in (0, 1); 0.5 = '2x', 0.75 = '4x'", group="search")
    method: str = _f("upop", "upop (progressive) or one-shot (masks cut to 0 at once after the search)", choices=METHODS,
                     group="search")
    allocation: str = _f("unified", "unified (one ranking across modalities and layers, UPop) or uniform "
                         "(the same ratio in every layer: the paper's non-unified ablation)", choices=ALLOCATIONS,
                         group="search")
    modalities: str = _f("all", "the modalities whose groups the search ranks and prunes: all (every group: UPop's "
                         "unified search) or a comma list of text, vision, fusion, decoder (e.g. text: the language "
                         "model of a vision-language model only, as NVIDIA ModelOpt prunes it); the groups of the "
                         "other modalities get no mask and stay dense, and --ratio is then a share of the searched "
                         "groups' cost, not the whole model's", group="search")
    cost: str = _f("params", "budget the ratio is measured in: params (exact counts), flops, or latency (time per "
                   "unit measured at the run's start on its device, --latency-batch-size and --eval-precision; "
                   "cached in the run folder; with the taylor or fisher score, units are then ranked by importance per "
                   "millisecond)", choices=COSTS, group="search")
    search_epochs: int = _f(2, "epochs of the search phase (weights train, masks are searched)", group="search")
    retrain_epochs: int = _f(2, "epochs of retraining the compressed model (best on validation kept)", group="training")
    batch_size: int = _f(32, "training batch size per process", group="training")
    eval_batch_size: int = _f(64, "evaluation batch size", group="data")
    lr: float = _f(1e-5, "learning rate of the search phase (constant)", group="training")
    retrain_lr: float | None = _f(None, "peak learning rate of retraining (cosine schedule); default: --lr",
                                  group="training")
    weight_decay: float = _f(0.0, "AdamW weight decay", group="training")
    interval: int | None = _f(None, "search steps between mask updates; default: the steps per 1%% of compression",
                              group="search")
    score: str = _f("taylor", "what ranks the units: taylor (the accumulated |gradient x mask|, first-order Taylor "
                    "importance; upop's default: it beat the paper's score at 2x, 4x and 8x on the transfer "
                    "benchmark), gradient (the paper: the accumulated mask gradient, dL/dzeta summed over steps) or "
                    "fisher (the accumulated squared gradient); same schedule, selection and projection",
                    choices=SCORES, group="search")
    ranking: str = _f("auto", "what orders the units: auto (per-cost with --cost latency and the taylor or fisher "
                      "score, else score), score (the paper: the scores alone, standardised per structure type) or "
                      "per-cost (importance per unit of cost, least first; needs --score taylor or fisher)",
                      choices=RANKING_SETTINGS, group="search")
    distill: str = _f("auto", "distillation from the dense model during search and retraining: auto (upop's default: "
                      "logits where the teacher can be cached, i.e. retrieval with --distill-cache, where it is free "
                      "and gained 1.4-3.0 points on benchmarks/transfer.py; none elsewhere, where it costs a teacher "
                      "forward per step), none, logits (the task's outputs: retrieval's image-text similarities both "
                      "ways, VQA/caption token distributions, class and per-pixel logits) or logits+hidden (plus "
                      "every block's output, the residual stream pruning keeps); the teacher is a frozen copy of the "
                      "dense model", choices=DISTILL_SETTINGS, group="distill")
    distill_weight: float = _f(4.0, "weight of the distillation term added to the task loss (4: on "
                                    "benchmarks/transfer.py better than 1 at 2x, 4x and 8x, and than 16 at 4x and 8x)",
                                group="distill")
    distill_temperature: float = _f(1.0, "temperature of the distillation KL (the loss is scaled by its square)",
                                    group="distill")
    teacher_precision: str = _f("fp32", "dtype the distillation teacher is held and run in: fp32, or bf16 (half "
                                "the memory)", choices=("fp32", "bf16"), group="distill")
    distill_cache: bool = _f(True, "with --distill logits (or auto) on CLIP / SigLIP / BLIP retrieval, embed every training image "
                             "and caption with the frozen teacher once and form each step's teacher similarities "
                             "from those embeddings (one teacher pass over the data instead of a teacher forward "
                             "per step); with --task distill on a two-tower model, its embeddings of every training item "
                             "likewise; false: the teacher runs every step (and --distill auto distils nothing)",
                             group="distill")
    w_attn: float = _f(6.4e-3, "weight of the L1 term on attention masks", group="search")
    w_mlp: float = _f(2e-4, "weight of the L1 term on MLP masks", group="search")
    round_to: int | str = _f("auto", "every group keeps a multiple of this many units: auto (8, the width kernels "
                             "are fast at, smaller only for groups too narrow for it; the report says which), or a "
                             "number; 1 = any width (the paper)", group="search")
    granularity: str = _f("head-dim", "what an attention unit is: head-dim (the paper: channel j of every head; "
                          "pruning narrows head_dim, and odd head widths run slower in GPU fused attention kernels), "
                          "head (whole heads: head_dim stays at its dense size, such as 64 or 128, where fused "
                          "attention kernels are fastest on GPUs, and fewer heads do proportionally less attention "
                          "work; coarser units, so the search has fewer choices; round_to auto is then 1) or both "
                          "(heads and channels ranked together with exact costs: pruning removes heads AND narrows "
                          "head_dim; the most freedom for the search, but fused GPU attention kernels prefer head_dim "
                          "64 or 128, so head is the choice for GPU speed; round_to rounds channels, never heads). "
                          "MLP units are neurons in every case", choices=("head-dim", "head", "both"), group="search")
    augment: str = _f("deit", "training augmentation of the vision tasks: deit (the papers' recipes: classification "
                      "DeiT's crop, flip, RandAugment, random erasing, mixup/cutmix and label smoothing 0.1; "
                      "segmentation mmseg's random resize, crop, flip and photometric distortion) or none (the "
                      "processor's resize only)", choices=("deit", "none"), group="training")
    seed: int = _f(0, "random seed (data order, caption choice, dropout)", group="training")
    checkpoint_every: int = _f(200, "steps between resumable checkpoints", group="run")
    workers: int | None = _f(None, "DataLoader worker processes that read, decode and collate training and evaluation "
                             "batches ahead of the step (the batches are the same for any value); default: 0 on CPU, "
                             "where they would compete with the compute threads, min(4, usable cores per process on "
                             "the node - 1) with a GPU",
                             group="devices")
    precision: str = _f("fp32", "training precision: fp32, bf16 or fp16", choices=PRECISIONS, group="devices")
    eval_precision: str = _f("fp32", "precision of evaluations (dense, validation, final) and of the latency: fp32, or "
                             "bf16 autocast", choices=("fp32", "bf16"), group="devices")
    tf32: bool = _f(True, "on CUDA (Ampere and newer), fp32 matmuls and convolutions use TF32: much faster, about "
                    "1e-3 relative precision; false keeps exact fp32 (no effect on CPU)", group="devices")
    gradient_checkpointing: bool = _f(False, "recompute each block's activations during the backward pass instead of "
                                      "keeping them from the forward (transformers' gradient checkpointing, non-reentrant, "
                                      "with the masks; search and retraining): much less activation memory for about one "
                                      "more forward per step; weights, gradients and AdamW's states stay as they are; "
                                      "refused for a model class without supports_gradient_checkpointing",
                                      group="devices")
    max_grad_norm: float | None = _f(None, "clip gradients to this norm (default: no clipping)", group="training")
    latency_batch_size: int | str = _f("auto", "batch size of the latency timings (the report's paired latency and "
                                       "the --cost latency unit table): auto (32 on a GPU, where batch 1 is "
                                       "launch-bound and hides what pruning saves; 1 on the CPU), or a number",
                                       group="devices")
    # task settings: how a task trains and evaluates (read by Task.configure; also options of `upop evaluate`)
    itm_k: int | None = _f(None, "BLIP retrieval: ITC candidates per query re-ranked by ITM (BLIP's k_test); default: "
                           "256 when the test split has more than 2,000 images (COCO-sized), else 128 (Flickr30K-sized)",
                           task=True, group="data")
    vqa_inference: str = _f("auto", "VQA evaluation: rank (BLIP: score the answer list, keep the best of the top "
                            "--vqa-k) or generate (free decoding); auto: rank for BLIP, generate for a chat "
                            "model (LLaVA)", choices=("auto", "rank", "generate"), task=True,
                            group="data")
    vqa_k: int = _f(128, "VQA rank inference: answer candidates re-scored per question (BLIP's k_test)", task=True,
                     group="data")
    answer_list: str | None = _f(None, "VQA rank inference: JSON list of candidate answers (VQAv2's answer_list.json); "
                                 "default: answer_list.json in the data folder, else the training answers", task=True,
                                 group="data")
    caption_beams: int = _f(3, "captioning: beams of the decoding (BLIP: 3, prompt 'a picture of ', 5-20 tokens); "
                            "1 = greedy", task=True, group="data")
    block_length: int | None = _f(None, "language modelling (task lm): tokens per document, a longer one is cut "
                                  "(at least 2: the first token predicts the second); never more than the model's "
                                  "max_position_embeddings; default: the smallest of the tokenizer's model_max_length, "
                                  "the model's max_position_embeddings and 512", task=True, group="data")
    eval_mode: str = _f("slide", "segmentation evaluation: slide (Segmenter/mmseg: shorter side resized to the model "
                        "input, sliding windows) or whole (the image resized to the model input); both score at the "
                        "original resolution", choices=("slide", "whole"), task=True, group="data")
    latency_time: float = _f(0.5, "latency timing: each model (dense and compressed) is timed for 3 x this many "
                             "seconds in all, over 7 interleaved rounds", group="devices")
    report_to: str = _f("none", "experiment tracker that also receives the run's numbers (losses, learning rate, "
                        "validation metrics, phase times; all of them are in OUT/log.jsonl), written under "
                        "OUT/tracking: none, tensorboard (needs the tensorboard package: pip install 'upop[tracking]') "
                        "or wandb (needs wandb: pip install wandb), through Accelerate's trackers",
                        choices=TRACKERS, group="run")
    progress_every: int = _f(60, "without progress bars (--no-progress, or progress=False): seconds between the "
                             "progress lines of the search and the retraining (phase, step/total, loss, elapsed), "
                             "logged to the 'upop' logger", group="run")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse a value that is not allowed, in one line: ``name=value is not allowed; name must be
        ...``. The one check of these settings: ``compress``, ``evaluate`` and the Trainer callback
        (:class:`upop.integrations.transformers.callback.UPopTrainerCallback`) all validate here."""
        def bad(name, must, then: str = ""):
            raise ConfigError(f"{name}={show(getattr(self, name))} is not allowed; {name} must be {must}{then}")

        if not 0.0 < _real(self.ratio, math.nan) < 1.0:
            bad("ratio", "a number in (0, 1), e.g. 0.5 for 2x")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, "one of the listed values", f"; choose one of: {', '.join(choices)}")
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is None and name in UNSET_DEFAULTS or name in AUTO_INTS and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                unset = " (or leave unset)" if name in UNSET_DEFAULTS else ""
                bad(name, f"{'auto or ' if name in AUTO_INTS else ''}an integer in [{low}, {high}]{unset}")
        try:
            modality_names(self.modalities)
        except ValueError:
            bad("modalities", f"all or a comma list of {', '.join(MODALITY_NAMES)}, each once")
        if not get_allocation(self.allocation).rounds and self.round_to not in ("auto", 1):
            bad("round_to", f"auto or 1 with the {self.allocation} allocation, which does not round widths")
        resolve_ranking(self.score, None if self.ranking == "auto" else self.ranking, self.cost)  # per-cost needs an unsigned score
        if self.granularity != "head-dim" and self.cost == "latency":  # the latency table times head widths only
            bad("granularity", "head-dim with cost=latency (the latency table times head-dim channels only)",
                "; or use cost params or flops")
        if self.answer_list is not None and not isinstance(self.answer_list, (str, os.PathLike)):
            bad("answer_list", "a file path (or leave unset)")
        for name in ("lr", "retrain_lr"):
            value = getattr(self, name)
            if value is None and name in UNSET_DEFAULTS:
                continue
            if not 0.0 < _real(value, math.nan) < 1.0:
                bad(name, "a positive number below 1")
        if not 0 < _real(self.distill_temperature, math.nan) < math.inf:
            bad("distill_temperature", "a finite number > 0")
        for name in ("weight_decay", "w_attn", "w_mlp", "distill_weight"):
            value = getattr(self, name)
            if not 0 <= _real(value, math.nan) < math.inf:
                bad(name, "a finite number >= 0")
        if self.distill != "none" and self.distill_weight == 0:
            bad("distill_weight", f"> 0 with distill={self.distill} (a zero weight runs the teacher for nothing)",
                "; for no distillation use distill none")
        low, high = LATENCY_TIME_RANGE
        if not low <= _real(self.latency_time, math.nan) <= high:
            bad("latency_time", f"a number of seconds in [{low}, {high:g}]")
        if not isinstance(self.tf32, bool):
            bad("tf32", "true or false")
        if not isinstance(self.distill_cache, bool):
            bad("distill_cache", "true or false")
        if not isinstance(self.gradient_checkpointing, bool):
            bad("gradient_checkpointing", "true or false")
        if self.max_grad_norm is not None and not 0 < _real(self.max_grad_norm, math.nan) < math.inf:
            bad("max_grad_norm", "a positive finite number (or leave unset)")

    def resolve(self, task=None, *, device_type: str = "cpu", processes: int = 1, search_steps: int | None = None,
                length: str = "") -> "ResolvedSettings":
        """The settings a run of ``task`` (a :class:`~upop.tasks.Task`, its name, or None for a loop
        without a task such as a Trainer's) runs with: every ``auto`` / unset default decided here,
        once, with its reason (:data:`DECIDED`), after :meth:`validate`.

        ``device_type`` (``"cuda"``, ``"cpu"``) and ``processes`` are the run's; ``search_steps`` its
        search length in optimizer steps (None: not known yet, ``interval`` stays unset), described
        by ``length`` in the error of a progressive search no longer than its interval (the one
        cross-field rule that needs the run's length). ``round_to="auto"`` also needs the model's
        groups: the run decides it (:func:`upop.search.settings.resolve_round_to`) and records it with
        :meth:`ResolvedSettings.decide`. The settings are valid (checked on construction; a caller that
        changed them since calls :meth:`validate` first, as ``compress`` does)."""
        named = task is None or isinstance(task, str)  # a name does not say whether the task learns from a teacher
        name, needs_teacher = (task, False) if named else (task.name, task.needs_teacher)
        decisions = {
            "distill": decide_distill(self.distill, name, self.distill_cache, needs_teacher=needs_teacher),
            "ranking": decide_ranking(self.ranking, self.cost, self.score),
            "interval": decide_interval(self.interval, search_steps, self.ratio),
            "retrain_lr": (self.lr, "unset: the search's lr") if self.retrain_lr is None else (self.retrain_lr, AS_SET),
            "workers": decide_workers(self.workers, device_type, processes),
            "round_to": (self.round_to, AS_SET if self.round_to != "auto" else
                         "auto: decided by the run from the model's groups and its device"),
            "latency_batch_size": decide_latency_batch(self.latency_batch_size, device_type),
        }
        interval = decisions["interval"][0]
        if self.method == "upop" and search_steps is not None and interval >= search_steps:
            error = ConfigError(
                f"the search has {search_steps} steps{f' ({length})' if length else ''} and interval={interval}: a "
                "progressive search needs more steps than its interval; lengthen the search (more data or search "
                "epochs, a smaller batch size), lower the interval, or use method one-shot")
            error.shared = True  # every process finds it: the main process says so
            raise error
        given = self.to_dict()
        return ResolvedSettings(given=given, values={**given, **{k: v for k, (v, _) in decisions.items()}},
                                why={k: why for k, (_, why) in decisions.items()}, task=name,
                                search_steps=search_steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "UPopConfig":
        """The settings of ``data`` (setting name -> value). A numeric string is read as the
        number it spells for a number setting (YAML 1.1 reads ``lr: 1e-5`` as the string
        ``"1e-5"``); anything else keeps its value and is checked by :meth:`validate`."""
        names = {f.name: f for f in fields(cls)}
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise ConfigError(f"{source}: setting names must be text, got {show(odd[0])}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            shown = ", ".join(show(k, 60) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5
                                                                  else "")
            raise ConfigError(f"{source}: unknown setting(s) {shown}; known: {', '.join(sorted(names))}")
        return cls(**{k: _from_text(names[k].type, v) for k, v in data.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "UPopConfig":
        """The settings of a YAML file: a mapping of setting names (``-`` or ``_``) to values.
        The file must be a regular UTF-8 file of at most :data:`MAX_CONFIG_BYTES`; YAML aliases
        and nesting are limited (:data:`MAX_YAML_ALIASES`, :data:`MAX_YAML_DEPTH`)."""
        data = load_yaml_file(path, "config file")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {show(Path(path))}: expected a mapping of settings, got "
                              f"{type(data).__name__}")
        return cls.from_dict({k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()},
                             source=f"config file {show(Path(path))}")


def decide_distill(setting: str, task: str | None, cache: bool = True, *, needs_teacher: bool = False
                   ) -> tuple[str, str]:
    """The distillation mode ``setting`` stands for in a run of ``task``, and why: ``"auto"`` is
    ``"logits"`` where the teacher can be cached (a task registered with ``teacher_cache=True``,
    :func:`upop.tasks.registry.caches_teacher`; with ``distill_cache`` on) and
    ``"none"`` elsewhere, where distilling costs a teacher forward per step; a mode stands for itself.
    (A run whose teacher table turns out too large for host memory still distils nothing under
    ``"auto"``: the run reports it, :meth:`upop.engine.run.Run`.)"""
    if setting != "auto":
        return setting, AS_SET
    if needs_teacher:
        return "none", f"auto: task {task} learns from the teacher itself (its loss is the agreement with it)"
    if caches_teacher(task):
        return ("logits", f"{task} with the cached teacher: no teacher forward per step") if cache else \
            ("none", "off: --distill-cache false")
    if task is None:
        return "none", "off: without a task the teacher would run every step; pass distill logits to distil"
    return "none", f"off: task {task} would run the teacher every step; pass --distill logits to distil"


def decide_ranking(setting: str, cost: str, score: str) -> tuple[str, str]:
    """The ranking ``setting`` stands for, and why (:func:`upop.search.rankings.resolve_ranking`)."""
    if setting != "auto":
        return setting, AS_SET
    name = resolve_ranking(score, None, cost)
    return name, f"auto with cost {cost} and the {score} score: {get_ranking(name).summary}"


def decide_interval(setting: int | None, search_steps: int | None, ratio: float) -> tuple[int | None, str]:
    """Search steps between mask updates, and why: ``setting``, or the steps per 1% of compression
    (METHOD section 5's rule of thumb), at most ``search_steps - 1`` so that a progressive search updates
    before its last step; None while the search length is not known."""
    if setting is not None:
        return setting, AS_SET
    if search_steps is None:
        return None, "unset: the steps per 1% of compression, decided when the search length is known"
    n = max(1, min(round(search_steps / (100 * ratio)), search_steps - 1))
    return n, f"unset: the steps per 1% of compression, {search_steps} search steps / (100 x ratio {ratio:g})"


def decide_latency_batch(setting: int | str, device_type: str) -> tuple[int, str]:
    """The batch of the latency timings, and why: ``setting``, or for ``"auto"`` 1 on the CPU and
    :data:`LATENCY_BATCH_GPU` on an accelerator (``device_type`` ``"cuda"`` and any other non-CPU type)."""
    if setting != "auto":
        return setting, AS_SET
    if device_type == "cpu":
        return 1, "auto: 1 on CPU (one sample already keeps the cores busy; what runs timed before)"
    return LATENCY_BATCH_GPU, (f"auto: {LATENCY_BATCH_GPU} on {device_type.upper()}, where batch 1 is launch-bound "
                               "(kernel launches, not work, set the time) and would hide what pruning saves")


def decide_workers(setting: int | None, device_type: str, processes: int) -> tuple[int, str]:
    """DataLoader worker processes, and why: ``setting``, or 0 without a GPU (they would compete
    with the compute threads), else min(4, cores per process on this node - 1), the cores being
    those this process may run on (:func:`usable_cores`: a job scheduler's or ``taskset``'s CPU set, not the
    machine's count)."""
    if setting is not None:
        return setting, AS_SET
    if device_type != "cuda":
        return 0, f"unset: 0 on {device_type.upper()}, where workers would compete with the compute threads"
    cores = usable_cores()
    local = local_processes(processes)
    return max(0, min(4, cores // local - 1)), \
        f"unset: min(4, {cores} usable cores / {local} process{'es' if local != 1 else ''} on this node - 1) beside a GPU"


def local_processes(processes: int) -> int:
    """The processes sharing this node's cores: ``LOCAL_WORLD_SIZE`` as torchrun and Accelerate set
    it, else ``processes`` (one node)."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ""))
    except ValueError:
        local = processes
    return max(1, min(local, processes) if local > 0 else processes)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity set where the OS has one, else the
    machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1



def check_tracker(report_to: str) -> None:
    """Refuse a ``report_to`` tracker whose package is not installed, in one line naming the pip
    command (checked when a run starts, not by :meth:`UPopConfig.validate`: a finished run's
    settings stay readable on a machine without its tracker)."""
    package, install = TRACKER_PACKAGES.get(report_to, (None, ""))
    if package is None:
        return
    from importlib.util import find_spec

    if find_spec(package) is None:
        raise ConfigError(f"report_to={show(report_to)} is not allowed here: the {package} package is not "
                          f"installed; install it with {install}, or use report_to none")

@dataclass(frozen=True)
class ResolvedSettings:
    """The settings one run runs with (made by :meth:`UPopConfig.resolve`): frozen, versioned.

    ``given`` holds the settings as given, ``values`` the same with every ``auto`` / unset default of
    :data:`DECIDED` decided, ``why`` the reason of each decision (:data:`AS_SET` where the user set
    it). ``task`` and ``search_steps`` are what the decisions were made for. ``run.json`` and the
    report store :meth:`to_dict`; resume compares them (:mod:`upop.engine.resume`)."""

    given: Mapping[str, Any]
    values: Mapping[str, Any]
    why: Mapping[str, str]
    task: str | None = None
    search_steps: int | None = None
    version: int = SETTINGS_VERSION

    def __post_init__(self):
        for name in ("given", "values", "why"):  # read-only views of private copies
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def __getitem__(self, name: str) -> Any:
        """The decided value of setting ``name``."""
        return self.values[name]

    def decide(self, name: str, value: Any, why: str) -> "ResolvedSettings":
        """These settings with ``name`` decided as ``value`` for the reason ``why`` (a decision that
        needs the model, such as ``round_to="auto"``); the object itself stays as it is."""
        if name not in DECIDED:
            raise ValueError(f"{name!r} is not a decided setting (decided: {', '.join(DECIDED)})")
        return dataclasses.replace(self, values={**self.values, name: value}, why={**self.why, name: why})

    def config(self) -> UPopConfig:
        """A :class:`UPopConfig` of the decided values (what the run's loops read)."""
        return UPopConfig(**self.values)

    def decisions(self) -> dict[str, dict[str, Any]]:
        """Per decided setting: ``{"setting": as given, "used": decided value, "why": reason}``."""
        return {name: {"setting": self.given[name], "used": self.values[name], "why": self.why[name]}
                for name in DECIDED}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: ``version``, ``task``, ``search_steps``, ``given``, ``values``, ``why``."""
        return {"version": self.version, "task": self.task, "search_steps": self.search_steps,
                "given": dict(self.given), "values": dict(self.values), "why": dict(self.why)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "settings") -> "ResolvedSettings":
        """The settings :meth:`to_dict` wrote; another version, or anything else, is one
        :class:`ConfigError` line naming ``source``."""
        version = data.get("version") if isinstance(data, dict) else None
        if version != SETTINGS_VERSION:
            raise ConfigError(f"{source}: settings version {show(version)} is not this upop's ({SETTINGS_VERSION}); "
                              "read them with the upop that wrote them")
        parts = {k: data.get(k) for k in ("given", "values", "why")}
        if isinstance(parts["why"], dict) and isinstance(parts["values"], dict):
            parts["why"] = {**{k: why for k, why in DECIDED_LATER.items() if k in parts["values"]}, **parts["why"]}
        if not all(isinstance(v, dict) for v in parts.values()) or set(parts["why"]) != set(DECIDED):
            raise ConfigError(f"{source}: not upop's resolved settings (given, values and why of {', '.join(DECIDED)})")
        UPopConfig.from_dict(parts["values"], source=source)  # every value checked
        return cls(**parts, task=data.get("task"), search_steps=data.get("search_steps"))


def _real(value, otherwise: float) -> float:
    """``value`` as a float if it is an int or float (not a bool), else ``otherwise``; an int too
    large for a float is infinite (so range checks refuse it instead of overflowing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return otherwise
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


_NUMERIC = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d{1,20}")


def _from_text(annotation: str, value):
    """``value``, or the number a numeric string spells where the setting (of type
    ``annotation``) is a number: ``"1e-5"`` -> 1e-05 for a float, ``"3"`` -> 3 for an int."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    kinds = {part.strip() for part in str(annotation).split("|")}
    if "float" in kinds and len(text) <= 64 and _NUMERIC.fullmatch(text):
        return float(text)
    if "int" in kinds and _INTEGER.fullmatch(text):
        return int(text)
    return value


def load_yaml_file(path: str | os.PathLike, what: str):
    """Parse the YAML file ``path`` safely and boundedly: a regular UTF-8 file of at most
    :data:`MAX_CONFIG_BYTES`, at most :data:`MAX_YAML_ALIASES` aliases and
    :data:`MAX_YAML_DEPTH` levels (refused while composing, before anything is built); every
    problem is one ConfigError line naming the file."""
    import yaml

    from upop.data._files import decode_utf8, read_limited

    path = Path(path)
    text = decode_utf8(read_limited(path, MAX_CONFIG_BYTES, what, ConfigError), path, what, ConfigError)
    loader = _bounded_loader_class()(text, f"{what} {show(path)}")
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what} {show(path)} is not valid YAML ({show(first, 120)})") from None
    finally:
        loader.dispose()


@functools.lru_cache(maxsize=None)
def _bounded_loader_class():
    """PyYAML's safe loader with limits (built on first use: PyYAML is imported only then)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """PyYAML's safe loader counting aliases and nesting while it composes the document."""

        def __init__(self, stream, where: str):
            super().__init__(stream)
            self.where, self.aliases, self.depth = where, 0, 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise ConfigError(f"{self.where} uses more than {MAX_YAML_ALIASES} YAML aliases (*name); refused "
                                      "as a possible alias bomb (a config file is a flat mapping of settings)")
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise ConfigError(f"{self.where} nests deeper than {MAX_YAML_DEPTH} levels (a config file is a "
                                      "flat mapping of settings)")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader




def config_fields(task_only: bool = False):
    """(name, default, help, choices) of every setting (or only the task settings), for the CLI."""
    for f in fields(UPopConfig):
        if task_only and not f.metadata.get("task"):
            continue
        default = f.default if f.default is not MISSING else None
        yield f.name, default, f.metadata.get("help", ""), f.metadata.get("choices")
