"""VQA evaluation: the official VQAv2 accuracy rule by rule (expected values worked out by hand
from GT-Vision-Lab/VQA vqaEval.py), and BLIP's rank inference on a tiny random model."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from upop.config import UPopConfig
from upop.errors import ConfigError, DataError
from upop.tasks.vqa_metrics import CONTRACTIONS, normalize_answer, vqa_accuracy

NO = ["x"] * 6  # six annotators answering something else: 4 matching of 10 -> 1.0 when normalisation makes them match

# ----------------------------------------------------------------------------- the official accuracy


@pytest.mark.parametrize("pred, answers, expected", [
    # annotators agree: no normalisation, only newline/tab -> space and strip
    ("yes", ["yes"] * 10, 1.0),
    ("Yes", ["yes"] * 10, 0.0),
    ("yes.", ["yes"] * 10, 0.0),
    ("2", ["two"] * 10, 0.0),
    ("dog", ["the dog"] * 10, 0.0),
    ("dont", ["don't"] * 10, 0.0),
    ("\tyes\n", ["yes"] * 10, 1.0),
    ("red\tcar", ["red car"] * 10, 1.0),
    ("red car", ["red  car"] * 10, 0.0),  # inner spaces are kept
    ("yes", ["yes", "yes\t"] * 5, 1.0),  # equal once stripped: they agree
    # annotators disagree: answers and prediction normalised
    ("Yes!", ["yes"] * 9 + ["no"], 1.0),
    ("red car", ["red  car"] * 4 + NO, 1.0),
    ("Yes", ["yes"] * 4 + ["Yes"] * 6, 1.0),  # differ only by case: normalised, all ten match
    # number words and articles
    ("2", ["two"] * 3 + ["three"] * 7, 0.9),  # 3 "two" annotators see 2 others (2/3), 7 see 3 (1)
    ("none", ["0"] * 2 + ["1"] * 8, 0.6),
    ("a dog", ["the dog"] * 4 + NO, 1.0),
    # the contraction table, as it is
    ("dont", ["don't"] * 4 + NO, 1.0),
    ("whos", ["who's"] * 4 + NO, 1.0),
    ("its", ["it's"] * 4 + NO, 0.0),  # no "its" entry
    ("lets", ["let's"] * 4 + NO, 0.0),  # only "let's" -> "let's"
    ("im", ["i'm"] * 4 + NO, 0.0),  # the table's keys are "Im", "Ive": never match lower-case words
    ("Im", ["I'm"] * 4 + NO, 0.0),
    ("ive", ["i've"] * 4 + NO, 0.0),
    ("somebody'd", ["somebodyd"] * 4 + NO, 1.0),  # an entry that removes the apostrophe
    # punctuation
    ("1,000", ["1000"] * 4 + NO, 1.0),  # comma between digits: deleted
    ("1,5/6", ["156"] * 4 + NO, 1.0),  # ... and then every other mark is deleted too
    ("red,blue", ["red blue"] * 4 + NO, 1.0),  # comma with no space around: a space
    ("red, blue/green", ["red blue green"] * 4 + NO, 1.0),  # ", " -> deleted, "/" -> space
    ("t-shirt", ["t shirt"] * 4 + NO, 1.0),
    ("t - shirt", ["t shirt"] * 4 + NO, 1.0),
    ("3.5", ["3.5"] * 4 + NO, 1.0),  # period before a digit: kept
    ("3.5", ["35"] * 4 + NO, 0.0),
    ("yes.", ["yes"] * 4 + NO, 1.0),
    ("st.louis", ["stlouis"] * 4 + NO, 1.0),  # period before a letter: deleted, no space
    ("10:30", ["1030"] * 4 + NO, 0.0),  # ":" is not an official mark: kept
    ("10:30", ["10:30"] * 4 + NO, 1.0),
    # averaging over annotators: annotator i counts the OTHER nine
    ("yes", ["yes"] * 1 + ["no"] * 9, 0.3),
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
    ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
    ("maybe", ["yes"] * 4 + ["no"] * 6, 0.0),
    ("red", ["red"], 0.0),  # one annotator: nobody else to match (no special rule for few answers)
    ("red", ["red"] * 3, 2 / 3),
    ("red", ["red", "blue"], 0.5 * (0 + 1 / 3)),
])
def test_official_vqa_accuracy(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


@pytest.mark.parametrize("raw, expected", [
    ("The Red.", "red"), ("  a Circle!", "circle"), ("Two", "2"), ("none", "0"), ("an apple", "apple"),
    ("dont", "don't"), ("its", "its"), ("im", "im"), ("Im", "im"), ("lets", "lets"), ("let's", "let's"),
    ("1,000", "1000"), ("3.5", "3.5"), ("left/right", "left right"), ("left / right", "left right"),
    ("1,5/6", "156"), ("st.louis", "stlouis"), ("10:30", "10:30"), ("somebody'd", "somebodyd"),
    ("x" + "." * 33, "x."),  # at most 32 periods are deleted (the official count argument)
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert {"its", "lets", "im", "ive"}.isdisjoint(CONTRACTIONS)
    assert CONTRACTIONS["Im"] == "I'm" and CONTRACTIONS["twas"] == "'twas" and CONTRACTIONS["weve"] == "we've"


def test_no_answers_is_an_error():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ----------------------------------------------------------------------------- rank inference

CANDIDATES = ["top", "two red stars", "red", "red circle", "two", "three", "bottom", "green square"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shapes VQA data (2/1/1 images, 3 questions each) with an answer_list.json, its processor and a
    tiny model whose decoder cross-attention weights are re-drawn with std 0.5 (at the default
    init every question gets the same answer, which would hide a question/candidate mix-up)."""
    from upop.data import shapes_writer
    from upop.models.folders import make_model, make_processor

    data = tmp_path_factory.mktemp("vqa") / "data"
    shapes_writer("vqa")(data, train=2, val=1, test=1, image_size=32, seed=0)
    (data / "answer_list.json").write_text(json.dumps(CANDIDATES))
    processor = make_processor("blip-vqa", 32)
    model = make_model("blip-vqa", vocab_size=len(processor.tokenizer), image_size=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.text_decoder.named_parameters():
            if "crossattention" in name and name.endswith("weight") and "LayerNorm" not in name:
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
    return data, model, processor


def _task(**settings):
    from upop.tasks import get_task

    return get_task("vqa").configure(UPopConfig(**settings))


def _scores(model, processor, dataset, candidates):
    """``(first, full)[question][candidate]``: the log-probability of the first answer token and of
    the whole answer (with its closing [SEP]), each pair run alone through the model's forward with
    labels (mean loss x scored tokens)."""
    from upop.data.vqa import VQACollator

    collate, tok, cfg = VQACollator(processor), processor.tokenizer, model.config.text_config
    first, full = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        q = collate.encode_questions([sample])
        inputs = {"input_ids": q["input_ids"], "attention_mask": q["attention_mask"],
                  "pixel_values": collate.encode_images([sample])}
        first.append([]), full.append([])
        for answer in candidates:
            ids = tok(answer, return_tensors="pt")["input_ids"]
            ids[0, 0], ids[0, -1] = cfg.bos_token_id, cfg.sep_token_id
            only_first = ids.masked_fill(torch.arange(ids.shape[1]) > 1, -100)
            first[-1].append(-float(model(**inputs, decoder_input_ids=ids, labels=only_first).loss))
            full[-1].append(-float(model(**inputs, decoder_input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1))
    return first, full


def _brute_force(first, full, candidates, k):
    """BLIP's rule from the scores: keep the k likeliest first tokens (ties: earlier candidate),
    answer the best whole-answer score among them (ties: the one kept first)."""
    out = []
    for f, s in zip(first, full):
        kept = sorted(range(len(candidates)), key=lambda j: (-f[j], j))[:k]
        out.append(candidates[max(kept, key=lambda j: (s[j], -kept.index(j)))])
    return out


@torch.no_grad()
def test_rank_is_the_brute_force_choice(world):
    data, model, processor = world
    task = _task()
    train = task.load_splits(data, splits=("train",))["train"]
    assert train.candidates == CANDIDATES  # answer_list.json of the data folder
    first, full = _scores(model, processor, train, CANDIDATES)
    answers = {}
    for k in (len(CANDIDATES), 100, 3, 1):  # k >= candidates: the plain argmax of the whole-answer score
        task.vqa_k = k
        answers[k] = task.predict(model, train, processor, batch_size=4)
        assert len(answers[k]) == len(train) and set(answers[k]) <= set(CANDIDATES)
        assert answers[k] == _brute_force(first, full, CANDIDATES, k), k
    best = [CANDIDATES[max(range(len(CANDIDATES)), key=lambda j: s[j])] for s in full]
    assert answers[100] == answers[len(CANDIDATES)] == best and len(set(best)) > 1
    assert answers[1] != best  # the first-token shortlist matters


@torch.no_grad()
def test_rank_scores_each_question_with_its_own_states(world):
    """A batch of very different question states: each question's choice is the argmax of its own
    candidates' log-likelihoods, computed one candidate at a time from the decoder's logits."""
    from upop.tasks.vqa_rank import encode_candidates, rank_answers

    _, model, processor = world
    ids, mask = encode_candidates(processor.tokenizer, CANDIDATES, model)
    states = torch.randn(5, 4, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    got = rank_answers(model, states, torch.ones(5, 4, dtype=torch.long), ids, mask, len(CANDIDATES)).tolist()
    expected = []
    for s in states:
        scores = []
        for j in range(len(CANDIDATES)):
            row = ids[j:j + 1, :int(mask[j].sum())]
            logp = model.text_decoder(input_ids=row, encoder_hidden_states=s[None]).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[t - 1, row[0, t]]) for t in range(1, row.shape[1])))
        expected.append(max(range(len(CANDIDATES)), key=lambda j: scores[j]))
    assert got == expected and len(set(expected)) > 1


@torch.no_grad()
def test_rank_does_not_depend_on_batching(world, monkeypatch):
    import upop.tasks.vqa_rank as vqa_rank

    data, model, processor = world
    task = _task(vqa_k=3)
    train = task.load_splits(data, splits=("train",))["train"]
    whole = task.predict(model, train, processor, batch_size=4)
    assert len(set(whole)) > 1
    monkeypatch.setattr(vqa_rank, "LOGIT_BUDGET", 1)  # one (question, candidate) row per decoder call
    assert task.predict(model, train, processor, batch_size=1) == whole


def test_candidates_setting_file_and_training_answers(world, tmp_path):
    data, _, _ = world
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(["yes", "no", "yes", "two  red"]))
    assert _task(answer_list=str(mine)).load_splits(data, splits=("val",))["val"].candidates == ["yes", "no", "two red"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.json", "test.json"):
        (bare / name).write_text((data / name).read_text())
    (bare / "images").symlink_to(data / "images")
    counts = Counter(a for e in json.loads((data / "train.json").read_text()) for a in e["answer"])
    expected = sorted(counts, key=lambda a: (-counts[a], a))
    assert _task().load_splits(bare, splits=("test",))["test"].candidates == expected
    (bare / "train.json").unlink()
    with pytest.raises(DataError, match="candidate answers"):
        _task().load_splits(bare, splits=("test",))
    assert _task(vqa_inference="generate").load_splits(bare, splits=("test",))["test"].candidates is None


@pytest.mark.parametrize("content, needle", [
    (None, "not an existing file"),
    ("[\"yes\", ", "invalid JSON"),
    (json.dumps({"answers": ["yes"]}), "top level is a JSON dict"),
    (json.dumps([]), "is empty"),
    (json.dumps(["yes", 3]), "entry 1 is 3"),
    (json.dumps(["yes", " "]), "entry 1"),
])
def test_bad_answer_list_is_a_one_line_data_error(world, tmp_path, content, needle):
    data, _, _ = world
    path = tmp_path / "answers.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as err:
        _task(answer_list=str(path)).load_splits(data, splits=("test",))
    message = str(err.value)
    assert "answers.json" in message and needle in message and "\n" not in message


@torch.no_grad()
def test_generate_mode_still_works(world, tmp_path):
    data, model, processor = world
    task = _task(vqa_inference="generate")
    test = task.load_splits(data, splits=("test",))["test"]
    test.candidates = None  # generation needs no candidate list (rank mode refuses a dataset without one)
    got = task.predict(model, test, processor, batch_size=4)
    assert len(got) == len(test) and all(isinstance(a, str) for a in got)
    acc = task.evaluate(model, test, processor, batch_size=4)["vqa_acc"]
    expected = 100 * sum(vqa_accuracy(p, it.answers) for p, it in zip(got, test.items)) / len(got)
    assert acc == pytest.approx(expected)
    with pytest.raises(ConfigError, match="candidate answers"):
        _task().predict(model, test, processor)



@pytest.mark.parametrize("mode", ["generate", "rank"])
def test_question_encoder_reads_the_enc_token(world, mode):
    """With ``text_config.enc_token_id`` set, the question encoder (``text_encoder``) gets it as
    the first token in generation and in rank inference (BLIP's [ENC]); without it, the tokenizer's."""
    data, model, processor = world
    firsts = []

    def spy(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and kwargs.get("encoder_hidden_states") is not None:
            firsts.extend(ids[:, 0].tolist())

    handle = model.text_encoder.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        test = _task().load_splits(data, splits=("test",))["test"]
        for enc in (None, 5):
            model.config.text_config.enc_token_id = enc
            firsts.clear()
            _task(vqa_inference=mode).predict(model, test, processor, batch_size=4)
            first = processor.tokenizer(test.items[0].question)["input_ids"][0]  # the tokenizer's own first token
            assert first != 5 and firsts and set(firsts) == ({5} if enc == 5 else {first})
    finally:
        handle.remove()
        model.config.text_config.enc_token_id = None
