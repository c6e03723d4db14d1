"""Distillation from the dense model inside a ``transformers.Trainer`` (``add_upop(..., distill=...)``).

The Trainer computes its loss as ``model(**inputs).loss``; a callback cannot change that. So the
distillation term is added where the loss is made: a forward hook on the model (the model itself,
under any DDP wrapper) runs, after each *training* forward of the student (module in train mode,
gradients enabled), the frozen teacher on the same inputs under ``torch.no_grad`` and adds
``weight * term`` to the output's ``loss``; evaluation and prediction forwards are untouched.

The term is :mod:`upop.distill.distiller`'s, read off the model output instead of a task's exposed tensors:

- ``logits_per_image`` (CLIP, SigLIP: image x text similarities) distilled both ways (affinity
  mimicking, as ``upop compress`` does);
- otherwise ``logits``, over the last axis: class logits, or token logits restricted to scored
  positions (``labels != -100``; for a model that generates, the positions predicting a scored
  next token);
- ``logits+hidden`` adds the relative squared error of every transformer block's output.

A model output with neither ``logits_per_image`` nor ``logits`` (e.g. BLIP VQA's) cannot be
distilled this way: the first training step raises a one-line :class:`~upop.errors.ConfigError`
naming the class (``upop compress --distill`` distils every task).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from upop.config import UPopConfig
from upop.distill.distiller import (_BlockOutputs, block_names, distillation_term, make_teacher, next_token_mask,
                                    teacher_pass)
from upop.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class TrainerDistiller:
    """The distillation hook of a Trainer run.

    Args:
        model: the dense student, as the Trainer holds it (not a DDP wrapper); the hooks go on it.
        mode: ``"logits"`` or ``"logits+hidden"``.
        weight, temperature: the term's weight and the KL temperature.
        teacher: the frozen teacher; default a copy of ``model`` now (so make the distiller
            before the model changes: :func:`upop.integrations.transformers.callback.add_upop` does it when attaching).
        precision: ``"fp32"`` or ``"bf16"`` (the teacher held in bf16 and run under bf16 autocast).

    :attr:`last` holds the last term's parts (floats), for logging.
    """

    def __init__(self, model: nn.Module, mode: str, weight: float = 4.0, temperature: float = 1.0,
                 teacher: nn.Module | None = None, precision: str = "fp32"):
        # the settings' one check (UPopConfig's), then what this hook can do
        UPopConfig(distill=mode, distill_weight=weight, distill_temperature=temperature, teacher_precision=precision)
        if mode in ("none", "auto"):
            raise ConfigError(f"distill={mode!r} is not allowed here; TrainerDistiller needs distill 'logits' or "
                              "'logits+hidden'")
        self.mode, self.weight, self.temperature, self.precision = mode, float(weight), float(temperature), precision
        self.teacher = make_teacher(model if teacher is None else teacher, dtype=PRECISIONS[precision])
        self.blocks = block_names(self.teacher) if mode == "logits+hidden" else []
        self._teacher_blocks = _BlockOutputs(self.teacher, self.blocks) if self.blocks else None
        self._student_blocks = _BlockOutputs(model, self.blocks) if self.blocks else None
        self._collecting = contextlib.ExitStack()
        self.last: dict[str, float] = {}
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    @staticmethod
    def _training(module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _before(self, module, args, kwargs):
        if self._student_blocks is not None and self._training(module):
            self._collecting.close()
            self._student_outputs = self._collecting.enter_context(self._student_blocks.collect())

    def _after(self, module, args, kwargs, output):
        if not self._training(module):
            return None
        student_hidden = getattr(self, "_student_outputs", [])
        self._collecting.close()
        self._student_outputs = []
        if not isinstance(output, dict):
            raise ConfigError(f"distillation in the Trainer needs the model to return a ModelOutput; "
                              f"{type(module).__name__} returned {type(output).__name__} (return_dict=False?)")
        loss = output.get("loss")
        if loss is None:
            return None  # the Trainer itself reports a model that returns no loss
        s_logits, both_ways, mask = self._logits(module, output, kwargs)
        device = s_logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        collect = self._teacher_blocks.collect() if self._teacher_blocks is not None else contextlib.nullcontext([])
        with teacher_pass(device, self.precision == "bf16"), collect as teacher_hidden:
            t_out = self.teacher(*args, **kwargs)
        t_logits = t_out["logits_per_image" if both_ways else "logits"]
        total, parts = distillation_term({"logits": (s_logits, -1, mask, both_ways)}, {"logits": t_logits}, self.weight,
                                         self.temperature, (student_hidden, teacher_hidden) if self.blocks else None)
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        output["loss"] = loss + total.to(loss.dtype)
        return output

    @staticmethod
    def _logits(module, output, kwargs) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """The student tensor to distil, whether it is a similarity matrix, and the scored positions."""
        sim = output.get("logits_per_image")
        if sim is not None:
            return sim, True, None
        logits = output.get("logits")
        if logits is None:
            raise ConfigError(f"distillation in the Trainer reads the model output's logits_per_image or logits; "
                              f"{type(module).__name__} returns {', '.join(output.keys())}; train without distill, "
                              "or use upop compress --distill")
        labels = kwargs.get("labels")
        mask = None
        if torch.is_tensor(labels) and labels.shape == logits.shape[:-1]:
            generates = callable(getattr(module, "can_generate", None)) and module.can_generate()
            mask = next_token_mask(labels) if generates else labels != -100
        return logits, False, mask

    def describe(self) -> dict:
        """What is distilled, for a report."""
        return {"mode": self.mode, "weight": self.weight, "temperature": self.temperature,
                "teacher_precision": self.precision, "hidden_blocks": len(self.blocks)}

    def close(self) -> None:
        """Remove every hook (the student then trains without the term)."""
        self._collecting.close()
        for handle in self._handles:
            handle.remove()
        for hooks in (self._student_blocks, self._teacher_blocks):
            if hooks is not None:
                hooks.remove()
        self._handles = []
