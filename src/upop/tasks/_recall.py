"""Embedding retrieval evaluation shared by every retrieval variant: the embedding pass over a
split and recall at K both ways, in percent."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upop.tasks._shard import collated, evaluating, map_batches, on_device, sliced

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


@torch.no_grad()
def embed_split(model, dataset, collate, batch_size: int = 64, accelerator=None,
                image_keys: tuple[str, ...] = ("pixel_values",)):
    """Normalised image and caption embeddings of ``dataset`` (all captions, flattened) through
    ``model.get_image_features`` (given the ``image_keys`` of each image batch that it holds) /
    ``get_text_features``, batches made by ``collate``, split across the processes of
    ``accelerator``; with ``txt2img`` and ``img2txt``."""
    device = next(model.parameters()).device

    def run_images(batch: dict) -> torch.Tensor:
        inputs = on_device({k: batch[k] for k in image_keys if k in batch}, device)
        return model.get_image_features(**inputs).pooler_output.float().cpu()

    texts, txt2img, img2txt = dataset.flat_captions()

    def run_texts(enc: dict) -> torch.Tensor:
        return model.get_text_features(**on_device(enc, device)).pooler_output.float().cpu()

    with evaluating(model):
        images = map_batches(len(dataset), batch_size, run_images, accelerator,
                             load=collated(collate.collate_images, dataset.__getitem__))
        captions = map_batches(len(texts), batch_size, run_texts, accelerator, load=sliced(collate.encode_texts, texts))
    return F.normalize(torch.cat(images), dim=-1), F.normalize(torch.cat(captions), dim=-1), txt2img, img2txt
