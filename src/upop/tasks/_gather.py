"""All-gathers for the global-batch contrastive losses (CLIP InfoNCE, BLIP ITC and ITM).

Under N processes each one holds the ``rank``-th contiguous slice of the global batch
(:func:`upop.engine.run.batch_indices`), so tensors gathered in rank order are laid out like the
batch of one process at N times the batch size. The losses use these helpers so that N x B
trains like 1 x N*B:

* every process computes the same *global* loss from the gathered tensors;
* :func:`gather_with_grad` sends the gradient of every gathered slice back to the process that
  owns it, summed over the N processes (each holds the same global loss, so the owner receives
  N times d(loss)/d(its tensor));
* DistributedDataParallel (and :meth:`upop.pruning.masks.Masks.accumulate_grads`) average the gradients
  over the N processes, which divides that factor N away: the result is d(global loss)/d(theta).
  A parameter used directly in the global loss on every process (CLIP's ``logit_scale``) gets
  d(loss)/d(theta) on each, and the average leaves it unchanged.

Without ``torch.distributed`` (or with one process) every helper returns its input: no
collective is called. Every process must call the same helpers in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from upop.errors import ConfigError


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every process concatenated along dim 0 in rank order; the backward sums the
    gradients of all processes onto each owner's ``t``. Shapes must match across processes."""
    if world()[1] == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


@torch.no_grad()
def gather(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every process concatenated along dim 0 in rank order, without gradient."""
    size = world()[1]
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def batch_shapes(rows: int, length: int = 0, device=None) -> tuple[int, int]:
    """``(rows, longest length)`` agreed by all processes: every process must bring a batch of
    ``rows`` samples (else a one-line :class:`~upop.errors.ConfigError` on every process, rather
    than a hang in the next gather); ``length`` (of padded text, say) may differ, the longest
    is returned. ``device``: where the collective runs (the batch's device)."""
    if world()[1] == 1:
        return rows, length
    shapes = gather(torch.tensor([[rows, length]], dtype=torch.long, device=device)).tolist()
    counts = [r for r, _ in shapes]
    if len(set(counts)) > 1:
        raise ConfigError(f"contrastive loss over {len(counts)} processes: local batch sizes {counts} differ "
                          "(need the same batch size on every process)")
    return rows, max(n for _, n in shapes)


def pad_to(t: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """``t`` (rows x L) right-padded with ``value`` to ``length`` columns."""
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def own_rows(rows: int) -> slice:
    """This process's rows (``rows`` per process) in a gathered tensor."""
    rank = world()[0]
    return slice(rank * rows, (rank + 1) * rows)
