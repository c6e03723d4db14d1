"""Image-text retrieval with ``BlipForImageTextRetrieval`` (called by the ``retrieval`` task).

Training samples are (image, caption) pairs, each with its image index (:class:`~upop.data.
retrieval.RetrievalPairs`), so a batch may hold several captions of one image. Loss, as BLIP's
retrieval fine-tuning (``models/blip_retrieval.py``):

* ITC: image [CLS] -> ``vision_proj``, text [CLS] of the unimodal text encoder -> ``text_proj``,
  both L2-normalised; symmetric cross-entropy of the cosine similarities divided by a *fixed*
  temperature :data:`ITC_TEMPERATURE` = 0.07 (BLIP learns it from 0.07; the HF class has no
  ``temp`` parameter, so the task keeps it constant). The targets are every sample of the same
  image (same ``index``), normalised per row (:func:`contrastive_loss`), as BLIP's
  ``sim_targets``.
* ITM: the text encoder with cross-attention into the image, ``itm_head`` on [CLS], binary
  cross-entropy over the B positive pairs plus, for every text, a hard negative image and, for
  every image, a hard negative text, sampled with probability ``softmax(similarity)`` over the
  samples of OTHER images in the batch (BLIP's hard-negative mining: a caption of the same image
  is never a negative), drawn with a generator seeded from the batch's sample ids. Skipped when
  the batch holds a single image.

Under N processes the batch is the global one, as in BLIP: features, texts and image/sample
indices are gathered from all processes (:mod:`._gather`), so N processes at batch B train like
one at N x B. The loss calls the model's submodules (vision tower, text encoder, heads); it runs
as the forward of the data-parallel wrapper (:func:`._blip.through_wrapper`), so multi-process
training synchronises the gradients like every other task.

Evaluation, as BLIP: ITC similarity for every (image, text) pair, then for each image its top
``k`` texts, and for each text its top ``k`` images, are re-scored with ``ITM logit(match) +
ITC similarity``; every other pair scores -100. ``k`` is BLIP's ``k_test``
(:func:`itm_depth`: 256 for COCO-sized test splits, 128 for Flickr30K-sized ones, or the
``itm_k`` setting), capped by the number of candidates. Recall@1/5/10 both ways with the CLIP
task's metric names (:func:`upop.tasks._recall.recall_at_k`).
"""
from __future__ import annotations

import hashlib
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from upop.distill import distiller as distill
from upop.data.retrieval import RetrievalCollator
from upop.tasks._blip import encoder_ids, through_wrapper, unwrap
from upop.tasks._recall import METRICS, recall_at_k
from upop.measure.host_sync import DeviceBatch, host_value
from upop.tasks._gather import batch_shapes, gather, gather_with_grad, own_rows, pad_to, world
from upop.tasks._shard import collated, evaluating, map_batches, on_device, sliced

ITC_TEMPERATURE = 0.07
ITM_K_LARGE, ITM_K_SMALL, LARGE_TEST = 256, 128, 2000
"""BLIP's ``k_test``: 256 (COCO) when the test split has more than 2,000 images, else 128 (Flickr30K)."""


def itm_depth(itm_k: int | None, n_images: int) -> int:
    """ITC candidates per query re-ranked by ITM: ``itm_k`` if set, else BLIP's ``k_test`` for
    the split's size (:data:`ITM_K_LARGE` above :data:`LARGE_TEST` images, else :data:`ITM_K_SMALL`).
    :func:`rerank` caps it by the number of candidates."""
    if itm_k is not None:
        return int(itm_k)
    return ITM_K_LARGE if n_images > LARGE_TEST else ITM_K_SMALL


def contrastive_loss(sim_i2t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy of (images x texts) logits of one batch of pairs, where every pair
    of the same image (equal ``index``) is a positive: the targets are the same-image indicator
    normalised per row (BLIP's ITC ``sim_targets``; UPop's CLIP loss). Without ``index``, or
    with distinct indices, this is the usual InfoNCE on the diagonal."""
    n = sim_i2t.shape[0]
    idx = (index if index is not None else torch.arange(n, device=sim_i2t.device)).to(sim_i2t.device).view(-1, 1)
    same = (idx == idx.t()).to(sim_i2t.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * targets).sum(dim=1).mean()
    return (i2t + t2i) / 2


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
    out = m.text_encoder(input_ids=encoder_ids(m, input_ids), attention_mask=attention_mask,
                         encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask).last_hidden_state
    return m.itm_head(out[:, 0, :])


def loss(model, batch) -> torch.Tensor:
    """ITC + ITM loss of a batch ``{"pixel_values", "input_ids", "attention_mask", "index",
    "sample"}`` (``index``: image index; ``sample``: sample id, seeds the negatives' draw), run as
    the forward of the (possibly data-parallel) ``model``."""
    index, sample = batch.get("index"), batch.get("sample")
    keys = None if index is None else torch.stack([index, sample if sample is not None else index], dim=1)
    host_keys = None  # the collated keys, for the negatives' draw on the host (one process: no wait)
    if keys is not None and world()[1] == 1 and isinstance(batch, DeviceBatch):
        host_keys = torch.stack([host_value(batch, "index"), host_value(batch, "sample" if sample is not None
                                                                        else "index")], dim=1)
    return through_wrapper(model, partial(_loss, host_keys=host_keys), batch["pixel_values"], batch["input_ids"],
                           batch["attention_mask"], keys)


def _loss(m, pixel_values, ids, mask, keys, host_keys=None) -> torch.Tensor:
    """The global-batch loss: features, texts and ``keys`` rows (image index, sample id) of all
    processes are gathered (:mod:`._gather`), ITC runs over the whole N x B batch on every
    process, and each process scores the ITM pairs of its own rows, with hard negatives mined
    from the whole batch. ``host_keys``: the global ``keys`` on the host, where known."""
    rows, length = batch_shapes(len(ids), ids.shape[1], ids.device)
    f = _features(m, pixel_values, ids, mask)
    image_feat, text_feat = gather_with_grad(f["image_feat"]), gather_with_grad(f["text_feat"])
    sim_i2t = image_feat @ text_feat.t() / ITC_TEMPERATURE
    if keys is None:
        keys = torch.arange(len(sim_i2t), device=ids.device).view(-1, 1).expand(-1, 2)
        host_keys = torch.arange(len(sim_i2t)).view(-1, 1).expand(-1, 2)
    else:
        keys = gather(keys.to(ids.device))
    if host_keys is None:
        host_keys = keys.cpu()
    idx = keys[:, :1]
    itc = contrastive_loss(sim_i2t, idx)
    distill.expose("affinity", sim_i2t)
    same_host = host_keys[:, :1] == host_keys[:, :1].t()
    if bool(same_host.all()):
        return itc
    neg_img, neg_txt = _hard_negatives(sim_i2t, same_host, host_keys)
    own = own_rows(rows)
    neg_img, neg_txt = neg_img[own].to(ids.device), neg_txt[own].to(ids.device)
    images, all_images = f["image_embeds"], gather_with_grad(f["image_embeds"])
    all_ids, all_mask = gather(pad_to(ids, length)), gather(pad_to(mask, length))
    ids, mask = all_ids[own], all_mask[own]
    with distill.paused():  # the negatives are mined from each model's own similarities: not distilled
        logits = _itm_logits(m, torch.cat([ids, ids, all_ids[neg_txt]]), torch.cat([mask, mask, all_mask[neg_txt]]),
                             torch.cat([images, all_images[neg_img], images]))
    labels = torch.cat([torch.ones(rows, dtype=torch.long), torch.zeros(2 * rows, dtype=torch.long)]).to(logits.device)
    itm = gather_with_grad(F.cross_entropy(logits, labels, reduction="none")).mean()
    return itc + itm


@torch.no_grad()
def _hard_negatives(sim_i2t: torch.Tensor, same: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's hard-negative mining over the (global) batch: for every text an image and for every
    image a text, drawn with probability ``softmax(similarity)`` among the samples of other images
    (``same``: the samples' same-image matrix; those pairs get weight 0).

    The draw uses its own CPU generator seeded from ``idx`` (the batch's image indices and sample
    ids, on the host): a pure function of the batch (the same for N x B and 1 x N*B, and on every
    process), and no global random state is consumed, so a resumed run draws the same negatives.
    Only the noise is drawn on the host: each row's sample is ``argmax(w / E)`` with ``E`` standard
    exponential draws (the exponential race: ``P(j) = w_j / sum(w)``, what ``torch.multinomial``
    draws), computed where the similarities are, so nothing is read back from the device."""
    seed = int.from_bytes(hashlib.blake2b(idx.flatten().cpu().numpy().astype("<i8").tobytes(),
                                          digest_size=8).digest(), "little")
    gen = torch.Generator().manual_seed(seed)
    n = sim_i2t.shape[0]
    race = torch.empty(2, n, n).exponential_(generator=gen).to(sim_i2t.device)
    same, sim = same.to(sim_i2t.device), sim_i2t.float()
    w_i2t = (F.softmax(sim, dim=1) + 1e-4).masked_fill(same, 0)
    w_t2i = (F.softmax(sim.t(), dim=1) + 1e-4).masked_fill(same, 0)
    neg_img = (w_t2i / race[0]).argmax(dim=1)  # a hard negative image for every text
    neg_txt = (w_i2t / race[1]).argmax(dim=1)  # a hard negative text for every image
    return neg_img, neg_txt


def rerank(sim: torch.Tensor, k: int, itm_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           map_rows: Callable | None = None):
    """BLIP's re-ranking of an (images x texts) ITC similarity matrix.

    ``itm_score(image_idx, text_idx)`` returns the ITM match score of each pair. Returns
    ``(i2t, t2i)``: (images x texts) and (texts x images) score matrices where each query's top
    ``k`` candidates (``k`` capped at the number of candidates) score ``itm + sim`` and every other
    pair -100. ``map_rows(n, fn)`` returns ``[fn(lo, hi), ...]`` over blocks of the ``n`` queries
    (default: one block, this process).
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
def embed(model, dataset, processor, batch_size: int = 64, accelerator=None):
    """The ITC features of ``dataset``: L2-normalised ``vision_proj`` of every image's [CLS] and
    ``text_proj`` of every caption's (all captions, flattened), as the loss computes them, split
    across the processes of ``accelerator``; with ``txt2img`` and ``img2txt``."""
    m = unwrap(model)
    collate = RetrievalCollator(processor, padding="longest")
    device = next(m.parameters()).device
    texts, txt2img, img2txt = dataset.flat_captions()

    def run_images(pixels: torch.Tensor) -> torch.Tensor:
        return _features(m, pixel_values=pixels.to(device, non_blocking=True))["image_feat"].float().cpu()

    def run_texts(enc: dict) -> torch.Tensor:
        return _features(m, **on_device(enc, device))["text_feat"].float().cpu()

    with evaluating(m):
        images = torch.cat(map_batches(len(dataset), batch_size, run_images, accelerator,
                                       load=collated(collate.encode_images, dataset.__getitem__)))
        captions = torch.cat(map_batches(len(texts), batch_size, run_texts, accelerator,
                                         load=sliced(collate.encode_texts, texts)))
    return images, captions, txt2img, img2txt


def replay_affinity(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exposed ITC matrix from a batch's cached features (:mod:`._teacher_replay`): image rows
    over caption columns, divided by the fixed temperature, as :func:`_loss` computes it."""
    return lambda images, texts: images @ texts.t() / ITC_TEMPERATURE


@torch.no_grad()
def evaluate(model, dataset, processor, batch_size: int = 64, k: int | None = None,
             accelerator=None) -> dict[str, float]:
    """R@1/5/10 both ways after ITM re-ranking of the top ``k`` ITC candidates (default: BLIP's
    ``k_test`` for the split's size, :func:`itm_depth`); the embedding and the re-ranking split
    across the processes of ``accelerator``."""
    k = itm_depth(k, len(dataset))

    m = unwrap(model)
    collate = RetrievalCollator(processor, padding="longest")
    device = next(m.parameters()).device

    def run_images(pixels: torch.Tensor):
        f = _features(m, pixel_values=pixels.to(device, non_blocking=True))
        return f["image_embeds"].cpu(), f["image_feat"].float().cpu()

    texts, txt2img, img2txt = dataset.flat_captions()
    enc = {key: v.to(device) for key, v in collate.encode_texts(texts).items()}

    def run_texts(lo: int, hi: int) -> torch.Tensor:
        return _features(m, input_ids=enc["input_ids"][lo:hi], attention_mask=enc["attention_mask"][lo:hi])["text_feat"].float().cpu()

    with evaluating(m):
        embeds, img_feat = zip(*map_batches(len(dataset), batch_size, run_images, accelerator,
                                            load=collated(collate.encode_images, dataset.__getitem__)))
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
