"""Evaluation helpers: the eval-mode block and the split across the processes of a run.

Every task's evaluation is a loop over fixed batches of its data followed by a metric. With
``map_batches`` each process computes a contiguous run of those batches and the per-batch
results are all-gathered, so every process gets the same list, in the same order, that one
process computing every batch would get: the metrics are identical, the work is divided.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; its previous mode is restored after, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _world(dist_state) -> tuple[int, int]:
    """(rank, processes) of an Accelerator / PartialState; (0, 1) for None."""
    if dist_state is None:
        return 0, 1
    return int(dist_state.process_index), int(dist_state.num_processes)


def map_batches(n: int, batch_size: int, fn: Callable[[int, int], Any], dist_state=None) -> list:
    """``[fn(lo, hi) for each batch [lo, hi) of range(n)]``, split across processes.

    ``dist_state`` is the run's Accelerator or PartialState; with more than one process every
    process must call this with the same ``n`` and ``batch_size``. ``fn`` results are pickled
    to other processes: return CPU tensors or plain data.
    """
    bounds = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    rank, world = _world(dist_state)
    if world == 1:
        return [fn(lo, hi) for lo, hi in bounds]
    import torch.distributed as dist

    per = math.ceil(len(bounds) / world)
    mine = [fn(lo, hi) for lo, hi in bounds[rank * per:(rank + 1) * per]]
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return [result for part in parts for result in part]
