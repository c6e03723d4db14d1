"""Evaluation helpers: the eval-mode block and the split across the processes of a run.

Every task's evaluation is a loop over fixed batches of its data followed by a metric. With
``map_batches`` each process computes a contiguous run of those batches and the per-batch
results are all-gathered, so every process gets the same list, in the same order, that one
process computing every batch would get: the metrics are identical, the work is divided.

The gather sends the results' tensors as tensors: their bytes in one buffer per process, padded
to the longest and all-gathered on the run's device (:func:`upop.tasks._gather.gather`); only
the rest (the results' structure, each tensor's shape and dtype, plain values such as generated
texts) goes as a pickle, small next to the tensors.

A batch's reading, decoding and collating (``load``) can run in DataLoader worker processes
ahead of the model (``fn``), as training's batches do (:func:`upop.engine.runtime.step_batches`):
the run's ``workers`` setting, given for the evaluations inside :func:`evaluation_workers`
(:func:`upop.engine.runtime.evaluating` enters it).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from upop.tasks._gather import gather, pad_to

#: DataLoader workers of the evaluations run inside :func:`evaluation_workers` (0: in this process)
_WORKERS: contextvars.ContextVar[int] = contextvars.ContextVar("upop_evaluation_workers", default=0)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; its previous mode is restored after, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def evaluation_workers(workers: int) -> Iterator[None]:
    """Inside the block, :func:`map_batches` loads batches in ``workers`` DataLoader processes
    (0: in this process) where its caller gives a ``load`` and no ``workers`` of its own."""
    token = _WORKERS.set(int(workers))
    try:
        yield
    finally:
        _WORKERS.reset(token)


def _world(dist_state) -> tuple[int, int]:
    """(rank, processes) of an Accelerator / PartialState; (0, 1) for None."""
    if dist_state is None:
        return 0, 1
    return int(dist_state.process_index), int(dist_state.num_processes)


class _Batches(torch.utils.data.Dataset):
    """Item ``i``: ``load(*bounds[i])``, a pure function of the bounds (DataLoader workers give what
    this process would)."""

    def __init__(self, load: Callable[[int, int], Any], bounds: Sequence[tuple[int, int]]):
        self.load, self.bounds = load, list(bounds)

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int):
        return self.load(*self.bounds[i])


def _loaded(load: Callable[[int, int], Any], bounds: Sequence[tuple[int, int]], workers: int) -> Iterator[Any]:
    """``load(lo, hi)`` of each of ``bounds`` in order: here (``workers=0``) or ahead of time by
    ``workers`` DataLoader processes (pinned on CUDA, as training's batches)."""
    batches = _Batches(load, bounds)
    if workers <= 0 or len(batches) == 0:
        return (batches[i] for i in range(len(batches)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after tokenizer use
    # a generator of its own: the DataLoader draws its worker seed from it, not from the global
    # RNG, so an evaluation with workers leaves the run's random state as one without
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                         num_workers=min(workers, len(batches)),
                                         pin_memory=torch.cuda.is_available(), prefetch_factor=2,
                                         generator=torch.Generator().manual_seed(0))
    return iter(loader)


def _collate_range(collate: Callable[[list], Any], item: Callable[[int], Any], lo: int, hi: int):
    return collate([item(i) for i in range(lo, hi)])


def _encode_slice(encode: Callable[[Sequence], Any], items: Sequence, lo: int, hi: int):
    return encode(items[lo:hi])


def collated(collate: Callable[[list], Any], item: Callable[[int], Any]) -> Callable[[int, int], Any]:
    """A ``load`` for :func:`map_batches`: ``collate([item(i) for i in range(lo, hi)])`` (``item``:
    a dataset's ``__getitem__``, say). A partial of a module function, so it pickles wherever
    ``collate`` and ``item`` do: no model in it."""
    return partial(_collate_range, collate, item)


def sliced(encode: Callable[[Sequence], Any], items: Sequence) -> Callable[[int, int], Any]:
    """A ``load`` for :func:`map_batches`: ``encode(items[lo:hi])`` (a tokenizer's batch of texts, say)."""
    return partial(_encode_slice, encode, items)


def on_device(batch, device):
    """``batch`` (tensors, and lists, tuples and dicts of them) with its tensors on ``device``;
    the copies are asynchronous from the pinned memory the evaluation's loader gives on CUDA."""
    return tree_map(lambda x: x.to(device, non_blocking=True) if torch.is_tensor(x) else x, batch)


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a process's results: its shape, dtype and whether it was on the host."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    host: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _gather_results(mine: list, device: torch.device) -> list:
    """Every process's ``mine`` concatenated in rank order (the processes of torch.distributed).
    Tensors travel as bytes in one padded tensor all-gather on ``device``; the structure and the
    plain values in one object all-gather. A tensor comes back on the host where it was there on
    its process, else on ``device``."""
    import torch.distributed as dist

    leaves, _ = tree_flatten(mine)
    tensors = [t.detach() for t in leaves if torch.is_tensor(t)]
    skeleton = tree_map(lambda x: _Slot(tuple(x.shape), x.dtype, x.device.type == "cpu") if torch.is_tensor(x) else x,
                        mine)
    skeletons: list = [None] * dist.get_world_size()
    dist.all_gather_object(skeletons, skeleton)
    sizes = [sum(s.nbytes for s in tree_flatten(sk)[0] if isinstance(s, _Slot)) for sk in skeletons]
    if max(sizes) == 0:
        return [result for part in skeletons for result in part]
    mine_bytes = [t.to(device).reshape(-1).view(torch.uint8) for t in tensors]
    buffer = torch.cat(mine_bytes) if mine_bytes else torch.zeros(0, dtype=torch.uint8, device=device)
    rows = gather(pad_to(buffer.view(1, -1), max(sizes)))  # (processes, longest) bytes
    hosted = rows.cpu() if any(s.host for sk in skeletons for s in tree_flatten(sk)[0] if isinstance(s, _Slot)) \
        else None

    def unpack(rank: int, part):
        offset = 0

        def tensor(slot):
            nonlocal offset
            if not isinstance(slot, _Slot):
                return slot
            source = hosted if slot.host else rows
            data = source[rank, offset:offset + slot.nbytes].clone()  # a storage of its own for the view
            offset += slot.nbytes
            return data.view(slot.dtype).view(slot.shape)

        return tree_map(tensor, part)

    return [result for rank, part in enumerate(skeletons) for result in unpack(rank, part)]


def map_batches(n: int, batch_size: int, fn: Callable, dist_state=None, *,
                load: Callable[[int, int], Any] | None = None, workers: int | None = None) -> list:
    """``[fn(lo, hi) for each batch [lo, hi) of range(n)]``, split across processes; with ``load``,
    ``[fn(load(lo, hi)) ...]``: ``load`` (reading, decoding, collating a batch) runs in ``workers``
    DataLoader processes ahead of ``fn`` (the model), in this process where ``workers`` is 0
    (default: the setting of :func:`evaluation_workers`, else 0). The order and the results are
    the same either way; ``load`` must be a pure function of its bounds.

    ``dist_state`` is the run's Accelerator or PartialState; with more than one process every
    process must call this with the same ``n`` and ``batch_size``. ``fn``'s results (tensors,
    plain data, lists, tuples and dicts of them) are gathered from every process: tensors as
    tensors, on ``dist_state.device`` (see the module's text).
    """
    bounds = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    rank, world = _world(dist_state)
    per = math.ceil(len(bounds) / world)
    own = bounds[rank * per:(rank + 1) * per]
    if load is None:
        mine = [fn(lo, hi) for lo, hi in own]
    else:
        mine = [fn(batch) for batch in _loaded(load, own, _WORKERS.get() if workers is None else workers)]
    if world == 1:
        return mine
    return _gather_results(mine, torch.device(dist_state.device))
