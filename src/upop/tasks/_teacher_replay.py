"""The teacher's retrieval similarities without a teacher forward per step (``distill_cache``).

The dense teacher is frozen and CLIP / SigLIP / SigLIP2 / BLIP training pairs are not augmented, so
the teacher's normalised embedding of a training image or caption is the same at every step. With
``--distill logits`` the run therefore embeds every training image and caption with the teacher
once (:func:`retrieval_replay`, batches of fixed composition split across the processes, so a
resumed run builds the same table), and each step's teacher similarity matrix is the product of
the rows of its batch: ``scale * T[sample] @ I[index].T`` (``+ bias`` for SigLIP; for BLIP the ITC
matrix ``I[index] @ T[sample].T / 0.07``), over the global batch under several processes, as the
student's. That is the matrix the teacher's forward computes (up to float rounding), for one pass
over the data instead of one teacher forward per step (for BLIP, one that includes the ITM pass
over hard negatives, which is not distilled).

Not used (the teacher runs every step) for ``logits+hidden`` (block outputs need the forward), for
captions behind a prompt, with ``distill_cache`` off, or when the table, once per process on the
node, would pass :data:`CACHE_LIMIT_BYTES`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from upop.config import local_processes
from upop.data.retrieval import RetrievalDataset, RetrievalPairs
from upop.tasks._blip import unwrap
from upop.measure.host_sync import host_value
from upop.tasks._gather import gather, world

logger = logging.getLogger("upop")

#: the largest teacher table the processes of one node build together (host memory): each of them
#: holds the whole table, so one process's table is counted once per process on the node
#: (``LOCAL_WORLD_SIZE``, else every process of the run: :func:`upop.config.local_processes`;
#: :func:`table_fits`). A larger training set keeps the teacher's forward (4 GiB: about 2M
#: embeddings 512 wide on one process, 260k on 8; COCO's 680k images and captions need 1.4 GB a process)
CACHE_LIMIT_BYTES = 4 * 2**30


def table_fits(table_bytes: int, accelerator=None) -> bool:
    """Whether a teacher table of ``table_bytes`` (one process's copy) fits :data:`CACHE_LIMIT_BYTES`
    once counted for each process on this node (``accelerator``: the run's Accelerator or
    PartialState, None for one process). Where it does not, the main process says so and the
    teacher keeps its forward."""
    processes = int(accelerator.num_processes) if accelerator is not None else 1
    local = local_processes(processes)
    if table_bytes * local <= CACHE_LIMIT_BYTES:
        return True
    if accelerator is None or accelerator.is_main_process:
        logger.info(f"the teacher's table is not cached: {table_bytes / 2**20:,.1f} MiB per process x {local} "
                    f"process{'es' if local != 1 else ''} on this node is over the {CACHE_LIMIT_BYTES / 2**20:,.0f} "
                    "MiB host-memory limit; the teacher runs every step")
    return False


def clip_affinity(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """CLIP / SigLIP's exposed ``logits_per_text`` from a batch's cached embeddings:
    ``scale * texts @ images.T`` (``+ bias`` for SigLIP)."""
    scale = model.logit_scale.detach().float().exp().cpu()
    bias = getattr(model, "logit_bias", None)
    bias = bias.detach().float().cpu() if bias is not None else None

    def affinity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        logits = (texts @ images.t()) * scale
        return logits + bias if bias is not None else logits
    return affinity


def retrieval_replay(task, teacher, train, processor, batch_size: int, accelerator=None,
                     embed=None, affinity=clip_affinity) -> Callable[[], Callable[[dict], dict[str, torch.Tensor]]] | None:
    """A builder of ``replay(batch) -> {"affinity": the teacher's exposed similarity matrix}`` (the
    teacher's embeddings are computed when it is called), or None where the teacher must run (see
    the module docstring). ``embed`` is the task's embedding function for ``teacher``'s class
    (``embed(model, dataset, processor, batch_size, accelerator)``), ``affinity(model)`` gives the
    matrix of a batch from its images' and captions' rows (:func:`clip_affinity`)."""
    if embed is None or not isinstance(train, RetrievalPairs) or getattr(task.collator(processor), "prompt", ""):
        return None

    def build() -> Callable[[dict], dict[str, torch.Tensor]] | None:
        inner = unwrap(teacher)
        p = next(inner.parameters())
        autocast = torch.autocast(p.device.type, dtype=torch.bfloat16) if p.dtype == torch.bfloat16 \
            else contextlib.nullcontext()
        dataset = RetrievalDataset(train.items)
        with torch.no_grad(), autocast:
            width = embed(inner, RetrievalDataset(train.items[:1]), processor, 1, None)[0].shape[-1]
            if not table_fits((len(dataset) + len(dataset.flat_captions()[0])) * width * 4, accelerator):
                return None  # too large for host memory: the teacher keeps running every step
            images, texts, _, _ = embed(inner, dataset, processor, batch_size, accelerator)
        similarity = affinity(inner)

        def replay(batch: dict) -> dict[str, torch.Tensor]:
            device = batch["index"].device
            if world()[1] > 1:  # the global batch's rows: gathered on the device, read back
                index, sample = gather(batch["index"]).cpu(), gather(batch["sample"]).cpu()
            else:  # the collated indices (no wait for the device)
                index, sample = host_value(batch, "index"), host_value(batch, "sample")
            return {"affinity": similarity(images[index], texts[sample]).to(device)}

        return replay

    return build
