"""Distillation from the dense model during search and retraining (``--distill``).

The teacher is a frozen copy of the dense model (:func:`make_teacher`: eval mode, no gradients,
optionally bf16, on the run's device; under several processes each one holds its own). A task
*exposes* the outputs worth distilling while it computes its loss (:func:`expose`): CLIP, SigLIP
and BLIP retrieval the image-text similarity matrix (distilled both ways: affinity mimicking),
VQA and captioning the decoder's token logits, NLVR and classification the class logits,
segmentation the per-pixel logits. :class:`Distiller` runs the same task loss on the teacher under
``torch.no_grad`` (with the random state forked, so the student's dropout and negatives are the
same as without distillation), pairs the exposed tensors by name and adds

- ``logits``: ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the class axis of every
  exposed tensor, averaged over its rows (for a similarity matrix, over the rows and the columns);
- ``logits+hidden``: plus the mean over transformer blocks of
  ``||h_s - h_t||^2 / ||h_t||^2`` on the residual stream (each block's output), whose width
  pruning keeps, so no projection is needed.

The distillation term is weighted by ``distill_weight`` and added to the task loss.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from upop.config import decide_distill
from upop.search.settings import DISTILL_MODES as MODES
from upop.search.settings import DISTILL_SETTINGS as SETTINGS  # noqa: F401 (what UPopConfig.distill accepts)


def resolve(setting: str, task: str | None, cache: bool = True) -> str:
    """The mode ``setting`` stands for in a run of ``task`` (:func:`upop.config.decide_distill`, the
    one rule; a run reads it from its resolved settings)."""
    return decide_distill(setting, task, cache)[0]


#: the tensors exposed by the current student (or teacher) pass, or None outside a recording
_RECORDING: list[dict[str, tuple[torch.Tensor, int, torch.Tensor | None]]] = []


def make_teacher(model: nn.Module, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen deep copy of ``model``: eval mode, ``requires_grad`` False, on ``device`` (default:
    where ``model`` is) and in ``dtype`` (default: unchanged). Masks attached to ``model`` later
    do not reach the copy."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    if device is not None or dtype is not None:
        teacher.to(device=device, dtype=dtype)
    return teacher


def expose(name: str, tensor: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None) -> None:
    """Offer ``tensor`` (logits over axis ``dim``) for distillation under ``name``; ``mask``
    (broadcastable to ``tensor`` without ``dim``) marks the positions that count. Does nothing
    unless a :class:`Distiller` is recording (the tasks call it unconditionally)."""
    if _RECORDING:
        _RECORDING[-1][name] = (tensor, dim, mask)


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions of a decoder's logits that predict a scored token: logit ``i`` predicts label
    ``i + 1`` (the HF text decoders shift by one), and labels of -100 are not scored."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def exposes_similarity(name: str) -> bool:
    """Exposed names starting with ``affinity`` are similarity matrices, distilled both ways."""
    return name.startswith("affinity")


#: > 0 while a task computes something the teacher cannot replay with the same inputs
_PAUSED: list[bool] = []


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Block outputs computed inside are not distilled (e.g. BLIP's ITM over hard negatives, which
    the student and the teacher mine from their own similarities)."""
    _PAUSED.append(True)
    try:
        yield
    finally:
        _PAUSED.pop()


def recording() -> bool:
    """True while a :class:`Distiller` records what the task exposes."""
    return bool(_RECORDING)


@contextlib.contextmanager
def expose_output(module: nn.Module, name: str, mask: torch.Tensor | None = None) -> Iterator[None]:
    """Expose the ``logits`` of ``module``'s output under ``name`` when it runs inside (for models
    whose forward does not return them, e.g. BLIP VQA's answer decoder)."""
    if not _RECORDING:
        yield
        return

    def hook(mod, args, output):
        logits = getattr(output, "logits", None)
        if logits is not None:
            expose(name, logits, -1, mask)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _record() -> Iterator[dict]:
    box: dict = {}
    _RECORDING.append(box)
    try:
        yield box
    finally:
        _RECORDING.pop()


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, dim: int = -1,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 KL(p_t || p_s)`` of the softmaxes over ``dim`` at temperature ``T``, averaged over the
    other positions (those where ``mask`` is true, if given). Zero iff the distributions agree."""
    s = F.log_softmax(student.float() / temperature, dim=dim)
    t = F.log_softmax(teacher.float() / temperature, dim=dim)
    per = (t.exp() * (t - s)).sum(dim=dim)
    if mask is not None:
        mask = mask.to(per.device).expand_as(per).float()
        return (per * mask).sum() / mask.sum().clamp_min(1.0) * temperature**2
    return per.mean() * temperature**2


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ``||h_s - h_t||^2 / ||h_t||^2`` (relative squared error)."""
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


@contextlib.contextmanager
def teacher_pass(device: torch.device, bf16: bool = False) -> Iterator[None]:
    """Where the teacher runs: no gradients, under bf16 autocast for a bf16 teacher, and on a forked
    random state, so the student's draws (dropout, negatives) are those of a run without distillation."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        yield


def distillation_term(student: dict[str, tuple[torch.Tensor, int, torch.Tensor | None, bool]],
                      teacher: dict[str, torch.Tensor], weight: float, temperature: float,
                      hidden: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distillation term, ``weight * sum of parts``, and its parts: the one computation of
    :class:`Distiller` (a task's exposed tensors) and the Trainer's hook (the model output's logits).

    ``student`` maps a name to ``(logits, class axis, scored positions or None, both ways)``; each
    name the ``teacher`` also has gives :func:`kl_logits` at ``temperature`` (a similarity matrix,
    ``both ways``, averaged over its rows and its columns). ``hidden`` (student's and teacher's block
    outputs) adds :func:`hidden_loss` as the part ``"hidden"``. A shape mismatch, or nothing to distil,
    is a bug (``RuntimeError``)."""
    parts: dict[str, torch.Tensor] = {}
    for name, (s, dim, mask, both_ways) in student.items():
        if name not in teacher:
            continue
        t = teacher[name].detach()
        if s.shape != t.shape:
            raise RuntimeError(f"distillation: the student's {name!r} has shape {tuple(s.shape)}, the teacher's "
                               f"{tuple(t.shape)}; this is a bug, please report it")
        term = kl_logits(s, t, temperature, dim, mask)
        if both_ways:  # rows (image->text) and columns (text->image)
            term = (term + kl_logits(s.t(), t.t(), temperature, -1)) / 2
        parts[name] = term
    if hidden is not None:
        hs, ht = hidden
        if len(hs) != len(ht) or any(a.shape != b.shape for a, b in zip(hs, ht)):
            raise RuntimeError(f"distillation: the student ran {len(hs)} blocks, the teacher {len(ht)}; "
                               "this is a bug, please report it")
        if hs:
            parts["hidden"] = hidden_loss(hs, [h.detach() for h in ht])
    if not parts:
        raise RuntimeError("distillation: the task exposed nothing to distil; this is a bug, please report it")
    return weight * torch.stack(list(parts.values())).sum(), parts


class _BlockOutputs:
    """Forward hooks collecting the output of every transformer block (the residual stream), in
    call order, while active."""

    def __init__(self, model: nn.Module, blocks: list[str]):
        self.outputs: list[torch.Tensor] = []
        self.active = False
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook) for name in blocks]

    def _hook(self, module, args, output) -> None:
        if self.active and not _PAUSED:
            hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            if torch.is_tensor(hidden):
                self.outputs.append(hidden)

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[torch.Tensor]]:
        self.outputs, self.active = [], True
        try:
            yield self.outputs
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def block_names(model: nn.Module) -> list[str]:
    """Qualified names of the transformer blocks of ``model``: the modules holding the MLP groups
    (an MLP group's ``module`` is its block), in model order."""
    from upop.arch import find_groups

    return [g.module for g in find_groups(model) if g.kind == "mlp"]


class Distiller:
    """The distillation term of a run: ``weight * (KL on exposed logits [+ hidden-state loss])``.

    ``task_loss(model, batch)`` is the task's loss function. :meth:`loss` runs it on the student
    (recording what it exposes and, for ``logits+hidden``, every block's output), then on the
    teacher, and returns ``(task loss, distillation term)``.
    """

    def __init__(self, teacher: nn.Module, mode: str, weight: float = 4.0, temperature: float = 1.0,
                 blocks: list[str] | None = None, autocast_bf16: bool = False):
        if mode not in MODES or mode == "none":
            raise ValueError(f"distill mode must be one of {', '.join(MODES[1:])}, got {mode!r}")
        self.teacher, self.mode, self.weight, self.temperature = teacher, mode, weight, temperature
        self.autocast_bf16 = autocast_bf16  # a bf16 teacher runs under bf16 autocast (fp32 inputs)
        self.blocks = blocks if blocks is not None else block_names(teacher)
        self._teacher_blocks = _BlockOutputs(teacher, self.blocks) if mode == "logits+hidden" else None
        self._student_blocks: _BlockOutputs | None = None
        self._student_of: nn.Module | None = None
        #: ``() -> replay``, set by the run where the task can give the teacher's exposed tensors
        #: without a forward (``replay(batch) -> {name: tensor}``; ``logits`` mode only); called
        #: at the first step
        self.replay_factory = None
        self._replay = None

    def use_replay(self, replay) -> None:
        """Give the teacher's exposed tensors from ``replay(batch)`` from now on (``logits`` mode)
        and let go of the teacher (:attr:`teacher_released`)."""
        if self.mode != "logits":
            raise ValueError("a replay stands for the teacher's outputs only in 'logits' mode")
        self._replay, self.replay_factory, self.teacher = replay, None, None

    def _student_hooks(self, student: nn.Module) -> _BlockOutputs:
        """Block hooks on ``student`` (re-attached when the student changes, e.g. after pruning)."""
        if self._student_of is not student:
            if self._student_blocks is not None:
                self._student_blocks.remove()
            self._student_blocks, self._student_of = _BlockOutputs(student, self.blocks), student
        return self._student_blocks

    def loss(self, task_loss, student: nn.Module, inner: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(task loss, weighted distillation term)`` of ``batch``. ``student`` is what the task
        runs (possibly a data-parallel wrapper), ``inner`` the model inside it."""
        hidden = self.mode == "logits+hidden"
        if not hidden and self.replay_factory is not None:  # built once, before the student's graph exists
            self._replay, self.replay_factory = self.replay_factory(), None
            if self._replay is not None:  # (None: the task could not cache after all; the teacher runs)
                self.teacher = None  # no longer needed: the run drops its copy too (:attr:`teacher_released`)
        hooks = self._student_hooks(inner) if hidden else None
        with _record() as exposed_s, (hooks.collect() if hidden else contextlib.nullcontext([])) as hs:
            loss = task_loss(student, batch)
        ht: list[torch.Tensor] = []
        if self._replay is not None and not hidden:
            exposed_t = self._replay(batch)
        else:
            with teacher_pass(next(self.teacher.parameters()).device, self.autocast_bf16), _record() as exposed, \
                    (self._teacher_blocks.collect() if hidden else contextlib.nullcontext([])) as ht:
                task_loss(self.teacher, batch)
            exposed_t = {name: t for name, (t, _, _) in exposed.items()}
        student = {name: (s, dim, mask, exposes_similarity(name)) for name, (s, dim, mask) in exposed_s.items()}
        term, _ = distillation_term(student, exposed_t, self.weight, self.temperature, (hs, ht) if hidden else None)
        return loss, term

    @property
    def teacher_released(self) -> bool:
        """True once the replay replaced the teacher (its weights can be freed)."""
        return self.teacher is None

    def describe(self) -> dict:
        """What is distilled, for the report."""
        return {"mode": self.mode, "weight": self.weight, "temperature": self.temperature,
                "hidden_blocks": len(self.blocks) if self.mode == "logits+hidden" else 0,
                "teacher_cached": self.mode == "logits" and (self._replay is not None
                                                             or self.replay_factory is not None)}

    def close(self) -> None:
        for hooks in (self._student_blocks, self._teacher_blocks):
            if hooks is not None:
                hooks.remove()
