"""The BLIP/UPop retrieval and captioning protocol: per-caption training samples, same-image
positives in the contrastive losses, ITM negatives of other images only, the ITM re-ranking
depth, and BLIP's caption prompt and beam search."""

from __future__ import annotations

import math

import pytest
import torch

from upop.config import UPopConfig
from upop.data import shapes as S
from upop.data.retrieval import RetrievalCollator, RetrievalDataset, RetrievalPairs
from upop.models.folders import make_model, make_processor
from upop.tasks import blip_retrieval, get_task
from upop.tasks.blip_retrieval import _hard_negatives, contrastive_loss, itm_depth, rerank


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shapes retrieval data: 3 train images x 2 captions, 3 val and 3 test images x 5 captions (32x32)."""
    root = tmp_path_factory.mktemp("protocol")
    S.write_retrieval(root, train=3, val=3, test=3, image_size=32, seed=0)
    return root


# ----------------------------------------------------------------------------- data


def test_training_samples_are_image_caption_pairs(data):
    splits = get_task("retrieval").load_splits(data)
    train, test = splits["train"], splits["test"]
    assert isinstance(train, RetrievalPairs)
    assert type(test) is RetrievalDataset and type(splits["val"]) is RetrievalDataset
    assert len(train) == sum(len(item.captions) for item in train.items) == 6 and len(test) == 3
    samples = [train[j] for j in range(len(train))]
    assert [(s["index"], s["caption"]) for s in samples] == [(i, c) for i, item in enumerate(train.items)
                                                             for c in item.captions]
    assert [s["sample"] for s in samples] == list(range(6))
    assert samples[0]["image"].tobytes() == samples[1]["image"].tobytes()  # two captions of image 0
    processor = make_processor("clip", 32)
    batch = RetrievalCollator(processor)(samples[::-1])
    assert batch["index"].tolist() == [2, 2, 1, 1, 0, 0] and batch["sample"].tolist() == [5, 4, 3, 2, 1, 0]
    texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts == [s["caption"] for s in samples[::-1]]
    assert get_task("caption").load_splits(data, splits=("train",))["train"].pairs == train.pairs


# ----------------------------------------------------------------------------- contrastive losses


def _by_hand(sim: list[list[float]], index: list[int]) -> float:
    """Symmetric cross-entropy with targets 1/(same-image count) on each same-image pair."""
    n = len(sim)

    def direction(rows):
        total = 0.0
        for a in range(n):
            lse = math.log(sum(math.exp(v) for v in rows[a]))
            pos = [b for b in range(n) if index[b] == index[a]]
            total += -sum((rows[a][b] - lse) / len(pos) for b in pos)
        return total / n

    return (direction(sim) + direction([list(col) for col in zip(*sim)])) / 2


def test_same_image_pairs_are_positives():
    sim = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.3, 1.5, 0.2, -0.4], [0.0, 0.7, 2.5, 1.0], [1.2, -0.3, 0.4, 0.9]])
    for index in ([0, 0, 1, 2], [4, 1, 4, 4], [0, 1, 2, 3]):
        got = contrastive_loss(sim, torch.tensor(index))
        assert float(got) == pytest.approx(_by_hand(sim.tolist(), index), rel=1e-6)
    plain = (torch.nn.functional.cross_entropy(sim, torch.arange(4))
             + torch.nn.functional.cross_entropy(sim.t(), torch.arange(4))) / 2
    assert float(contrastive_loss(sim)) == pytest.approx(float(plain), rel=1e-6)
    assert float(contrastive_loss(sim, torch.tensor([0, 0, 1, 2]))) != pytest.approx(float(plain), rel=1e-3)


def _batch(family, data, picks):
    train = get_task("retrieval").load_splits(data, splits=("train",))["train"]
    return get_task("retrieval").collator(make_processor(family, 32))([train[j] for j in picks])


def test_clip_loss_uses_the_image_index(data):
    batch = _batch("clip", data, [0, 1, 2, 4])  # captions 0 and 1 show image 0
    assert batch["index"].tolist() == [0, 0, 1, 2]
    model = make_model("clip", vocab_size=len(make_processor("clip", 32).tokenizer), image_size=32)
    task = get_task("retrieval")
    with torch.no_grad():
        loss = task.loss(model, batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
    assert float(loss) == pytest.approx(_by_hand(out.logits_per_image.tolist(), [0, 0, 1, 2]), rel=1e-5)


def test_blip_itc_and_itm_negatives_respect_the_image_index(data, monkeypatch):
    batch = _batch("blip-retrieval", data, [0, 1, 2, 3, 4, 5])  # every image twice
    model = make_model("blip-retrieval", vocab_size=len(make_processor("blip-retrieval", 32).tokenizer), image_size=32)
    seen = {}

    def spy(sim, same, idx):
        seen["sim"], seen["same"] = sim.detach().clone(), same.clone()
        seen["neg"] = _hard_negatives(sim, same, idx)
        return seen["neg"]

    monkeypatch.setattr(blip_retrieval, "_hard_negatives", spy)
    itc = {}
    real_itc = blip_retrieval.contrastive_loss
    monkeypatch.setattr(blip_retrieval, "contrastive_loss", lambda s, i: itc.setdefault("loss", real_itc(s, i)))
    with torch.no_grad():
        get_task("retrieval").loss(model, batch)
    index = batch["index"]
    assert torch.equal(seen["same"], index.view(-1, 1) == index.view(1, -1))
    assert float(itc["loss"]) == pytest.approx(_by_hand(seen["sim"].tolist(), index.tolist()), rel=1e-5)
    neg_img, neg_txt = seen["neg"]
    assert (index[neg_img] != index).all() and (index[neg_txt] != index).all()


@pytest.mark.parametrize("index", [[0, 0, 0, 0, 0, 1], [3, 3, 1, 1, 2, 2], [5, 9, 5, 9, 5, 9]])
def test_itm_negatives_are_never_the_same_image(index):
    idx = torch.tensor(index).view(-1, 1)
    same = idx == idx.t()
    for seed in range(20):
        sim = torch.randn(len(index), len(index), generator=torch.Generator().manual_seed(seed)) * 5
        keys = torch.cat([idx, torch.arange(len(index)).view(-1, 1) + seed], dim=1)
        neg_img, neg_txt = _hard_negatives(sim, same, keys)
        assert (idx[neg_img, 0] != idx[:, 0]).all() and (idx[neg_txt, 0] != idx[:, 0]).all()


def test_itm_negatives_are_drawn_with_softmax_weights():
    """The draw (an exponential race on the device) picks sample ``j`` with BLIP's probability
    ``softmax(sim)_j + 1e-4`` over the other images' samples: empirical frequencies over 4,000
    batches (different sample ids, so different noise) match within 4 standard errors."""
    idx = torch.tensor([0, 0, 1, 2, 3]).view(-1, 1)
    same = idx == idx.t()
    sim = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]] * 5)
    counts = torch.zeros(5)
    trials = 4000
    for t in range(trials):
        keys = torch.cat([idx, torch.arange(5).view(-1, 1) + 5 * t], dim=1)
        _, neg_txt = _hard_negatives(sim, same, keys)
        counts[neg_txt[0]] += 1  # image 0's hard negative text
    weights = (torch.softmax(sim[0], 0) + 1e-4).masked_fill(same[0], 0)
    p = weights / weights.sum()
    assert counts[:2].sum() == 0
    se = (p * (1 - p) / trials).sqrt()
    assert ((counts / trials - p).abs() <= 4 * se + 1e-9).all(), (counts / trials, p)


# ----------------------------------------------------------------------------- ITM re-ranking depth


@pytest.mark.parametrize("itm_k, n_images, expected", [
    (None, 5000, 256), (None, 2001, 256), (None, 2000, 128), (None, 1000, 128), (None, 3, 128),
    (7, 5000, 7), (300, 10, 300),
])
def test_itm_depth_rule(itm_k, n_images, expected):
    assert itm_depth(itm_k, n_images) == expected


def test_rerank_caps_k_at_the_candidates():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7]])
    i2t, t2i = rerank(sim, 300, lambda i, t: torch.zeros(len(i)))
    assert torch.equal(i2t, sim) and torch.equal(t2i, sim.t())  # every pair re-scored, none left at -100


@pytest.mark.parametrize("itm_k, expected", [(None, 128), (2, 2)])
def test_blip_evaluation_takes_k_from_the_task_setting(data, monkeypatch, itm_k, expected):
    seen = []
    real = blip_retrieval.rerank
    monkeypatch.setattr(blip_retrieval, "rerank", lambda sim, k, *a: seen.append(k) or real(sim, k, *a))
    task = get_task("retrieval").configure(UPopConfig(itm_k=itm_k))
    assert task.itm_k == itm_k
    processor = make_processor("blip-retrieval", 32)
    model = make_model("blip-retrieval", vocab_size=len(processor.tokenizer), image_size=32)
    test = task.load_splits(data, splits=("test",))["test"]
    metrics = task.evaluate(model, test, processor, batch_size=16)
    assert seen == [expected] and 0 <= metrics["r_mean"] <= 100


# ----------------------------------------------------------------------------- captioning


@pytest.fixture(scope="module")
def captioner():
    processor = make_processor("blip-caption", 32)
    return make_model("blip-caption", vocab_size=len(processor.tokenizer), image_size=32), processor


def test_caption_training_prompt_is_not_a_target(data, captioner):
    model, processor = captioner
    task = get_task("caption")
    train = task.load_splits(data, splits=("train",))["train"]
    batch = task.collator(processor)([train[0], train[3]])
    tok = processor.tokenizer
    prompt = tok("a picture of ")["input_ids"][:-1]  # start token + 3 words
    assert batch["prompt_length"].tolist() == [len(prompt)] * 2 == [4, 4]
    inputs = task._inputs(model, batch)
    for row, labels, sample in zip(inputs["input_ids"], inputs["labels"], (train[0], train[3])):
        assert row[:4].tolist() == [model.config.text_config.bos_token_id] + prompt[1:]
        assert (labels[:4] == -100).all()
        caption = tok(sample["caption"])["input_ids"][1:-1]
        assert labels[4:4 + len(caption)].tolist() == caption  # every caption word is a target
    loss = task.loss(model, batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("beams", [1, 3])
def test_caption_generation_as_blip(data, captioner, monkeypatch, beams):
    model, processor = captioner
    task = get_task("caption").configure(UPopConfig(caption_beams=beams))
    test = task.load_splits(data, splits=("test",))["test"]
    calls = []
    real = model.generate

    def spy(**kwargs):
        out = real(**kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(model, "generate", spy)
    tok = processor.tokenizer
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        saved = bias.clone()
        try:
            bias[model.config.text_config.sep_token_id] = 1e4  # [SEP] wins wherever it is allowed,
            bias[tok.convert_tokens_to_ids("blue")] = 1e3  # else "blue"
            short = task.predict(model, test, processor, batch_size=8)
            bias.copy_(saved)
            bias[tok.convert_tokens_to_ids("red")] = 1e4  # never ends: only max_length stops it
            long = task.predict(model, test, processor, batch_size=8)
        finally:
            bias.copy_(saved)
    for kwargs, _ in calls:
        assert kwargs["num_beams"] == beams and kwargs["max_length"] == 20 and kwargs["min_length"] == 5
        assert kwargs["input_ids"][:, 1:4].tolist() == [tok("a picture of")["input_ids"][1:4]] * len(test)
    # min_length 5 counts the start token and the 3 prompt words: one caption word, then [SEP]
    assert calls[0][1].shape[1] == 6 and short == ["blue"] * len(test)
    # max_length 20: 4 prompt tokens + 16 generated words, returned without the prompt
    assert calls[1][1].shape[1] == 20 and long == ["red " * 15 + "red"] * len(test)
