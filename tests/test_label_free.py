"""Label-free compression (``--task distill``): unlabelled data, the loss and the agreement metrics
against the dense teacher, over every supported family, one end-to-end run per modality, and the
one-line errors for bad data or models."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import upop
import upop.models.folders as M
from upop.arch.registry import CLASSES
from upop.arch.registry import TINY as REGISTERED_TINY
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.data.unlabelled import (MIN_DISTINCT, SPLITS, UnlabelledCollator, assign_splits, check_split,
                                  load_unlabelled, write_unlabelled)
from upop.distill.distiller import make_teacher
from upop.errors import DataError, TaskError
from upop.tasks import get_task
from upop.tasks.distill import kind, outputs

from ._families import FAMILIES


def _bert(cls_name: str, **config):
    torch.manual_seed(0)
    cfg = M.make_model("bert").config
    for k, v in config.items():
        setattr(cfg, k, v)
    return getattr(transformers, cls_name)(cfg).eval()


# case -> (model builder, processor family, metrics expected besides "cosine")
CASES = {
    "clip": (FAMILIES["clip"][0], "clip", {"cosine_image", "cosine_text", "top1_agreement"}),
    "siglip": (FAMILIES["siglip"][0], "siglip", {"cosine_image", "cosine_text", "top1_agreement"}),
    "vit": (FAMILIES["vit"][0], "vit", {"cosine_pooled", "cosine_tokens", "top1_agreement"}),
    "vit-model": (FAMILIES["vit-model"][0], "vit", {"cosine_pooled", "cosine_tokens"}),
    "deit-teacher": (FAMILIES["deit-teacher"][0], "deit", {"cosine_pooled", "cosine_tokens", "top1_agreement"}),
    "dinov2": (FAMILIES["dinov2"][0], "dinov2", {"cosine_pooled", "cosine_tokens", "top1_agreement"}),
    "dinov2-model": (FAMILIES["dinov2-model"][0], "dinov2", {"cosine_pooled", "cosine_tokens"}),
    "clip-vision": (FAMILIES["clip-vision"][0], "clip", {"cosine_pooled", "cosine_tokens"}),
    "clip-text": (FAMILIES["clip-text"][0], "clip", {"cosine_pooled", "cosine_tokens"}),
    "siglip-vision": (FAMILIES["siglip-vision"][0], "siglip", {"cosine_pooled", "cosine_tokens"}),
    "siglip-text": (FAMILIES["siglip-text"][0], "siglip", {"cosine_pooled", "cosine_tokens"}),
    "siglip2": (FAMILIES["siglip2"][0], "siglip2", {"cosine_image", "cosine_text", "top1_agreement"}),
    "siglip2-vision": (FAMILIES["siglip2-vision"][0], "siglip2", {"cosine_pooled", "cosine_tokens"}),
    "siglip2-text": (FAMILIES["siglip2-text"][0], "siglip2", {"cosine_pooled", "cosine_tokens"}),
    "bert": (FAMILIES["bert"][0], "bert", {"cosine_pooled", "cosine_tokens", "top1_agreement"}),
    "bert-model": (lambda: _bert("BertModel"), "bert", {"cosine_pooled", "cosine_tokens"}),
    "bert-mlm": (lambda: _bert("BertForMaskedLM"), "bert", {"cosine_pooled", "cosine_tokens", "top1_agreement"}),
    "bert-qa": (lambda: _bert("BertForQuestionAnswering", num_labels=2), "bert", {"cosine_pooled", "cosine_tokens",
                                                                    "top1_agreement"}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """100 Shapes images and captions in the unlabelled layout."""
    root = tmp_path_factory.mktemp("unlabelled") / "data"
    write_unlabelled(root, train=90, val=5, test=5, image_size=32)
    return root


def _prepared(case: str, data_dir):
    build, family, _ = CASES[case]
    model, processor, task = build(), M.make_processor(family, 32), get_task("distill")
    task.check_model(model)
    splits = task.load_splits(data_dir)
    for ds in splits.values():
        task.check_data(model, ds)
    task.set_teacher(make_teacher(model))
    return model, processor, task, splits


def _perturb(model, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_splits_are_deterministic_disjoint_and_complete(data):
    a, b = load_unlabelled(data), load_unlabelled(data)
    assert [d.items for d in a.values()] == [d.items for d in b.values()]
    for part in ("images", "texts"):
        seen = [x for s in SPLITS for x in getattr(a[s], part)]
        assert len(seen) == 100 and all(len(getattr(a[s], part)) >= 1 for s in SPLITS)
    assert not set(a["train"].images) & (set(a["val"].images) | set(a["test"].images))
    assert len(a["train"]) > 3 * (len(a["val"]) + len(a["test"]))
    # adding keys moves none of the existing ones; equal keys share a split
    keys = [f"img_{i}.png" for i in range(200)]
    where = {keys[i]: s for s, idx in assign_splits(keys).items() for i in idx}
    more = keys + [f"new_{i}.png" for i in range(50)] + ["img_3.png"]
    split_more = assign_splits(more)
    moved = {more[i]: s for s, idx in split_more.items() for i in idx}
    assert all(moved[k] == where[k] for k in keys)
    assert where["img_3.png"] in [s for s, idx in split_more.items() if len(more) - 1 in idx]
    # the fewest keys that can be split give one to each split
    assert sorted(len(v) for v in assign_splits(["x", "y", "z"]).values()) == [1, 1, 1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_zero_for_the_teacher_and_positive_after_a_change(case, data):
    model, processor, task, splits = _prepared(case, data)
    train = splits["train"]
    batch = task.collator(processor)([train[i] for i in range(4)])
    expected = {"vision": {"pixel_values"}, "text": {"input_ids", "attention_mask"}}
    want = expected.get(kind(model), {"pixel_values", "input_ids", "attention_mask"})
    if "pixel_values" in want and case.startswith("siglip2"):  # NaFlex: the patch mask and grid come along
        want = want | {"pixel_attention_mask", "spatial_shapes"}
    assert set(batch) - {"index"} == want
    assert task.loss(model, batch).item() == pytest.approx(0.0, abs=1e-5)
    dense = task.evaluate(model, splits["val"], processor, batch_size=3)
    assert set(dense) == {"cosine"} | CASES[case][2] and dense["cosine"] == next(iter(dense.values()))
    assert all(v == pytest.approx(100.0, abs=1e-9) for v in dense.values()), dense
    _perturb(model)
    loss = task.loss(model, batch)
    assert loss.item() > 0.01
    loss.backward()  # the student learns through it; the teacher is frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in task.teacher.parameters())
    assert task.evaluate(model, splits["val"], processor, batch_size=3)["cosine"] < 99.0


@pytest.mark.parametrize("case", ["clip", "siglip", "siglip2", "vit", "bert"])
def test_cached_teacher_gives_the_forwards_targets(case, data):
    """``distill_cache``: a two-tower model's targets (embeddings and the similarity matrix) come
    from a table built once, equal to the teacher's forward, and so does the loss; image and text
    models keep the forward (their targets hold every token's state)."""
    model, processor, task, splits = _prepared(case, data)
    train = splits["train"]
    batch = task.collator(processor)([train[i] for i in (7, 2, 30, 11)])
    student = copy.deepcopy(model)
    _perturb(student)
    forward_loss = task.loss(student, batch)
    cached = task.cache_teacher(train, processor, batch_size=5)
    assert cached == task.teacher_cached == (kind(model) == "paired")
    if not cached:
        return
    with torch.no_grad():
        target = outputs(task.teacher, batch)
    replayed = task._cached_targets(batch)
    for name, tensor in target["embeds"].items():
        torch.testing.assert_close(replayed["embeds"][name], tensor.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replayed["affinity"], target["affinity"].float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(task.loss(student, batch), forward_loss, atol=1e-5, rtol=1e-4)
    task.set_teacher(task.teacher)  # a new teacher drops the table
    assert not task.teacher_cached



def test_teacher_table_beyond_the_limit_keeps_the_forward(data, monkeypatch):
    """A training set whose table would pass CACHE_LIMIT_BYTES is not cached (the run distils with
    the teacher's forward), so an unlabelled folder of millions of items cannot fill host memory."""
    import upop.tasks._teacher_replay as D

    model, processor, task, splits = _prepared("clip", data)
    width = model.config.projection_dim * 2
    monkeypatch.setattr(D, "CACHE_LIMIT_BYTES", len(splits["train"]) * width * 4 - 1)
    assert not task.cache_teacher(splits["train"], processor, batch_size=8) and not task.teacher_cached
    monkeypatch.setattr(D, "CACHE_LIMIT_BYTES", len(splits["train"]) * width * 4)
    assert task.cache_teacher(splits["train"], processor, batch_size=8) and task.teacher_cached


@pytest.mark.parametrize("case,param", [("vit", "classifier.weight"), ("bert-mlm", "cls.predictions.bias"),
                                        ("clip", "logit_scale"), ("siglip", "logit_bias")])
def test_heads_and_similarity_structure_are_distilled(case, param, data):
    """A change that leaves every embedding as it was (a head, CLIP's temperature, SigLIP's bias)
    still costs loss: the logits / similarity term sees it."""
    model, processor, task, splits = _prepared(case, data)
    with torch.no_grad():
        p = model.get_parameter(param)
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * (1.0 if p.dim() == 2 else 3.0))
    batch = task.collator(processor)([splits["train"][i] for i in range(8)])
    assert task.loss(model, batch).item() > 1e-3
    assert task.evaluate(model, splits["val"], processor)["cosine"] == pytest.approx(100.0, abs=1e-6)


def test_clip_agreement_counts_images_whose_top_text_changes(data):
    model, processor, task, splits = _prepared("clip", data)
    with torch.no_grad():  # the same image/text embeddings up to scale: agreement and cosine stay 100
        model.visual_projection.weight.mul_(3.0)
    same = task.evaluate(model, splits["train"], processor, batch_size=16)
    assert same["cosine"] == pytest.approx(100.0, abs=1e-6) and same["top1_agreement"] == 100.0
    _perturb(model, 0.2)
    changed = task.evaluate(model, splits["train"], processor, batch_size=16)
    assert changed["top1_agreement"] < 100.0 and changed["cosine_image"] < 99.0


def test_every_class_of_the_lm_task_is_declared_causal():
    """Next-token models read left to right: the registry says so, and distill reads the registry."""
    lm = [cls for _, cls in CLASSES.values() if "lm" in cls.tasks]
    assert lm and all(cls.causal for cls in lm), [cls.name for cls in lm if not cls.causal]


def _text_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 5, 6, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("name", [n for n, t in REGISTERED_TINY.items() if CLASSES[t.model_class][1].causal])
def test_a_declared_causal_class_is_summarised_by_its_last_real_token(name):
    torch.manual_seed(0)
    found = outputs(M.make_model(name).eval(), _text_batch())
    last, mask = found["tokens"]
    rows = torch.arange(last.shape[0])
    assert torch.equal(found["embeds"]["pooled"], last[rows, mask.sum(1) - 1])
    assert not torch.allclose(found["embeds"]["pooled"], last[:, 0])


@pytest.mark.parametrize("is_decoder", [False, True])
def test_a_class_not_declared_causal_follows_its_config(is_decoder):
    """BertForMaskedLM (no pooler) is registered as not causal: as a decoder (``is_decoder``) its
    summary is the last real token, else the first."""
    model = _bert("BertForMaskedLM", is_decoder=is_decoder)
    assert not CLASSES[type(model).__name__][1].causal
    found = outputs(model, _text_batch())
    last, mask = found["tokens"]
    expected = last[torch.arange(last.shape[0]), mask.sum(1) - 1] if is_decoder else last[:, 0]
    assert torch.equal(found["embeds"]["pooled"], expected)


def test_example_inputs_and_text_tokens(data):
    for case, keys, tokens in (("vit", {"pixel_values"}, None), ("bert", {"input_ids", "attention_mask"}, int),
                               ("siglip", {"pixel_values", "input_ids", "attention_mask"}, 32)):
        model, processor, task, splits = _prepared(case, data)
        inputs = task.example_inputs(model, processor, splits["test"], batch_size=3)
        assert set(inputs) == keys and all(len(v) == 3 for v in inputs.values())
        got = task.text_tokens(processor, splits["train"])
        assert got is None if tokens is None else (got == tokens if isinstance(tokens, int) else got > 2)
        model(**inputs)


TINY = dict(search_epochs=1, retrain_epochs=1, batch_size=16, lr=1e-3, eval_batch_size=32, ratio=0.3,
            latency_time=0.02)


def _one_per_kind() -> list[str]:
    """The first registered tiny model of each kind of label-free model: each distinct ``reads`` of
    the classes serving ``distill`` (two towers, images, text), decoders (``causal``, summarised by
    their last token) apart; a family registered later is covered by its registration."""
    kinds: dict[tuple, str] = {}
    for name, tiny in REGISTERED_TINY.items():
        cls = CLASSES[tiny.model_class][1]
        if "distill" in cls.tasks:
            kinds.setdefault((frozenset(cls.reads), cls.causal), name)
    return list(kinds.values())


@pytest.mark.parametrize("family", _one_per_kind())
def test_compress_end_to_end(family, data, tmp_path):
    model, processor = M.make_model(family), M.make_processor(family, 32)
    result = upop.compress(model, "distill", data, processor=processor, out_dir=tmp_path / "run",
                           config=upop.UPopConfig(**TINY), check_images="none", progress=False, log=lambda _: None)
    report = result.report
    two_towers = set(CLASSES[REGISTERED_TINY[family].model_class][1].reads) == {"image", "text"}
    assert report["distill"] == {"mode": "task", "teacher_cached": two_towers}  # only two towers cache the teacher
    assert report["dense"]["metrics"]["cosine"] == pytest.approx(100.0, abs=1e-6)
    assert 0 < report["compressed"]["metrics"]["cosine"] < 100.0
    # under the task's bar the report says the budget is too small (one validation: no estimate)
    under = report["compressed"]["metrics"]["cosine"] < get_task("distill").quality_bar
    assert ("budget" in report) == under
    if under:
        assert report["budget"]["steps_needed"] is None and "too few validations" in report["budget"]["message"]
    assert report["compressed"]["params"] < report["dense"]["params"]
    reloaded = upop.load_compressed(tmp_path / "run" / "compressed")
    assert type(reloaded).__name__ == type(model).__name__
    task = get_task("distill")
    task.set_teacher(make_teacher(M.make_model(family)))
    test = task.load_splits(data, ("test",))["test"]
    again = task.evaluate(reloaded, test, processor, batch_size=32)
    assert again == pytest.approx(report["compressed"]["metrics"], abs=1e-3)


@pytest.mark.slow
def test_cached_label_free_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    """A label-free CLIP run with the cached teacher, stopped mid-search and resumed, ends with the
    uninterrupted run's weights (the table is rebuilt the same); ``distill_cache`` counts on resume."""
    from safetensors.torch import load_file

    cfg = {**TINY, "search_epochs": 2, "checkpoint_every": 2, "interval": 2}

    def run(out, settings=None, **kw):
        return upop.compress(M.make_model("clip"), "distill", data, processor=M.make_processor("clip", 32),
                             out_dir=out, config=upop.UPopConfig(**{**cfg, **(settings or {})}), check_images="none",
                             progress=False, log=lambda _: None, **kw)

    ref = run(tmp_path / "ref")
    assert ref.report["distill"]["teacher_cached"] is True
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stop_after=5)
    with pytest.raises(upop.ConfigError, match="distill_cache"):
        run(tmp_path / "run", {"distill_cache": False}, resume=True)
    run(tmp_path / "run", resume=True)
    a = load_file(str(tmp_path / "ref" / "compressed" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "run" / "compressed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _folder(root, images=0, texts=None, bad_image=False):
    root.mkdir(parents=True, exist_ok=True)
    if images:
        from PIL import Image
        (root / "images" / "sub").mkdir(parents=True)
        for i in range(images):
            Image.new("RGB", (20, 20), (i * 40 % 255, 9, 9)).save(root / "images" / "sub" / f"{i}.png")
    if bad_image:
        (root / "images" / "sub" / "1.png").write_bytes(b"\x89PNG broken")
    if texts is not None:
        (root / "texts.txt").write_bytes(texts)
    return root


def test_bad_data_and_models_fail_in_one_line(tmp_path):
    task = get_task("distill")
    with pytest.raises(DataError, match=r"has 0 distinct images; need at least 3.*no text file"):
        task.load_splits(_folder(tmp_path / "empty"))
    with pytest.raises(DataError, match=rf"has 2 distinct sentences; need at least {MIN_DISTINCT}"):
        task.load_splits(_folder(tmp_path / "few", texts=b"a red circle\n\n  a red circle \na blue square\n"))
    with pytest.raises(DataError, match=r"texts.txt' is not UTF-8 text \(line 2"):
        task.load_splits(_folder(tmp_path / "latin", images=3, texts=b"one\ncaf\xe9\n"))
    images_only = task.load_splits(_folder(tmp_path / "images", images=12))
    clip = M.make_model("clip")
    with pytest.raises(DataError, match=r"a CLIPModel needs texts but there is no text file .*texts.txt"):
        task.check_data(clip, images_only["train"])
    task.check_data(M.make_model("vit"), images_only["train"])  # a vision model needs only the images
    texts_only = task.load_splits(_folder(tmp_path / "texts", texts=b"\n".join(b"line %d" % i for i in range(9))))
    with pytest.raises(DataError, match=r"a ViTForImageClassification needs images but image folder .* has 0"):
        task.check_data(M.make_model("vit"), texts_only["val"])
    broken = task.load_splits(_folder(tmp_path / "broken", images=30, bad_image=True))
    ds = next(d for d in broken.values() if any(p.name == "1.png" for p in d.images))
    with pytest.raises(DataError, match=r"1.png' is not an image Pillow can read"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(TaskError, match=r"task 'distill' needs one of .*; the model is a BlipForQuestionAnswering"):
        task.check_model(M.make_model("blip-vqa"))
    with pytest.raises(TaskError, match="none is set"):
        get_task("distill").evaluate(M.make_model("vit"), images_only["val"], M.make_processor("vit", 32))
    with pytest.raises(upop.ConfigError, match=r"distill='logits' does not apply to task 'distill'"):
        get_task("distill").configure(upop.UPopConfig(distill="logits"))
    with pytest.raises(upop.ConfigError, match="image processor and/or a tokenizer"):
        UnlabelledCollator(object())


def test_data_check_reports_each_problem_once(tmp_path):
    from upop.data.check import _Files

    root = _folder(tmp_path / "d", images=30, bad_image=True, texts=b"x\xff\n")
    problems: list[str] = []
    files = _Files("header", problems)
    for split in SPLITS:
        check_split(root, split, files, problems)
    assert len(problems) == 1 and "not UTF-8" in problems[0]
    root.joinpath("texts.txt").write_text("a\nb\nc\nd\n")
    problems.clear()
    counts = [check_split(root, s, _Files("header", problems), problems) for s in SPLITS]
    assert sum(c["images"] for c in counts) == 30 and sum(c["texts"] for c in counts) == 4
    assert len(problems) == 1 and "1.png" in problems[0]


def test_cli_shapes_compress_and_evaluate_with_teacher(tmp_path, capsys):
    """The user's path: `upop data shapes --task distill`, `upop data check`, `upop compress --task distill`
    (images checked as by default), then `upop evaluate --teacher DENSE` reproduces the report."""
    import json

    from upop.cli.main import main

    data, model = tmp_path / "data", tmp_path / "model"
    assert main(["data", "shapes", "--task", "distill", "--out", str(data), "--train", "60", "--val", "8", "--test", "8",
                 "--image-size", "32"]) == 0
    assert (data / "texts.txt").is_file() and (data / "images").is_dir()
    assert main(["data", "check", "--task", "distill", "--data", str(data)]) == 0
    assert main(["make-model", "bert", "--out", str(model)]) == 0
    out = tmp_path / "run"
    assert main(["compress", "--model", str(model), "--task", "distill", "--data", str(data), "--out", str(out),
                 "--ratio", "0.3", "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                 "--no-progress", "--latency-time", "0.02"]) == 0
    report = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", "distill", "--data", str(data),
                 "--teacher", str(model)]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(report["compressed"]["metrics"], abs=1e-3)
    # without the teacher: one line, exit 2
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", "distill", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--teacher" in err and len(err.splitlines()) == 1
