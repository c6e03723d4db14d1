"""Counting device-to-host synchronisations: the calls that make the host wait for the device.

A training step that reads a value of a device tensor (``loss.item()``, ``float(t)``, ``if t:``,
``t.tolist()``, ``t.cpu()``, boolean-mask indexing, ``nonzero``, ...) stalls until the device
has finished everything queued before it. A step of the step loop reads once, after backward:
the run's agreement on the loss, the non-finite check and the stop requests
(:meth:`upop.engine.run.Run.forward`) with what its callbacks ask for (the search's accumulated
scores on an update step), in one transfer (:func:`upop.engine.loop.read_together`); what a loss needs on the host it reads from the collated batch (:class:`DeviceBatch`,
:func:`host_value`), not back from the device.

:class:`HostSyncCounter` (a :class:`torch.overrides.TorchFunctionMode`) counts these calls, each
with where it was made (``file:line in function`` in upop, and in the library that made it, if
another). On a CUDA run it counts what reads a CUDA tensor. On the CPU nothing waits, so it counts
the calls that *would* wait on CUDA, following which tensors are host-side: made without a
device (``torch.tensor(...)``, ``torch.zeros(...)``), moved with ``.cpu()`` / ``.to("cpu")``,
taken from the collated batch (:func:`host_value`), or computed from host-side tensors only;
every other tensor (the model's, one moved with ``.to(device)`` or made with ``device=``) is on
the device. Reads inside ``torch.optim`` are not counted: the optimizers keep their step counters
on the host (unless ``capturable`` or ``fused``).

:func:`count_steps` counts every step of :class:`upop.engine.loop.StepLoop` run inside it (this
thread): each step's training part (forward, backward, optimizer, callbacks, log record) and its
end (validation, checkpoints: work done every so many steps) apart. Off, a step pays one
thread-local read.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

T = torch.Tensor

#: calls that read a tensor's values on the host
_READS = frozenset({
    T.item, T.tolist, T.__bool__, T.__float__, T.__int__, T.__index__, T.__complex__, T.__format__, T.__repr__,
    T.__array__, T.__contains__, T.numpy, T.nonzero, T.argwhere, T.equal, T.allclose, T.unique,
    T.unique_consecutive, T.masked_select, T.is_nonzero,
    torch.nonzero, torch.argwhere, torch.is_nonzero, torch.equal, torch.allclose, torch.unique,
    torch.unique_consecutive, torch.masked_select,
})
#: indexing that syncs when an index is a boolean tensor (the result's size depends on its values)
_MASK_INDEXING = frozenset({T.__getitem__, T.__setitem__, T.index_put, T.index_put_, torch.index_put})
_OPTIMIZERS = os.sep + os.path.join("torch", "optim") + os.sep
_TORCH = os.sep + "torch" + os.sep
_UPOP = os.sep + "upop" + os.sep

#: this thread's active counter (``counter``) and step watch (``watch``)
_local = threading.local()


def _tensors(args, kwargs) -> list[torch.Tensor]:
    leaves, _ = tree_flatten((args, kwargs))
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _to_host(func, args, kwargs, on_host) -> bool | None:
    """Whether a move (``.cpu()``, ``.to(...)``) sends its tensor to the host (``None``: the call
    names no device). On a CPU run only ``.cpu()`` and the string ``"cpu"`` say host: a device
    given as an object (``.to(acc.device)``, ``.to(x.device)``) is the run's device."""
    if func is T.cpu:
        return True
    dest = kwargs.get("device")
    if func is T.to:
        for a in args[1:]:
            if isinstance(a, (str, torch.device, torch.Tensor)):
                dest = a
    if dest is None:
        return None
    if isinstance(dest, torch.Tensor):
        return on_host(dest)
    return isinstance(dest, str) and dest == "cpu"


def _caller() -> str:
    """Where a sync was made: ``file:line in function`` of the first frame in upop, followed by
    the first frame outside torch where that is another library's
    (``tasks/x.py:3 in loss <- transformers/y.py:7 in check``)."""
    import sys

    frame, outside = sys._getframe(2), None
    while frame is not None:
        code = frame.f_code
        if code.co_filename != __file__:
            if _UPOP in code.co_filename:
                own = f"{code.co_filename.split(_UPOP, 1)[1]}:{frame.f_lineno} in {code.co_name}"
                return own if outside is None else f"{own} <- {outside}"
            if outside is None and _TORCH not in code.co_filename:
                outside = f"{_short(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return outside or "?"


def _short(path: str) -> str:
    """``site-packages/transformers/x.py`` -> ``transformers/x.py``."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _in_optimizer() -> bool:
    import sys

    frame = sys._getframe(2)
    while frame is not None:
        if _OPTIMIZERS in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class HostSyncCounter(TorchFunctionMode):
    """While active, counts the torch calls that wait for the device (:attr:`count`; where they
    were made: :attr:`sites`, ``file:line`` -> count). ``device``: the run's device; on a CPU one
    the calls that would wait on CUDA are counted (see the module's text)."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.simulate = torch.device(device).type == "cpu"
        #: whether syncs are counted now (host-side tensors are followed all the while)
        self.counting = True
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._host: dict[int, weakref.ref] = {}

    def __enter__(self):
        self._outer = getattr(_local, "counter", None)
        _local.counter = self
        return super().__enter__()

    def __exit__(self, *exc):
        _local.counter = self._outer
        return super().__exit__(*exc)

    # which tensors are on the host -----------------------------------------------------------
    def on_host(self, t: torch.Tensor) -> bool:
        if not self.simulate:
            return t.device.type == "cpu"
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark_host(self, out) -> None:
        leaves, _ = tree_flatten(out)
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._host[id(t)] = weakref.ref(t)
        if len(self._host) > 100_000:  # drop the dead
            self._host = {k: r for k, r in self._host.items() if r() is not None}

    def _host_result(self, func, args, kwargs, tensors: list[torch.Tensor]) -> bool:
        """Whether the result of ``func`` is host-side (CPU run): moved to the host, made without a
        ``device`` (or with ``device="cpu"``), or computed from host tensors only."""
        move = _to_host(func, args, kwargs, self.on_host)
        return move if move is not None else all(self.on_host(t) for t in tensors)

    # the mode --------------------------------------------------------------------------------
    def _syncs(self, func, args, kwargs, tensors: list[torch.Tensor], out) -> bool:
        """Whether the call ``func(*args, **kwargs) -> out`` waits for the device."""
        if not tensors:
            return False
        if func in _READS:
            return not self.on_host(tensors[0])
        if func in _MASK_INDEXING and len(args) > 1:  # the index: args[1] (not the value set)
            index = _tensors(args[1], {})
            return any(t.dtype == torch.bool and not self.on_host(t) for t in index)
        if func is torch.where and len(args) + len(kwargs) == 1:
            return not self.on_host(tensors[0])
        if func is T.copy_ and len(tensors) >= 2:  # host_tensor.copy_(device_tensor)
            return self.on_host(tensors[0]) and not self.on_host(tensors[1])
        if func is T.cpu or func is T.to:
            if self.simulate:
                return bool(_to_host(func, args, kwargs, self.on_host)) and not self.on_host(tensors[0])
            return tensors[0].device.type != "cpu" and isinstance(out, torch.Tensor) and out.device.type == "cpu"
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        out = func(*args, **kwargs)
        if self.simulate and func is T.to and out is args[0] and type(out) is torch.Tensor \
                and _to_host(func, args, kwargs, self.on_host) is False:
            out = out.view_as(out)  # "moved" to the run's device: another tensor than the one moved, as on CUDA
        if self.counting and self._syncs(func, args, kwargs, tensors, out) and not _in_optimizer():
            self.count += 1
            self.sites[_caller()] += 1
        if self.simulate and isinstance(out, (torch.Tensor, tuple, list)) and \
                self._host_result(func, args, kwargs, tensors):
            self._mark_host(out)
        return out


@dataclass
class StepSyncs:
    """The syncs of one step of the step loop: ``part`` is ``"step"`` (forward to log record) or
    ``"end"`` (validation, checkpoints)."""

    phase: str
    step: int
    part: str
    count: int
    sites: dict[str, int] = field(default_factory=dict)


class StepWatch:
    """The per-step counts of :func:`count_steps` (:attr:`steps`, in order). Its one counter is
    active over the whole block, counting only inside the steps: host-side tensors made before a
    step (a search's cost tables, a collated batch before its move) are known in it."""

    def __init__(self, device: torch.device | str):
        self.counter = HostSyncCounter(device)
        self.counter.counting = False
        self.steps: list[StepSyncs] = []

    @contextlib.contextmanager
    def part(self, phase: str, step: int, part: str) -> Iterator[None]:
        """Count the block as ``part`` of ``phase``'s ``step``."""
        counter = self.counter
        before, sites = counter.count, counter.sites.copy()
        counter.counting = True
        try:
            yield
        finally:
            counter.counting = False
            self.steps.append(StepSyncs(phase, step, part, counter.count - before, dict(counter.sites - sites)))

    def counts(self, phase: str, part: str = "step") -> dict[int, StepSyncs]:
        """``{step: counts}`` of ``phase``'s ``part`` (the last count of a step, for a resumed one)."""
        return {s.step: s for s in self.steps if s.phase == phase and s.part == part}


def watching() -> StepWatch | None:
    """The active :class:`StepWatch` of this thread, or None (the step loop's one check)."""
    return getattr(_local, "watch", None)


@contextlib.contextmanager
def count_steps(device: torch.device | str = "cpu") -> Iterator[StepWatch]:
    """Count the host syncs of every step of the step loop run inside the block (this thread);
    ``device``: the run's device. Yields the :class:`StepWatch` that holds the counts."""
    previous = watching()
    _local.watch = watch = StepWatch(device)
    try:
        with watch.counter:
            yield watch
    finally:
        _local.watch = previous


def count_syncs(fn, *args, device: torch.device | str = "cpu", **kwargs) -> tuple[Any, HostSyncCounter]:
    """``(fn(*args, **kwargs), the counter)``: the host syncs of one call."""
    counter = HostSyncCounter(device)
    with counter:
        out = fn(*args, **kwargs)
    return out, counter


class DeviceBatch(dict):
    """A training batch moved to the device that keeps the collated batch it came from
    (:attr:`host`): what a loss needs on the host (sample indices, labels to check) is read there,
    without waiting for the device (:func:`host_value`)."""

    def __init__(self, on_device: dict, host: dict):
        super().__init__(on_device)
        self.host = host


def host_value(batch: dict, key: str) -> torch.Tensor:
    """``batch[key]`` on the host: the collated tensor where the batch keeps it
    (:class:`DeviceBatch`, the run's training batches), else read back from the device."""
    host = getattr(batch, "host", None)
    if host is not None and torch.is_tensor(host.get(key)) and host[key].device.type == "cpu":
        counter = getattr(_local, "counter", None)
        if counter is not None:  # a counter on a CPU run cannot tell it from the device batch's: it is told
            counter._mark_host(host[key])
        return host[key]
    return batch[key].cpu()
