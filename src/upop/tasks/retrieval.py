"""Image-text retrieval with CLIP: symmetric InfoNCE loss; R@1/5/10 both ways.

Evaluation follows the UPop/BLIP protocol: embed every test image and every caption, rank all
captions for each image (``txt_r*``: an image counts as found at K when any of its captions is
in the top K) and all images for each caption (``img_r*``); ``r_mean`` is the mean of the six.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.retrieval import RetrievalCollator, RetrievalDataset, load_retrieval_split
from . import blip_retrieval
from ._blip import unwrap
from ._gather import batch_shapes, gather_with_grad, world
from ._shard import evaluating, map_batches
from .base import Task

METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def recall_at_k(sim: torch.Tensor, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    """Recall metrics from an (images x texts) similarity matrix, in percent."""
    n_img, n_txt = sim.shape
    # image -> text: best (lowest) rank among the image's captions
    order = torch.argsort(sim, dim=1, descending=True)
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(n_txt).expand(n_img, n_txt))
    txt_rank = torch.tensor([int(rank_of[i, img2txt[i]].min()) for i in range(n_img)])
    # text -> image: rank of the caption's own image
    order_t = torch.argsort(sim.t(), dim=1, descending=True)
    target = torch.tensor(txt2img).unsqueeze(1)
    img_rank = (order_t == target).float().argmax(dim=1)
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float((txt_rank < k).float().mean())
        out[f"img_r{k}"] = 100.0 * float((img_rank < k).float().mean())
    out["r_mean"] = sum(out[m] for m in METRICS[:-1]) / 6.0
    return {m: out[m] for m in METRICS}


def _is_blip(model) -> bool:
    return type(getattr(model, "module", model)).__name__ == "BlipForImageTextRetrieval"


class RetrievalTask(Task):
    name = "retrieval"
    model_classes = ("CLIPModel", "BlipForImageTextRetrieval")  # BLIP: see tasks/blip_retrieval.py
    main_metric = "r_mean"

    def load_splits(self, data_dir, splits=("train", "val", "test"), image_root=None):
        return {s: RetrievalDataset(load_retrieval_split(data_dir, s, image_root)) for s in splits}

    def collator(self, processor, seed: int = 0):
        return RetrievalCollator(processor, seed=seed, padding="longest")

    def loss(self, model: nn.Module, batch):
        """Symmetric InfoNCE over the global batch: under N processes the normalised embeddings of
        all processes are gathered (gradients flow back, see :mod:`._gather`), so every caption of
        the N x B batch is a negative, as with one process at batch N x B."""
        if _is_blip(model):
            return blip_retrieval.loss(model, batch)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        if world()[1] == 1:
            logits_per_text = out.logits_per_text
        else:  # the product CLIPModel.forward computes, over the gathered embeddings
            batch_shapes(len(out.text_embeds), device=out.text_embeds.device)
            text, image = gather_with_grad(out.text_embeds), gather_with_grad(out.image_embeds)
            logits_per_text = (text @ image.t()) * unwrap(model).logit_scale.exp()
        labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
        return (F.cross_entropy(logits_per_text.t(), labels) + F.cross_entropy(logits_per_text, labels)) / 2

    @torch.no_grad()
    def embed(self, model, dataset: RetrievalDataset, processor, batch_size: int = 64, accelerator=None):
        """Normalised image and caption embeddings of ``dataset`` (all captions, flattened)."""
        collate = self.collator(processor)
        device = next(model.parameters()).device

        def run_images(lo: int, hi: int) -> torch.Tensor:
            batch = collate.collate_images([dataset[i] for i in range(lo, hi)])
            return model.get_image_features(pixel_values=batch["pixel_values"].to(device)).pooler_output.float().cpu()

        texts, txt2img, img2txt = dataset.flat_captions()

        def run_texts(lo: int, hi: int) -> torch.Tensor:
            enc = {k: v.to(device) for k, v in collate.encode_texts(texts[lo:hi]).items()}
            return model.get_text_features(**enc).pooler_output.float().cpu()

        with evaluating(model):
            images = map_batches(len(dataset), batch_size, run_images, accelerator)
            text_emb = map_batches(len(texts), batch_size, run_texts, accelerator)
        image_emb = F.normalize(torch.cat(images).float(), dim=-1)
        text_emb = F.normalize(torch.cat(text_emb).float(), dim=-1)
        return image_emb, text_emb, txt2img, img2txt

    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        if _is_blip(model):
            return blip_retrieval.evaluate(model, dataset, processor, batch_size, accelerator=accelerator)
        image_emb, text_emb, txt2img, img2txt = self.embed(model, dataset, processor, batch_size, accelerator)
        return recall_at_k((image_emb @ text_emb.t()).cpu(), img2txt, txt2img)

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        collate = self.collator(processor)
        batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}

    def text_tokens(self, processor, dataset) -> int | None:
        """Padded caption length of a sample of the data (what the text tower really sees)."""
        n = min(len(dataset), 64)
        texts = [c for i in range(n) for c in dataset.items[i].captions]
        return int(self.collator(processor).encode_texts(texts)["input_ids"].shape[1])
