"""Image-text retrieval with SigLIP and SigLIP2 (``SiglipModel``, ``Siglip2Model``): pairwise
sigmoid loss; R@1/5/10 both ways.

Loss (SigLIP, Zhai et al. 2023): for every caption i and image j of the (global) batch, with
``s_ij = exp(t) * cos(text_i, image_j) + b`` (``SiglipModel``'s ``logits_per_text``) and
``z_ij = +1`` when both come from the same image (same ``index``), else ``-1``::

    loss = -sum_ij log sigmoid(z_ij * s_ij) / batch_size

With one caption per image this is ``SiglipModel(return_loss=True)``'s loss; captions of the
same image in a batch are all positives. Under N processes the embeddings and image indices
are gathered (gradients flow back, see :mod:`._gather`), so N x B trains like 1 x N*B.

Text: SigLIP pools the LAST token, and was trained with captions padded to a fixed length, so
every caption is padded (or cut) to the text tower's ``max_position_embeddings``, in training
(:func:`fixed_length`) and evaluation alike: a caption's embedding then does not depend on the
other captions of its batch. Evaluation ranks by cosine similarity (the sigmoid is monotonic),
as :class:`~upop.tasks.retrieval.RetrievalTask` does for CLIP.

SigLIP2's vision tower is NaFlex: its image processor returns ``pixel_values`` as patches
``(B, num_patches, 3 * p * p)`` with ``pixel_attention_mask`` and ``spatial_shapes``; such a
processor gets a :class:`NaFlexCollator` (:func:`collator_class`), whose image batches carry all
three, and the loss and the evaluation pass all three to the model (:func:`image_inputs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upop.distill import distiller as distill
from upop.data.retrieval import RetrievalCollator, processor_parts
from upop.errors import ConfigError
from upop.tasks._blip import unwrap
from upop.tasks._gather import batch_shapes, gather, gather_with_grad, world
from upop.tasks._recall import embed_split, recall_at_k
from upop.tasks._teacher_replay import clip_affinity

#: the image inputs of a NaFlex (SigLIP2) vision tower besides ``pixel_values``
NAFLEX_KEYS = ("pixel_attention_mask", "spatial_shapes")


class NaFlexCollator(RetrievalCollator):
    """A :class:`~upop.data.retrieval.RetrievalCollator` for a NaFlex image processor: image
    batches hold ``pixel_values`` (patches), ``pixel_attention_mask`` and ``spatial_shapes``."""

    def collate_images(self, batch) -> dict[str, torch.Tensor]:
        images = [x["image"] if isinstance(x, dict) else x for x in batch]
        out = self.image_processor(images=images, return_tensors="pt")
        return {**{k: out[k] for k in ("pixel_values", *NAFLEX_KEYS)},
                "index": torch.tensor([int(s["index"]) for s in batch], dtype=torch.long)}


def is_naflex(processor) -> bool:
    """Whether ``processor``'s image processor (of a processor, an ``(image_processor, tokenizer)``
    pair or a dict of both) is NaFlex: it returns ``spatial_shapes``."""
    try:
        image_processor = processor_parts(processor)[0]
    except ConfigError:
        return False
    return "spatial_shapes" in (getattr(image_processor, "model_input_names", None) or ())


def collator_class(processor) -> type[RetrievalCollator]:
    """:class:`NaFlexCollator` for a NaFlex processor, else the plain collator."""
    return NaFlexCollator if is_naflex(processor) else RetrievalCollator


def image_inputs(batch) -> dict[str, torch.Tensor]:
    """The image inputs of ``batch``: ``pixel_values`` and, when present, the NaFlex keys."""
    return {k: batch[k] for k in ("pixel_values", *NAFLEX_KEYS) if k in batch}


def text_length(model) -> int:
    """The fixed caption length: the text tower's ``max_position_embeddings``."""
    return int(unwrap(model).config.text_config.max_position_embeddings)


def fixed_length(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (with the pad token, masked out) or cut ``input_ids``/``attention_mask`` to :func:`text_length`."""
    length = text_length(model)
    if input_ids.shape[1] >= length:
        return input_ids[:, :length], attention_mask[:, :length]
    pad_id = unwrap(model).config.text_config.pad_token_id or 0
    extra = length - input_ids.shape[1]
    return F.pad(input_ids, (0, extra), value=pad_id), F.pad(attention_mask, (0, extra), value=0)


def sigmoid_loss(logits_per_text: torch.Tensor, text_index: torch.Tensor | None = None,
                 image_index: torch.Tensor | None = None) -> torch.Tensor:
    """``-sum log sigmoid(z * logits) / rows`` with ``z = +1`` where the text's and the image's
    indices agree (the diagonal when no indices are given), else ``-1``."""
    if text_index is None or image_index is None:
        same = torch.eye(*logits_per_text.shape, dtype=torch.bool, device=logits_per_text.device)
    else:
        same = text_index.view(-1, 1).to(logits_per_text.device) == image_index.view(1, -1).to(logits_per_text.device)
    z = same.to(logits_per_text.dtype) * 2 - 1
    return -F.logsigmoid(z * logits_per_text).sum() / logits_per_text.shape[0]


def loss(model, batch) -> torch.Tensor:
    """The sigmoid loss of ``batch`` (``input_ids``, ``attention_mask``, ``pixel_values``, ``index``;
    SigLIP2: also ``pixel_attention_mask``, ``spatial_shapes``) over the global batch."""
    input_ids, attention_mask = fixed_length(model, batch["input_ids"], batch["attention_mask"])
    out = model(input_ids=input_ids, attention_mask=attention_mask, **image_inputs(batch))
    index = batch.get("index")
    if world()[1] == 1:
        distill.expose("affinity", out.logits_per_text)
        return sigmoid_loss(out.logits_per_text, index, index)
    # the logits SiglipModel.forward computes, over the gathered (normalised) embeddings
    batch_shapes(len(out.text_embeds), device=out.text_embeds.device)
    text, image = gather_with_grad(out.text_embeds), gather_with_grad(out.image_embeds)
    inner = unwrap(model)
    logits = (text @ image.t()) * inner.logit_scale.exp() + inner.logit_bias
    index = gather(index.to(text.device)) if index is not None else None
    distill.expose("affinity", logits)
    return sigmoid_loss(logits, index, index)


@torch.no_grad()
def embed(model, dataset, processor, batch_size: int = 64, accelerator=None):
    """Normalised image and caption embeddings of ``dataset`` (all captions, flattened), with
    ``txt2img`` and ``img2txt``; captions at the fixed length of :func:`text_length`, images with
    every input of the image processor (:func:`image_inputs`). Batches are split across the
    processes of ``accelerator``."""
    collate = collator_class(processor)(processor, padding="max_length", max_length=text_length(model))
    return embed_split(model, dataset, collate, batch_size, accelerator, image_keys=("pixel_values", *NAFLEX_KEYS))


def replay_affinity(model):
    """The exposed ``logits_per_text`` from a batch's cached embeddings (:mod:`._teacher_replay`):
    CLIP's scaled product, plus SigLIP's bias."""
    return clip_affinity(model)


def evaluate(model, dataset, processor, batch_size: int = 64, k: int | None = None, accelerator=None):
    """Recall at 1/5/10 both ways and their mean (``k``, BLIP's re-ranking depth, is unused)."""
    image_emb, text_emb, txt2img, img2txt = embed(model, dataset, processor, batch_size, accelerator)
    return recall_at_k(image_emb @ text_emb.t(), img2txt, txt2img)
