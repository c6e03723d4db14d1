"""The ``lm`` task: the text-corpus reader and checker, the Shapes writer, the collator, the loss
(against transformers' own), perplexity over a whole split, and the best-checkpoint direction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from upop.arch import pairs
from upop.cli.main import main
from upop.data import write_shapes
from upop.data.check import check_data
from upop.data.shapes import VOCABULARY
from upop.data.text_corpus import TextCorpus, load_lm_split
from upop.data.tokenizer import build_shapes_tokenizer, shapes_vocab
from upop.data.user_rows import adapt_splits
from upop.errors import ConfigError, DataError
from upop.measure.host_sync import count_syncs
from upop.models.folders import make_model
from upop.tasks import get_task, task_names
from upop.tasks._shard import evaluation_workers
from upop.tasks.lm import DEFAULT_BLOCK, LMCollator, block_length

POSITIONS = 64


@pytest.fixture(scope="module")
def tokenizer():
    return build_shapes_tokenizer(model_max_length=POSITIONS)


#: the registry's tiny models of the task (Llama, ...)
LM_MODELS = sorted(tiny for tiny, task in pairs() if task == "lm")


@pytest.fixture(scope="module", params=LM_MODELS)
def model(request):
    """A tiny random decoder of each family serving the task, over the Shapes vocabulary."""
    torch.manual_seed(0)
    return make_model(request.param, vocab_size=len(shapes_vocab())).eval()


def _one_line(fn, *needles) -> str:
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reader


def test_jsonl_reads_each_text_in_order(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "a red circle", "id": 7}, "", {"text": "two\nlines"},
                                      {"text": "   "}, {"meta": 1, "text": " kept as is "}])
    corpus = load_lm_split(tmp_path, "train")
    assert corpus.texts == ["a red circle", "two\nlines", " kept as is "]  # blank lines and texts skipped
    assert [corpus[i] for i in range(len(corpus))] == [{"text": t, "index": i} for i, t in enumerate(corpus.texts)]
    with pytest.raises(IndexError):
        corpus[3]


@pytest.mark.parametrize("text, documents", [
    ("a red circle\n\n\na blue\nsquare\n \nend\n", ["a red circle", "a blue\nsquare", "end"]),  # paragraphs
    ("a red circle\r\na blue square\n\n", ["a red circle", "a blue square"]),  # no inner blank line: lines
    ("\n\n one line only \n", ["one line only"]),
])
def test_txt_documents_are_paragraphs_else_lines(tmp_path, text, documents):
    (tmp_path / "val.txt").write_text(text, encoding="utf-8", newline="")
    assert load_lm_split(tmp_path, "val").texts == documents


def test_a_split_in_both_formats_is_refused(tmp_path):
    _jsonl(tmp_path / "test.jsonl", [{"text": "a"}])
    (tmp_path / "test.txt").write_text("a\n")
    _one_line(lambda: load_lm_split(tmp_path, "test"), "test.jsonl", "test.txt", "twice")


@pytest.mark.parametrize("bad, needle", [
    ("{\"text\": \"unterminated", "not valid JSON"),
    (["a", "list"], "is a JSON list"),
    ({"content": "no text"}, "no \"text\" field"),
    ({"text": 3}, "need a string"),
])
def test_a_bad_line_is_refused_naming_file_and_line(tmp_path, bad, needle):
    _jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, "", bad, {"text": "fine again"}])
    _one_line(lambda: load_lm_split(tmp_path, "train"), "train.jsonl", "line 3", needle)


@pytest.mark.parametrize("write, needles", [
    (lambda p: p.with_suffix(".jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n'), ("not UTF-8", "line 2")),
    (lambda p: p.with_suffix(".txt").write_text("\n \n"), ("holds no document",)),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": " "}\n'), ("holds no document",)),
    (lambda p: None, ("no train.jsonl or train.txt",)),
])
def test_unreadable_or_empty_splits_are_one_line(tmp_path, write, needles):
    write(tmp_path / "train")
    _one_line(lambda: load_lm_split(tmp_path, "train"), *needles)


def test_check_lists_every_bad_line(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "a"}, "[1]", {"text": None}, {"text": "b"}])
    _jsonl(tmp_path / "val.jsonl", [{"text": "c"}])
    (tmp_path / "test.txt").write_text("d\n")
    (tmp_path / "test.jsonl").write_text('{"text": "d"}\n')
    report = check_data("lm", tmp_path)
    assert len(report.problems) == 3, report.problems
    assert ["line 2" in p for p in report.problems[:2]] == [True, False]
    assert "line 3" in report.problems[1] and "twice" in report.problems[2]
    assert report.splits["train"] == {"documents": 2, "characters": 2}


# ----------------------------------------------------------------------------- Shapes writer


def test_shapes_corpus_round_trip_and_determinism(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        info = write_shapes("lm", tmp_path / name, train=5, val=2, test=1, image_size=32, seed=seed)
    assert {s: v["documents"] for s, v in info["splits"].items()} == {"train": 5, "val": 2, "test": 1}
    report = check_data("lm", tmp_path / "a")
    assert report.ok and report.splits["test"]["documents"] == 1, report.problems
    splits = get_task("lm").load_splits(tmp_path / "a")
    words = set(VOCABULARY)
    for corpus in splits.values():
        for text in corpus.texts:
            assert 2 <= len(text.split("\n")) <= 3 and set(text.split()) <= words, text
    same = [(tmp_path / n / "train.jsonl").read_bytes() for n in ("a", "b", "c")]
    assert same[0] == same[1] != same[2]


def test_data_shapes_then_check_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "shapes", "--task", "lm", "--out", str(out), "--train", "8", "--val", "4",
                 "--test", "4"]) == 0
    assert main(["data", "check", "--task", "lm", "--data", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4].startswith("train: 8 documents") and lines[-1].startswith("no problems")


# ----------------------------------------------------------------------------- collator, loss, evaluation


def test_collator_pads_right_and_scores_only_real_tokens(tokenizer):
    batch = LMCollator(tokenizer, 8)([{"text": "a red circle"}, {"text": " ".join(["a big red circle"] * 4)}])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (2, 8) and mask[0].tolist() == [1] * 5 + [0] * 3 and mask[1].all()  # cut at 8
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 4] == tokenizer.eos_token_id
    assert labels[0].tolist() == ids[0, :5].tolist() + [-100] * 3 and torch.equal(labels[1], ids[1])


def test_a_tokenizer_without_pad_token_pads_with_its_end_token(tokenizer):
    plain = build_shapes_tokenizer(model_max_length=POSITIONS)
    plain.pad_token = None
    batch = LMCollator(plain, 16)([{"text": "a red circle"}, {"text": "a"}])
    assert batch["input_ids"][1, 3:].tolist() == [tokenizer.eos_token_id] * 2
    assert batch["labels"][1, 3:].tolist() == [-100, -100]


def test_block_length_defaults_and_setting(tokenizer, model):
    task = get_task("lm")
    assert block_length(tokenizer) == POSITIONS and block_length(build_shapes_tokenizer(4096)) == DEFAULT_BLOCK
    assert block_length(tokenizer, model_limit=16) == 16 and block_length(tokenizer, 16, setting=8) == 8
    assert block_length(tokenizer, model_limit=40, setting=100) == 40  # never past the model's positions
    task.block_length = 12
    assert task.text_tokens(tokenizer, None) == 12 and task.collator(tokenizer).max_length == 12
    with pytest.raises(ConfigError, match=r"^block_length=1 is not allowed"):
        task.configure(type("Config", (), {"block_length": 1})())


def test_loss_is_transformers_own_and_reads_nothing_back(tokenizer, model):
    task = get_task("lm")
    texts = ["a red circle", "a small blue square to the left of a large green star", "two stars"]
    batch = task.collator(tokenizer)([{"text": t} for t in texts])
    ours, counter = count_syncs(task.loss, model, batch)
    theirs = model(**batch).loss
    assert torch.allclose(ours, theirs, atol=1e-6)
    # the loss itself reads nothing back (transformers' SDPA mask check may: a site "upop <- library")
    assert [site for site in counter.sites if " <- " not in site] == [], counter.sites
    ours.backward()
    assert model.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_perplexity_weighs_every_token_of_the_split(tokenizer, model):
    """Two batches of different lengths: perplexity is exp of the mean NLL over all scored tokens,
    not the mean of the batches' perplexities."""
    texts = ["a red circle", "one", " ".join(["a large blue star above a small red circle"] * 3)]
    corpus = TextCorpus(texts, "val")
    nll = tokens = hits = 0.0
    per_batch = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer([text], return_tensors="pt")["input_ids"]
            n = ids.shape[1] - 1
            logits = model(input_ids=ids).logits
            nll += float(model(input_ids=ids, labels=ids).loss) * n
            tokens += n
            hits += float((logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())
    metrics = get_task("lm").evaluate(model, corpus, tokenizer, batch_size=2)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert metrics["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["token_accuracy"] == pytest.approx(100 * hits / tokens)
    for lo in (0, 2):  # the batches' own perplexities, averaged, differ
        part = get_task("lm").evaluate(model, TextCorpus(texts[lo:lo + 2], "val"), tokenizer, batch_size=2)
        per_batch.append(part["perplexity"])
    assert abs(sum(per_batch) / 2 - metrics["perplexity"]) > 1e-3


def test_evaluation_is_the_same_with_loader_workers(tokenizer, model, tmp_path):
    write_shapes("lm", tmp_path, train=1, val=6, test=1, image_size=32, seed=3)
    val = get_task("lm").load_splits(tmp_path, ("val",))["val"]
    here = get_task("lm").evaluate(model, val, tokenizer, batch_size=4)
    with evaluation_workers(2):
        there = get_task("lm").evaluate(model, val, tokenizer, batch_size=4)
    assert here == there


def test_a_split_with_nothing_to_predict_is_one_line(tokenizer, model):
    task = get_task("lm")
    rows = [{"input_ids": [2]}, {"input_ids": [11]}]  # one token each: no next token to score
    splits, wrapped = adapt_splits(task, {"val": rows}, tokenizer)
    _one_line(lambda: task.evaluate(model, splits["val"], wrapped, batch_size=2), "'val'", "no token to predict")


def test_example_inputs_are_real_samples_on_the_models_device(tokenizer, model):
    inputs = get_task("lm").example_inputs(model, tokenizer, TextCorpus(["a red circle", "two stars"]), 3)
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].shape[0] == 3
    assert inputs["input_ids"][0].tolist()[:5] == tokenizer(["a red circle"])["input_ids"][0]
    assert inputs["input_ids"].device == next(model.parameters()).device


def test_rows_from_python_are_documents(tokenizer):
    task = get_task("lm")
    splits, same = adapt_splits(task, {"train": [{"text": "a red circle"}, {"text": "two stars"}]}, tokenizer)
    assert same is tokenizer and splits["train"][1] == {"index": 1, "text": "two stars"}
    rows = [{"input_ids": [2, 11, 3]}, {"input_ids": [2, 11, 29, 44, 3]}]
    splits, wrapped = adapt_splits(task, {"train": rows}, tokenizer)
    batch = task.collator(wrapped)([splits["train"][i] for i in range(2)])
    assert batch["input_ids"].tolist() == [[2, 11, 3, 0, 0], [2, 11, 29, 44, 3]]
    assert batch["labels"][0].tolist() == [2, 11, 3, -100, -100]


# ----------------------------------------------------------------------------- best checkpoint


@pytest.mark.parametrize("name", task_names())
def test_the_best_checkpoint_follows_the_metrics_direction(name):
    task = get_task(name)
    assert task.is_better(1.0, None) and not task.is_better(float("nan"), 1.0)
    assert task.is_better(2.0, 1.0) is task.higher_is_better
    assert task.is_better(1.0, 2.0) is not task.higher_is_better


def test_lower_perplexity_is_the_better_lm_checkpoint():
    task = get_task("lm")
    assert task.main_metric == "perplexity" and task.is_better(10.0, 12.0) and not task.is_better(12.0, 10.0)
