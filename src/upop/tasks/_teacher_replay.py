"""The teacher's retrieval similarities without a teacher forward per step (``distill_cache``).

The dense teacher is frozen and CLIP / SigLIP / SigLIP2 training pairs are not augmented, so the
teacher's normalised embedding of a training image or caption is the same at every step. With
``--distill logits`` the run therefore embeds every training image and caption with the teacher
once (:func:`retrieval_replay`, batches of fixed composition split across the processes, so a
resumed run builds the same table), and each step's teacher similarity matrix is the product of
the rows of its batch: ``scale * T[sample] @ I[index].T`` (``+ bias`` for SigLIP), over the global
batch under several processes, as the student's. That is the matrix the teacher's forward computes
(up to float rounding), for one pass over the data instead of one teacher forward per step.

Not used (the teacher runs every step) for BLIP (its ITC features come with the ITM pass), for
``logits+hidden`` (block outputs need the forward), for captions behind a prompt, or with
``distill_cache`` off.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..data.retrieval import RetrievalDataset, RetrievalPairs
from ._blip import unwrap
from ._gather import gather, world


def retrieval_replay(task, teacher, train, processor, batch_size: int, accelerator=None,
                     embed=None) -> Callable[[], Callable[[dict], dict[str, torch.Tensor]]] | None:
    """A builder of ``replay(batch) -> {"affinity": teacher logits_per_text}`` for the CLIP-style
    retrieval models (the teacher's embeddings are computed when it is called), or None where the
    teacher must run (see the module docstring). ``embed`` is the task's embedding function for
    ``teacher``'s class (``embed(model, dataset, processor, batch_size, accelerator)``)."""
    if embed is None or not isinstance(train, RetrievalPairs) or getattr(task.collator(processor), "prompt", ""):
        return None

    def build() -> Callable[[dict], dict[str, torch.Tensor]]:
        inner = unwrap(teacher)
        p = next(inner.parameters())
        autocast = torch.autocast(p.device.type, dtype=torch.bfloat16) if p.dtype == torch.bfloat16 \
            else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            images, texts, _, _ = embed(inner, RetrievalDataset(train.items), processor, batch_size, accelerator)
        scale = inner.logit_scale.detach().float().exp().cpu()
        bias = getattr(inner, "logit_bias", None)
        bias = bias.detach().float().cpu() if bias is not None else None

        def replay(batch: dict) -> dict[str, torch.Tensor]:
            device = batch["index"].device
            index, sample = batch["index"], batch["sample"]
            if world()[1] > 1:
                index, sample = gather(index), gather(sample)
            logits = (texts[sample.cpu()] @ images[index.cpu()].t()) * scale
            if bias is not None:
                logits = logits + bias
            return {"affinity": logits.to(device)}

        return replay

    return build
