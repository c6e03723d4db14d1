"""Does a run fit on its device? The training memory a run needs at least, checked before the
model moves to the device (:func:`check_fits`, called by :class:`upop.engine.run.Run`).

What is counted is what a run holds whatever its batch: the weights, their gradients and AdamW's
two states (``exp_avg``, ``exp_avg_sq``; torch keeps them in the weights' dtype), each at the bytes
per element the weights are held in; a frozen teacher copy when one is kept through training (the
run distils without a cached teacher, or the task learns from the teacher); and the masks (per unit
an fp32 value and gradient and an fp64 gradient sum: a few KiB). Activations come on top: they
depend on the batch and the sequence, and ``--gradient-checkpointing`` is what shrinks them, so
the estimate is a lower bound and a run it lets through may still run out of memory.

``--precision bf16`` / ``fp16`` is autocast over the weights as they are (fp32 master weights for an
fp32 model): it changes the compute dtype, not what is counted here.

Only a CUDA device is checked, against ``torch.cuda.mem_get_info`` (memory free on that GPU now,
other processes' use taken off). Host RAM is not checked: a run on the CPU, or the host side of
a GPU run, can still run out of memory (the operating system then stops the process)."""

from __future__ import annotations

from upop.errors import ConfigError

GIB = 2**30

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
"""Bytes per element of the dtypes a model's weights (or the teacher) may be held in."""

STATES = 2
"""Tensors of the weights' size AdamW keeps per parameter (first and second moments)."""

MASK_BYTES_PER_UNIT = 4 + 4 + 8
"""A mask unit: its fp32 value and gradient and its fp64 gradient sum (:class:`upop.pruning.masks.Masks`)."""


def _names():
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def weights_precision(model) -> str:
    """The dtype name (:data:`BYTES`) of ``model``'s weights: the widest of its float parameters'
    (fp32 where it has none of those dtypes)."""
    names = _names()
    held = {names[p.dtype] for p in model.parameters() if p.dtype in names}
    return max(held, key=BYTES.__getitem__, default="fp32")


def estimate(n_params: int, precision: str, teacher: str | None = None, mask_units: int = 0) -> int:
    """Bytes a run of a model of ``n_params`` parameters held in ``precision`` needs at least:
    weights, gradients and AdamW's two states at ``precision``'s bytes per element, a teacher copy
    held in ``teacher`` (None: no teacher kept through training) and ``mask_units`` masks."""
    weights = n_params * BYTES[precision]
    teacher_bytes = n_params * BYTES[teacher] if teacher is not None else 0
    return weights * (2 + STATES) + teacher_bytes + mask_units * MASK_BYTES_PER_UNIT


def fits(n_params: int, precision: str, teacher: str | None, free: int | None, *,
         mask_units: int = 0) -> tuple[bool, int]:
    """``(fits, estimate)``: whether :func:`estimate` bytes fit in ``free`` bytes (None: not checked,
    so it fits)."""
    need = estimate(n_params, precision, teacher, mask_units)
    return free is None or need <= free, need


def free_bytes(device) -> int | None:
    """Memory free on ``device`` now, or None where it is not checked (anything but CUDA: the
    CPU's RAM is not checked)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def check_fits(model, device, *, teacher: str | None = None, distills: bool = False, mask_units: int = 0) -> dict:
    """Refuse, in one line, a run of ``model`` that cannot fit on ``device`` (CUDA only, see the
    module's docstring): the estimate over the memory available there. ``teacher`` is the dtype
    name a teacher copy is held in through training (None: none), ``distills`` whether that teacher
    is the run's distillation (so ``--distill none`` drops it). Weights of ``model`` already on
    ``device`` count as available (free memory no longer holds them). Returns what was found, for
    the report: ``{"estimate_bytes", "available_bytes" (None: not checked), "counted"}``."""
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    precision = weights_precision(model)
    free = free_bytes(device)
    resident = sum(p.numel() * p.element_size() for p in params if _on(p, device))
    available = None if free is None else free + resident
    ok, need = fits(n_params, precision, teacher, available, mask_units=mask_units)
    counted = "weights, gradients, AdamW's 2 states" + (", a teacher copy" if teacher else "") + ", masks"
    found = {"estimate_bytes": need, "available_bytes": available, "counted": counted}
    if ok:
        return found
    tried = []
    if teacher is not None:
        tried += ["--teacher-precision bf16 (half the teacher copy)"] if BYTES[teacher] > 2 else []
        tried += ["--distill none (no teacher copy)"] if distills else []
    tried += ["a smaller model", "a GPU with more free memory"]
    beside = f" ({gib(free)} free + {gib(resident)} of its weights already there)" if resident else ""
    teacher_part = f" + {BYTES[teacher]} for the teacher" if teacher else ""
    raise ConfigError(
        f"{type(model).__name__} ({n_params / 1e9:.2f}B parameters in {precision}) does not fit on {device}: training "
        f"needs at least {gib(need)} GiB ({counted}: {2 + STATES} x {BYTES[precision]} bytes per parameter"
        f"{teacher_part}; activations come on top) and {gib(available)} GiB is available there{beside}; try "
        f"{', '.join(tried[:-1])} or {tried[-1]}; --gradient-checkpointing shrinks activations only, --precision bf16 "
        "is autocast over the same weights, and sharding the weights across GPUs (FSDP) is not supported yet")


def gib(n_bytes: int) -> str:
    """``n_bytes`` in GiB, 3 significant digits (``"14.2"``, ``"0.00131"``)."""
    return f"{n_bytes / GIB:.3g}"


def _on(p, device) -> bool:
    import torch

    device = torch.device(device)
    return p.device.type == device.type and (device.index is None or p.device.index == device.index)
