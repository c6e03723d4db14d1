"""Image-text retrieval with ``BlipForImageTextRetrieval`` (called by the ``retrieval`` task).

Loss, as BLIP's retrieval fine-tuning:

* ITC: image [CLS] -> ``vision_proj``, text [CLS] of the unimodal text encoder -> ``text_proj``,
  both L2-normalised; symmetric cross-entropy of the cosine similarities divided by a *fixed*
  temperature :data:`ITC_TEMPERATURE` = 0.07 (BLIP learns it from 0.07; the HF class has no
  ``temp`` parameter, so the task keeps it constant). Samples of the same image (same
  ``index``) are all positives (soft targets), as BLIP does with image ids.
* ITM: the text encoder with cross-attention into the image, ``itm_head`` on [CLS], binary
  cross-entropy over the B positive pairs plus, for every text, a hard negative image and, for
  every image, a hard negative text, sampled with probability ``softmax(similarity)`` over the
  samples of other images in the batch (BLIP's hard-negative mining), drawn with a generator
  seeded from the batch's sample indices. Skipped for a batch of one image.

Under N processes the batch is the global one, as in BLIP: features, texts and sample indices
are gathered from all processes (:mod:`._gather`), so N processes at batch B train like one at
N x B. The loss calls the model's submodules (vision tower, text encoder, heads); it runs as the
forward of the data-parallel wrapper (:func:`._blip.through_wrapper`), so multi-process training
synchronises the gradients like every other task.

Evaluation, as BLIP: ITC similarity for every (image, text) pair, then for each image its top
``k`` texts, and for each text its top ``k`` images, are re-scored with ``ITM logit(match) +
ITC similarity``; every other pair scores -100. Recall@1/5/10 both ways with the CLIP task's
metric names (:func:`upop.tasks.retrieval.recall_at_k`).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F

from ._blip import through_wrapper, unwrap
from ._gather import batch_shapes, gather, gather_with_grad, own_rows, pad_to
from ._shard import evaluating, map_batches

ITC_TEMPERATURE = 0.07
ITM_K = 16
"""Candidates re-ranked by ITM per query (capped by the number of candidates)."""


def _features(m, pixel_values=None, input_ids=None, attention_mask=None):
    out = {}
    if pixel_values is not None:
        out["image_embeds"] = m.vision_model(pixel_values=pixel_values).last_hidden_state
        out["image_feat"] = F.normalize(m.vision_proj(out["image_embeds"][:, 0, :]), dim=-1)
    if input_ids is not None:
        text = m.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out["text_feat"] = F.normalize(m.text_proj(text[:, 0, :]), dim=-1)
    return out


def _itm_logits(m, input_ids, attention_mask, image_embeds) -> torch.Tensor:
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    out = m.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask).last_hidden_state
    return m.itm_head(out[:, 0, :])


def loss(model, batch) -> torch.Tensor:
    """ITC + ITM loss of a batch ``{"pixel_values", "input_ids", "attention_mask", "index"}``,
    run as the forward of the (possibly data-parallel) ``model``."""
    return through_wrapper(model, _loss, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                           batch.get("index"))


def _loss(m, pixel_values, ids, mask, index) -> torch.Tensor:
    """The global-batch loss: features, texts and sample indices of all processes are gathered
    (:mod:`._gather`), ITC runs over the whole N x B batch on every process, and each process
    scores the ITM pairs of its own rows, with hard negatives mined from the whole batch."""
    rows, length = batch_shapes(len(ids), ids.shape[1], ids.device)
    f = _features(m, pixel_values, ids, mask)
    image_feat, text_feat = gather_with_grad(f["image_feat"]), gather_with_grad(f["text_feat"])
    sim_i2t = image_feat @ text_feat.t() / ITC_TEMPERATURE
    idx = gather(index.to(ids.device)) if index is not None else torch.arange(len(sim_i2t), device=ids.device)
    idx = idx.view(-1, 1)
    same = idx == idx.t()
    targets = same.float() / same.float().sum(dim=1, keepdim=True)
    itc = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean() - (F.log_softmax(sim_i2t.t(), dim=1) * targets).sum(1).mean()
    itc = itc / 2
    if bool(same.all()):
        return itc
    neg_img, neg_txt = _hard_negatives(sim_i2t, same, idx)
    own = own_rows(rows)
    neg_img, neg_txt = neg_img[own].to(ids.device), neg_txt[own].to(ids.device)
    images, all_images = f["image_embeds"], gather_with_grad(f["image_embeds"])
    all_ids, all_mask = gather(pad_to(ids, length)), gather(pad_to(mask, length))
    ids, mask = all_ids[own], all_mask[own]
    logits = _itm_logits(m, torch.cat([ids, ids, all_ids[neg_txt]]), torch.cat([mask, mask, all_mask[neg_txt]]),
                         torch.cat([images, all_images[neg_img], images]))
    labels = torch.cat([torch.ones(rows, dtype=torch.long), torch.zeros(2 * rows, dtype=torch.long)]).to(logits.device)
    itm = gather_with_grad(F.cross_entropy(logits, labels, reduction="none")).mean()
    return itc + itm


@torch.no_grad()
def _hard_negatives(sim_i2t: torch.Tensor, same: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's hard-negative mining over the (global) batch: for every text an image and for every
    image a text, drawn with probability ``softmax(similarity)`` among the samples of other images.

    The draw uses its own CPU generator seeded from the batch's sample indices: a pure function
    of the batch (the same for N x B and 1 x N*B, and on every process), and no global random
    state is consumed, so a resumed run draws the same negatives."""
    seed = int.from_bytes(hashlib.blake2b(idx.flatten().cpu().numpy().astype("<i8").tobytes(),
                                          digest_size=8).digest(), "little")
    gen = torch.Generator().manual_seed(seed)
    same = same.cpu()
    w_i2t = (F.softmax(sim_i2t.float().cpu(), dim=1) + 1e-4).masked_fill(same, 0)
    w_t2i = (F.softmax(sim_i2t.t().float().cpu(), dim=1) + 1e-4).masked_fill(same, 0)
    neg_img = torch.multinomial(w_t2i, 1, generator=gen).squeeze(1)  # a hard negative image for every text
    neg_txt = torch.multinomial(w_i2t, 1, generator=gen).squeeze(1)  # a hard negative text for every image
    return neg_img, neg_txt


def rerank(sim: torch.Tensor, k: int, itm_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           map_rows: Callable | None = None):
    """BLIP's re-ranking of an (images x texts) ITC similarity matrix.

    ``itm_score(image_idx, text_idx)`` returns the ITM match score of each pair. Returns
    ``(i2t, t2i)``: (images x texts) and (texts x images) score matrices where each query's top
    ``k`` candidates score ``itm + sim`` and every other pair -100. ``map_rows(n, fn)`` returns
    ``[fn(lo, hi), ...]`` over blocks of the ``n`` queries (default: one block, this process).
    """
    n_img, n_txt = sim.shape
    map_rows = map_rows or (lambda n, fn: [fn(0, n)])

    def rows(scores: torch.Tensor, k_: int, pair: Callable) -> torch.Tensor:
        def block(lo: int, hi: int) -> torch.Tensor:
            out = torch.full((hi - lo, scores.shape[1]), -100.0)
            for q in range(lo, hi):
                top_sim, top = scores[q].topk(k_)
                out[q - lo, top] = itm_score(*pair(q, top)).float().cpu() + top_sim.float().cpu()
            return out

        return torch.cat(map_rows(scores.shape[0], block))

    i2t = rows(sim, min(k, n_txt), lambda i, top: (torch.full((len(top),), i), top))
    t2i = rows(sim.t(), min(k, n_img), lambda t, top: (top, torch.full((len(top),), t)))
    return i2t, t2i


@torch.no_grad()
def evaluate(model, dataset, processor, batch_size: int = 64, k: int = ITM_K, accelerator=None) -> dict[str, float]:
    """R@1/5/10 both ways after ITM re-ranking of the top ``k`` ITC candidates (the embedding and
    the re-ranking split across the processes of ``accelerator``)."""
    from .retrieval import METRICS, RetrievalTask, recall_at_k

    m = unwrap(model)
    collate = RetrievalTask().collator(processor)
    device = next(m.parameters()).device

    def run_images(lo: int, hi: int):
        f = _features(m, pixel_values=collate.collate_images([dataset[i] for i in range(lo, hi)])["pixel_values"].to(device))
        return f["image_embeds"].cpu(), f["image_feat"].float().cpu()

    texts, txt2img, img2txt = dataset.flat_captions()
    enc = {key: v.to(device) for key, v in collate.encode_texts(texts).items()}

    def run_texts(lo: int, hi: int) -> torch.Tensor:
        return _features(m, input_ids=enc["input_ids"][lo:hi], attention_mask=enc["attention_mask"][lo:hi])["text_feat"].float().cpu()

    with evaluating(m):
        embeds, img_feat = zip(*map_batches(len(dataset), batch_size, run_images, accelerator))
        txt_feat = torch.cat(map_batches(len(texts), batch_size, run_texts, accelerator))
    image_embeds = torch.cat(embeds).to(device)
    sim = torch.cat(img_feat) @ txt_feat.t()

    def itm_score(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(img_idx), batch_size):
            ii, tt = img_idx[s:s + batch_size].to(device), txt_idx[s:s + batch_size].to(device)
            out.append(_itm_logits(m, enc["input_ids"][tt], enc["attention_mask"][tt], image_embeds[ii])[:, 1])
        return torch.cat(out)

    rows_per_block = max(1, batch_size // max(1, k))
    with evaluating(m):
        i2t, t2i = rerank(sim, k, itm_score, lambda n, fn: map_batches(n, rows_per_block, fn, accelerator))
    txt = recall_at_k(i2t, img2txt, txt2img)
    img = recall_at_k(t2i.t().contiguous(), img2txt, txt2img)
    out = {name: (txt if name.startswith("txt") else img)[name] for name in METRICS[:-1]}
    out["r_mean"] = sum(out.values()) / 6.0
    return {name: out[name] for name in METRICS}
