"""Image-text retrieval with CLIP: symmetric InfoNCE loss; R@1/5/10 both ways.

Training samples are (image, caption) pairs (:class:`~upop.data.retrieval.RetrievalPairs`, as
BLIP's ``coco_karpathy_train``: an epoch covers every caption); the InfoNCE targets are every
pair of the same image in the (global) batch, normalised per row, as UPop's CLIP and BLIP's ITC
(:func:`.blip_retrieval.contrastive_loss`).

Evaluation follows the UPop/BLIP protocol: embed every test image and every caption, rank all
captions for each image (``txt_r*``: an image counts as found at K when any of its captions is
in the top K) and all images for each caption (``img_r*``); ``r_mean`` is the mean of the six.
"""

from __future__ import annotations

import torch
from torch import nn

from upop.distill import distiller as distill
from upop.data.check import check_retrieval
from upop.data.shapes import write_retrieval
from upop.data.retrieval import RetrievalDataset, RetrievalPairs, load_retrieval_split
from upop.data.user_rows import RowSchema
from upop.arch import CLASSES
from upop.tasks import blip_retrieval, siglip_retrieval
from upop.tasks._blip import unwrap
from upop.tasks._recall import METRICS, embed_split, recall_at_k
from upop.tasks._gather import batch_shapes, gather, gather_with_grad, world
from upop.tasks.base import Task
from upop.tasks.registry import register_task

#: the modules of the retrieval variants a family may name (``ModelClass.retrieval``)
_VARIANT_MODULES = {"blip": blip_retrieval, "siglip": siglip_retrieval}
#: the retrieval variant of each model class other than CLIP (its loss and evaluation), as the
#: families declare them
VARIANTS = {name: _VARIANT_MODULES[info.retrieval] for name, (_, info) in CLASSES.items() if info.retrieval}


def _variant(model):
    """The module that trains and evaluates ``model``'s class, or None for CLIP (this module)."""
    return VARIANTS.get(type(unwrap(model)).__name__)


class RetrievalTask(Task):
    name = "retrieval"
    main_metric = "r_mean"
    settings = ("itm_k",)
    #: BLIP: ITC candidates per query re-ranked by ITM (None: 256 above 2,000 test images, else 128)
    itm_k: int | None = None
    #: rows from Python: an image and its caption(s); rows with the same ``index`` show one image
    row_schema = RowSchema(required=("image", "caption"), layout="image_captions",
                           aliases={"image": ("img",), "caption": ("captions", "text")},
                           trainer=("pixel_values", "input_ids"), trainer_optional=("attention_mask",))

    def load_splits(self, data_dir, splits=("train", "val", "test"), image_root=None):
        """``train``: one sample per (image, caption) pair; other splits: one per image."""
        return {s: (RetrievalPairs if s == "train" else RetrievalDataset)(load_retrieval_split(data_dir, s, image_root))
                for s in splits}

    def collator(self, processor, seed: int = 0):
        """The batch maker; a NaFlex (SigLIP2) processor's batches also hold its ``pixel_attention_mask``
        and ``spatial_shapes`` (:func:`.siglip_retrieval.collator_class`)."""
        return siglip_retrieval.collator_class(processor)(processor, seed=seed, padding="longest")

    def loss(self, model: nn.Module, batch):
        """Symmetric InfoNCE over the global batch, with every pair of the same image (same
        ``index``) a positive: under N processes the normalised embeddings and image indices of
        all processes are gathered (gradients flow back, see :mod:`._gather`), so every caption
        of the N x B batch takes part, as with one process at batch N x B."""
        if _variant(model) is not None:
            return _variant(model).loss(model, batch)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        index = batch.get("index")
        if world()[1] == 1:
            logits_per_text = out.logits_per_text
        else:  # the product CLIPModel.forward computes, over the gathered embeddings
            batch_shapes(len(out.text_embeds), device=out.text_embeds.device)
            text, image = gather_with_grad(out.text_embeds), gather_with_grad(out.image_embeds)
            logits_per_text = (text @ image.t()) * unwrap(model).logit_scale.exp()
            index = gather(index.to(text.device)) if index is not None else None
        distill.expose("affinity", logits_per_text)
        return blip_retrieval.contrastive_loss(logits_per_text.t(), index)

    def teacher_replay(self, teacher, train, processor, batch_size: int = 64, accelerator=None):
        """A builder of the teacher's per-step similarities from embeddings computed once, or None
        where the teacher must run each step (captions behind a prompt): :mod:`._teacher_replay`."""
        from upop.tasks._teacher_replay import clip_affinity, retrieval_replay

        variant = _variant(teacher)
        embed = self.embed if variant is None else variant.embed
        affinity = clip_affinity if variant is None else variant.replay_affinity  # BLIP: its ITC matrix
        return retrieval_replay(self, teacher, train, processor, batch_size, accelerator, embed, affinity)

    @torch.no_grad()
    def embed(self, model, dataset: RetrievalDataset, processor, batch_size: int = 64, accelerator=None):
        """Normalised image and caption embeddings of ``dataset`` (all captions, flattened)."""
        return embed_split(model, dataset, self.collator(processor), batch_size, accelerator)

    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        if _variant(model) is not None:
            return _variant(model).evaluate(model, dataset, processor, batch_size, k=self.itm_k, accelerator=accelerator)
        image_emb, text_emb, txt2img, img2txt = self.embed(model, dataset, processor, batch_size, accelerator)
        return recall_at_k((image_emb @ text_emb.t()).cpu(), img2txt, txt2img)

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        collate = self.collator(processor)
        batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        keys = ("input_ids", "attention_mask", *siglip_retrieval.image_inputs(batch))
        return {k: batch[k].to(device) for k in keys}

    def text_tokens(self, processor, dataset) -> int | None:
        """Padded caption length of a sample of the data (what the text tower really sees)."""
        n = min(len(dataset.items), 64)
        texts = [c for i in range(n) for c in dataset.items[i].captions]
        return int(self.collator(processor).encode_texts(texts)["input_ids"].shape[1])


register_task(
    name="retrieval", task=RetrievalTask, writer=write_retrieval, checker=check_retrieval, teacher_cache=True,
    summary="image-text retrieval with CLIP, SigLIP or BLIP; Karpathy JSON; recall at 1, 5 and 10",
)
