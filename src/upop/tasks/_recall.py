"""Recall at K of image-text retrieval, both ways, in percent (shared by every retrieval variant)."""

from __future__ import annotations

import torch

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
