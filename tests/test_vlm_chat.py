"""``--task vqa`` for chat-template vision-language models (:mod:`upop.tasks.vlm_chat`), over every
tiny model whose class the registry declares ``chat``: the loss is on the answer tokens only, it
trains, the evaluation (greedy generation from left-padded prompts) is the same in batches, with
DataLoader workers and one question at a time, ``rank`` inference and a processor without a chat
template are refused in one line, and ``upop.compress`` runs end to end at ratio 0.5 (the search
pruning the vision tower and the language model), with the default settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

import upop
from upop.arch import CLASSES, TINY
from upop.cli.main import main
from upop.data.vqa import draw_answer
from upop.errors import ConfigError
from upop.models.folders import load_any
from upop.tasks import get_task
from upop.tasks._shard import evaluation_workers

#: tiny models of the registry whose class is a chat-template vision-language model
CHAT = sorted(t.name for t in TINY.values() if CLASSES[t.model_class][1].chat)


def test_the_table_is_not_empty():
    assert CHAT, "no tiny model of a chat-template vision-language class"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``world(name) -> (model folder, data folder)``: tiny model ``name`` and Shapes VQA data
    (24/8/8 images, 3 questions each; 32x32), written through the CLI once."""
    root = tmp_path_factory.mktemp("chat")
    data = root / "data"
    assert main(["data", "shapes", "--task", "vqa", "--out", str(data), "--train", "24", "--val", "8", "--test", "8",
                 "--image-size", "32"]) == 0

    def get(name: str):
        model = root / name
        if not model.is_dir():
            assert main(["make-model", name, "--out", str(model), "--image-size", "32"]) == 0
        return model, data

    return get


@pytest.fixture
def setup(world):
    """``setup(name) -> (model, processor, task, splits)``: the task checked against the model
    (``vqa_inference`` auto, i.e. generate)."""
    def get(name: str, **settings):
        model_dir, data = world(name)
        model, processor = load_any(model_dir)
        task = get_task("vqa")
        task.vqa_inference = settings.get("vqa_inference", "auto")
        task.check_model(model)
        return model, processor, task, task.load_splits(data)

    return get


def _train(model, task, batch, steps: int) -> list[float]:
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("name", CHAT)
def test_only_the_answer_tokens_carry_loss(name, setup):
    model, processor, task, splits = setup(name)
    collate = task.collator(processor, seed=3)
    collate.set_epoch(2)
    samples = [splits["train"][i] for i in range(6)]
    batch = collate(samples)
    prompts = collate.prompts(samples)  # the evaluation's prompts: the same tokens, left-padded
    image = processor.image_token_id
    for row, sample in enumerate(samples):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        start = int(batch["prompt_lengths"][row])
        prompt = prompts["input_ids"][row][prompts["attention_mask"][row].bool()]
        assert torch.equal(ids[:start], prompt)  # what precedes the answer is exactly the prompt
        scored = (labels != -100).nonzero().flatten()
        assert scored.numel() > 0 and scored.tolist() == list(range(start, start + scored.numel()))
        assert torch.equal(labels[scored], ids[scored]) and mask[scored].all()
        assert (labels[:start] == -100).all() and (labels[mask == 0] == -100).all()
        assert (ids[:start] == image).any() and not (ids[scored] == image).any()
        text = processor.tokenizer.decode(ids[:start], skip_special_tokens=True)
        assert sample["question"] in " ".join(text.split())  # the question is in the prompt: no loss on it
        answer = processor.tokenizer.decode(labels[scored], skip_special_tokens=True).strip()
        assert answer == draw_answer(sample, 3, 2) and answer in sample["answers"]
    assert set(batch) - {"input_ids", "attention_mask", "labels", "prompt_lengths"} == {"pixel_values"}


@pytest.mark.parametrize("name", CHAT)
def test_the_loss_is_finite_and_falls(name, setup):
    model, processor, task, splits = setup(name)
    batch = task.collator(processor)([splits["train"][i] for i in range(8)])
    losses = _train(model, task, batch, 6)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", CHAT)
def test_the_evaluation_is_the_same_batched_with_workers_and_one_by_one(name, setup):
    model, processor, task, splits = setup(name)
    train, val = splits["train"], splits["val"]
    _train(model, task, task.collator(processor)([train[i] for i in range(24)]), 15)  # answers that are words
    alone = task.predict(model, val, processor, batch_size=1)
    batched = task.predict(model, val, processor, batch_size=5)  # left padding: the questions differ in length
    with evaluation_workers(2):
        workers = task.predict(model, val, processor, batch_size=5)
    assert batched == alone == workers and any(alone)
    metrics = task.evaluate(model, val, processor, batch_size=5)
    assert set(metrics) == {"vqa_acc"} and 0.0 <= metrics["vqa_acc"] <= 100.0
    with evaluation_workers(2):
        assert task.evaluate(model, val, processor, batch_size=5) == metrics


@pytest.mark.parametrize("name", CHAT)
def test_rank_inference_is_refused_and_auto_generates(name, setup):
    model, processor, task, splits = setup(name, vqa_inference="auto")  # auto: generation, no answer list
    assert splits["val"].candidates is None
    task.vqa_inference = "rank"
    for call in (lambda: task.check_model(model), lambda: task.evaluate(model, splits["val"], processor)):
        with pytest.raises(ConfigError) as err:
            call()
        line = str(err.value)
        assert "\n" not in line and "vqa_inference=rank" in line and type(model).__name__ in line
        assert "generate" in line


@pytest.mark.parametrize("name", CHAT)
def test_a_processor_without_a_chat_template_is_refused(name, setup):
    model, processor, task, splits = setup(name)
    processor.chat_template = None
    for given in (processor, processor.tokenizer):
        with pytest.raises(ConfigError) as err:
            task.collator(given)
        line = str(err.value)
        assert "\n" not in line and type(given).__name__ in line and "chat template" in line


@pytest.mark.parametrize("name", CHAT)
def test_compress_end_to_end(name, world, tmp_path):
    """Ratio 0.5, one search and one retraining epoch with the default settings (``vqa_inference``
    auto: generation for a chat model): both towers pruned, the report's metric in range, the
    compressed folder reloads and evaluates to the report's value. (Its steps' device reads are
    in the host-sync table, :mod:`tests.test_host_sync`, with every registered pair.)"""
    model_dir, data = world(name)
    config = upop.UPopConfig(ratio=0.5, search_epochs=1, retrain_epochs=1, batch_size=8, lr=1e-3, eval_batch_size=16,
                             latency_time=0.02, progress_every=86_400, checkpoint_every=10**6)
    model, processor = load_any(model_dir)
    upop.compress(model, "vqa", data, processor=processor, config=config, out_dir=tmp_path / "out",
                  progress=False, log=lambda _: None)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"] == "vqa" and report["model_class"] == TINY[name].model_class
    assert 0.0 <= report["compressed"]["metrics"]["vqa_acc"] <= 100.0
    assert report["compressed"]["params"] < report["dense"]["params"] and report["achieved_ratio"] >= 0.5
    by_modality = report["allocation"]["by_modality"]
    assert {"vision", "text"} <= set(by_modality)
    for modality, kinds in by_modality.items():
        kept, total = (sum(cell[k] for cell in kinds.values()) for k in ("kept", "total"))
        assert 0 < kept < total, (modality, kinds)
    again = upop.evaluate(tmp_path / "out" / "compressed", "vqa", data, config=config, batch_size=16)
    assert again["vqa_acc"] == pytest.approx(report["compressed"]["metrics"]["vqa_acc"], abs=1e-9)
