"""The four BLIP tasks (retrieval, VQA, captioning, NLVR2) end to end through the CLI on tiny
models and tiny Shapes data; their metrics against hand-computed values; bad input."""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch

import upop.api
from upop.cli.main import main

from ._families import largest_chunk_share

# task -> (make-model family, model class, main metric, every metric)
CASES = {
    "retrieval": ("blip-retrieval", "BlipForImageTextRetrieval", "r_mean",
                  {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}),
    "vqa": ("blip-vqa", "BlipForQuestionAnswering", "vqa_acc", {"vqa_acc"}),
    "caption": ("blip-caption", "BlipForConditionalGeneration", "cider", {"bleu4", "cider"}),
    "nlvr": ("blip-nlvr", "BlipForNLVR", "accuracy", {"accuracy"}),
}
TINY = ["--ratio", "0.5", "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--lr", "1e-3",
        "--eval-batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Lazily built ``{task: folder}`` with ``data/`` (24/8/8 Shapes samples: 12/4/4 images for VQA,
    12/8/8 for retrieval and captioning, whose training samples are 2 captions per image; 32x32) and ``model/``."""
    root, built = tmp_path_factory.mktemp("blip"), {}

    def get(task: str):
        if task not in built:
            folder = root / task
            sizes = {"vqa": ["12", "4", "4"], "retrieval": ["12", "8", "8"], "caption": ["12", "8", "8"]}.get(
                task, ["24", "8", "8"])  # 24 training samples: VQA 3 questions, retrieval/caption 2 captions per image
            assert main(["data", "shapes", "--task", task, "--out", str(folder / "data"), "--train", sizes[0],
                         "--val", sizes[1], "--test", sizes[2], "--image-size", "32"]) == 0
            assert main(["make-model", CASES[task][0], "--out", str(folder / "model"), "--image-size", "32"]) == 0
            built[task] = folder
        return built[task]

    return get


@pytest.fixture(scope="module")
def runs(worlds, tmp_path_factory):
    """Lazily compressed ``{task: out folder}`` (ratio 0.5, 1 search + 1 retrain epoch, batch 4)."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def get(task: str):
        if task not in done:
            world = worlds(task)
            out = root / task
            with pytest.MonkeyPatch.context() as mp:  # a short latency measurement: the test checks wiring
                mp.setattr(upop.api, "paired_latency", functools.partial(upop.api.paired_latency, rounds=1, seconds=0.05))
                assert main(["compress", "--model", str(world / "model"), "--task", task, "--data", str(world / "data"),
                             "--out", str(out), *TINY]) == 0
            done[task] = out
        return done[task]

    return get


@pytest.mark.parametrize("task", sorted(CASES))
def test_compress_reload_evaluate(task, worlds, runs, capsys):
    family, cls, main_metric, metrics = CASES[task]
    out = runs(task)
    report = json.loads((out / "report.json").read_text())
    assert report["model_class"] == cls and report["task"] == task
    assert set(report["compressed"]["metrics"]) == metrics and main_metric in metrics
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert 0.5 <= report["achieved_ratio"] < 0.5 + largest_chunk_share(worlds(task) / "model", report)

    import upop

    model = upop.load_compressed(out / "compressed")
    assert type(model).__name__ == cls
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", task, "--data",
                 str(worlds(task) / "data"), "--batch-size", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx(report["compressed"]["metrics"], abs=1e-9)


def test_vqa_plan_prunes_every_modality(runs):
    alloc = json.loads((runs("vqa") / "report.json").read_text())["allocation"]["by_modality"]
    assert set(alloc) == {"vision", "text", "fusion", "decoder"}
    for modality, kinds in alloc.items():
        kept = sum(cell["kept"] for cell in kinds.values())
        total = sum(cell["total"] for cell in kinds.values())
        assert 0 < kept < total, (modality, kinds)


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("raw, expected", [
    ("The Red.", "red"), ("  a Circle!", "circle"), ("dont", "don't"), ("1,000", "1000"), ("3.5", "3.5"),
    ("Two", "2"), ("none", "0"), ("left/right", "left right"),
])
def test_vqa_normalisation(raw, expected):
    from upop.tasks.vqa_metrics import normalize_answer

    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("pred, answers, expected", [
    ("2", ["two"] * 2 + ["three"] * 8, 0.6),  # leave-one-out: 2 subsets give 1/3, 8 give 2/3
    ("three", ["two"] * 2 + ["three"] * 8, 1.0),
    ("one", ["one"] + ["two"] * 9, 0.9 * 1 / 3),  # only the 9 subsets that keep the "one" count
    ("red", ["red"], 0.0),  # one annotator: no other one to match (official rule, see test_vqa_eval.py)
    ("blue", ["red", "red"], 0.0),
])
def test_vqa_accuracy(pred, answers, expected):
    from upop.tasks.vqa_metrics import vqa_accuracy

    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_bleu4_by_hand():
    from upop.tasks.caption_metrics import bleu

    # 1/2/3/4-gram precisions 6/7, 5/6, 4/5, 3/4 ("cross" is in no reference); lengths equal: no penalty
    refs = [["a red circle above a blue star", "a small red circle above a blue square"]]
    assert bleu(["a red circle above a blue cross"], refs)[3] == pytest.approx((3 / 7) ** 0.25)
    # corpus level: counts are summed over the hypotheses before the precisions
    refs2 = refs + [["a blue star", "the blue star is small"]]
    got = bleu(["a red circle above a blue cross", "a blue star"], refs2)[3]
    assert got == pytest.approx((9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25)
    # brevity penalty: every n-gram matches but the hypothesis is 6 words against 7
    assert bleu(["a red circle above a blue"], [["a red circle above a blue star"]])[3] == pytest.approx(math.exp(-1 / 6))


def test_cider_d_by_hand():
    from upop.tasks.caption_metrics import cider_d

    refs = [["red circle"], ["blue square"]]
    # every n-gram has df 1 of 2 images: idf log 2 everywhere. Image 1: cos 1 for n=1,2 (0 for n=3,4)
    # -> 10 * 2/4 = 5. Image 2: "blue circle": cos 1/2 for n=1 -> 10 * 0.5/4 = 1.25.
    assert cider_d(["red circle", "blue circle"], refs) == pytest.approx((5 + 1.25) / 2)
    # clipping (tf 2 of "blue" clipped to the reference's 1) and the length penalty (2 bigrams vs 1)
    second = (2 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert cider_d(["red circle", "blue square blue"], refs) == pytest.approx((5 + second) / 2)
    assert cider_d(["red circle"], [["red circle"]]) == 0.0  # one image: every idf is 0


def test_itm_rerank_on_a_constructed_matrix():
    from upop.tasks.blip_retrieval import rerank
    from upop.tasks.retrieval import recall_at_k

    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7]])
    itm = torch.tensor([[-1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    i2t, t2i = rerank(sim, 2, lambda i, t: itm[i, t])
    assert torch.allclose(i2t, torch.tensor([[-0.1, 2.5, -100.0], [-100.0, 0.8, 3.7]]))
    assert torch.allclose(t2i, torch.tensor([[-0.1, 0.2], [2.5, 0.8], [0.1, 3.7]]))
    i2t1, _ = rerank(sim, 1, lambda i, t: itm[i, t])  # k=1: only the ITC top-1 text is re-scored
    assert torch.allclose(i2t1, torch.tensor([[-0.1, -100.0, -100.0], [-100.0, 0.8, -100.0]]))
    # ITM moves image 0's best text from 0 (ITC) to 1, so R@1 of image 0 (true text 0) drops
    assert recall_at_k(sim, [[0], [1, 2]], [0, 1, 1])["txt_r1"] == 100.0
    assert recall_at_k(i2t, [[0], [1, 2]], [0, 1, 1])["txt_r1"] == 50.0


# ----------------------------------------------------------------------------- readers and bad input


def test_official_vqa_and_nlvr_layouts(tmp_path):
    from PIL import Image

    from upop.data.nlvr import load_nlvr_split
    from upop.data.vqa import load_vqa_split

    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"questions": [{"image_id": 42, "question": "What colour?", "question_id": 7}]}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": 7, "answers": [{"answer": "red"}, {"answer": "blue"}]}]}))
    (item,) = load_vqa_split(tmp_path, "val")
    assert item.answers == ["red", "blue"] and item.image.name == "COCO_val2014_000000000042.jpg"
    (tmp_path / "images" / "dev").mkdir(parents=True)
    for k in (0, 1):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "dev" / f"dev-850-0-img{k}.png")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"identifier": "dev-850-0-0", "sentence": "Two dogs.",
                                                    "label": "False", "left_url": "x"}) + "\n")
    (pair,) = load_nlvr_split(tmp_path, "dev")
    assert pair.label == 0 and pair.images[1].name == "dev-850-0-img1.png"


def _bad_vqa(worlds, tmp):
    data = tmp / "vqa"
    shutil.copytree(worlds("vqa") / "data", data)
    entries = json.loads((data / "test.json").read_text())
    entries[3]["answer"] = []
    (data / "test.json").write_text(json.dumps(entries))
    return ["--model", str(worlds("vqa") / "model"), "--task", "vqa", "--data", str(data)], ["test.json", "entry 3",
                                                                                              "no answers"]


def _bad_nlvr(worlds, tmp):
    data = tmp / "nlvr"
    shutil.copytree(worlds("nlvr") / "data", data)
    (data / "images" / "test_00005.png").unlink()
    return ["--model", str(worlds("nlvr") / "model"), "--task", "nlvr", "--data", str(data)], ["test.json",
                                                                                              "test_00005.png"]


def _wrong_task(worlds, tmp):
    return (["--model", str(worlds("retrieval") / "model"), "--task", "vqa", "--data", str(worlds("vqa") / "data")],
            ["BlipForQuestionAnswering", "BlipForImageTextRetrieval"])


@pytest.mark.parametrize("case", [_bad_vqa, _bad_nlvr, _wrong_task], ids=["vqa-no-answers", "nlvr-missing-image",
                                                                          "vqa-on-retrieval-model"])
def test_bad_input_is_one_line_exit_2(case, worlds, tmp_path, capsys):
    args, needles = case(worlds, tmp_path)
    capsys.readouterr()
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upop: error:"), err
    assert all(n in err[0] for n in needles), err
