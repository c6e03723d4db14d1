"""Tests for the retrieval readers, dataset and collator (upop.data.retrieval)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from upop.data import shapes as S
from upop.data.retrieval import (RetrievalCollator, RetrievalDataset, RetrievalItem, load_processor,
                                 load_retrieval_split, load_rgb_image, make_clip_processor)
from upop.data.tokenizer import build_shapes_tokenizer
from upop.errors import ConfigError, DataError


def _png(path: Path, colour=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture
def blip_dir(tmp_path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "img" / name)
    _write(tmp_path / "train.json", [
        {"image": "img/a.png", "caption": "first a", "image_id": "1"},
        {"image": "img/b.png", "caption": "first b", "image_id": "2"},
        {"image": "img/a.png", "caption": "second a", "image_id": "1"},
    ])
    _write(tmp_path / "test.json", [{"image": "img/c.png", "caption": ["c one", "c  two "]},
                                    {"image": "img/a.png", "caption": ["a one"]}])
    return tmp_path


@pytest.fixture
def karpathy_dir(tmp_path) -> Path:
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        _png(tmp_path / "val2014" / f"im{i}.jpg".replace(".jpg", ".png"))
        images.append({"filepath": "val2014", "filename": f"im{i}.png", "split": split,
                       "sentences": [{"raw": f"Caption {i} one.", "tokens": ["x"]}, {"raw": f"caption {i} two"}]})
    _write(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return tmp_path


def _single_line_error(fn, *names):
    with pytest.raises(DataError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    for name in names:
        assert str(name) in msg, msg
    return msg


# ----------------------------------------------------------------------------- readers


def test_blip_split_groups_captions_in_first_seen_order(blip_dir):
    items = load_retrieval_split(blip_dir, "train")
    assert [i.image for i in items] == [blip_dir / "img/a.png", blip_dir / "img/b.png"]
    assert items[0].captions == ["first a", "second a"] and items[1].captions == ["first b"]
    test = load_retrieval_split(str(blip_dir), "test")
    assert test[0] == RetrievalItem(blip_dir / "img/c.png", ["c one", "c two"])


def test_blip_names_annotation_folder_and_image_root(tmp_path):
    _png(tmp_path / "images" / "x.png")
    _write(tmp_path / "ann" / "annotation" / "coco_karpathy_val.json", [{"image": "x.png", "caption": ["hi"]}])
    items = load_retrieval_split(tmp_path / "ann", "val", image_root=tmp_path / "images")
    assert items == [RetrievalItem(tmp_path / "images" / "x.png", ["hi"])]
    _write(tmp_path / "f" / "flickr30k_test.json", [{"image": "../images/x.png", "caption": "yo"}])
    assert load_retrieval_split(tmp_path / "f", "test")[0].captions == ["yo"]


def test_karpathy_format(karpathy_dir):
    train = load_retrieval_split(karpathy_dir, "train")
    assert [i.image.name for i in train] == ["im0.png", "im1.png"]  # restval counts as train
    assert train[0].captions == ["Caption 0 one.", "caption 0 two"]
    assert train[0].image == karpathy_dir / "val2014" / "im0.png"
    assert [i.image.name for i in load_retrieval_split(karpathy_dir, "val")] == ["im2.png"]
    assert [i.image.name for i in load_retrieval_split(karpathy_dir, "test")] == ["im3.png", "im4.png"]


def test_split_file_wins_over_karpathy(karpathy_dir):
    _write(karpathy_dir / "test.json", [{"image": "val2014/im0.png", "caption": "from split file"}])
    assert load_retrieval_split(karpathy_dir, "test")[0].captions == ["from split file"]


def test_reads_generated_shapes(tmp_path):
    S.write_retrieval(tmp_path, train=3, val=2, test=2, image_size=16, train_captions_per_image=2)
    train = load_retrieval_split(tmp_path, "train")
    assert len(train) == 3 and all(len(i.captions) == 2 for i in train)
    assert [len(i.captions) for i in load_retrieval_split(tmp_path, "val")] == [5, 5]


ERROR_CASES = {
    "missing_dir": (lambda d: d / "nope", None, ["nope", "does not exist"]),
    "not_a_dir": (lambda d: _write(d / "file.txt", "x"), None, ["file.txt", "not a directory"]),
    "no_annotation": (lambda d: d, None, ["test.json", "coco_karpathy_test.json", "flickr30k_test.json",
                                          "dataset_*.json"]),
    "bad_json": (lambda d: d, ("test.json", '[{"image": "a.png",\n "caption": }]'), ["test.json", "line 2"]),
    "not_a_list": (lambda d: d, ("test.json", {"image": "a.png"}), ["test.json", "list"]),
    "no_image": (lambda d: d, ("test.json", [{"image": "a.png", "caption": "ok"}, {"caption": "x"}]),
                 ["test.json", "entry 1", "'image'"]),
    "no_caption": (lambda d: d, ("test.json", [{"image": "a.png"}]), ["test.json", "entry 0", "'caption'"]),
    "empty_caption_list": (lambda d: d, ("test.json", [{"image": "a.png", "caption": []}]),
                           ["test.json", "entry 0", "empty caption list"]),
    "blank_caption": (lambda d: d, ("test.json", [{"image": "a.png", "caption": ["ok", "  "]}]),
                      ["test.json", "entry 0", "empty caption"]),
    "caption_not_str": (lambda d: d, ("test.json", [{"image": "a.png", "caption": [3]}]), ["test.json", "string"]),
    "zero_items": (lambda d: d, ("test.json", []), ["test.json", "no items"]),
    "missing_image": (lambda d: d, ("test.json", [{"image": "a.png", "caption": "x"}, {"image": "gone.png",
                                                                                      "caption": "y"}]),
                      ["test.json", "gone.png", "entry 1", "1 of 2"]),
    "karpathy_zero": (lambda d: d, ("dataset_coco.json", {"images": [{"filename": "a.png", "split": "train",
                                                                      "sentences": [{"raw": "x"}]}]}),
                      ["dataset_coco.json", "no items"]),
    "karpathy_no_sentences": (lambda d: d, ("dataset_flickr30k.json", {"images": [
        {"filename": "a.png", "split": "test", "sentences": []}]}), ["dataset_flickr30k.json", "images[0]"]),
    "karpathy_no_split": (lambda d: d, ("dataset_x.json", {"images": [{"filename": "a.png", "sentences": []}]}),
                          ["dataset_x.json", "'split'"]),
    "karpathy_no_images": (lambda d: d, ("dataset_coco.json", [1, 2]), ["dataset_coco.json", "'images'"]),
    "karpathy_two_files": (lambda d: _write(d / "dataset_b.json", "{}").parent,
                           ("dataset_a.json", "{}"), ["dataset_a.json", "dataset_b.json"]),
    "not_utf8": (lambda d: d, ("test.json", None), ["test.json", "UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_reader_errors_are_one_line_data_errors(tmp_path, case):
    make_dir, ann, expected = ERROR_CASES[case]
    _png(tmp_path / "a.png")
    data_dir = make_dir(tmp_path)
    if ann is not None:
        name, content = ann
        if content is None:
            (tmp_path / name).write_bytes(b"\xff\xfe\x00garbage")
        else:
            _write(tmp_path / name, content)
    _single_line_error(lambda: load_retrieval_split(data_dir, "test"), *expected)


def test_bad_split_name_and_image_root(blip_dir):
    with pytest.raises(ConfigError):
        load_retrieval_split(blip_dir, "../test")
    _single_line_error(lambda: load_retrieval_split(blip_dir, "test", image_root=blip_dir / "nowhere"), "nowhere")


# ----------------------------------------------------------------------------- dataset


def test_dataset_items(blip_dir):
    ds = RetrievalDataset.from_split(blip_dir, "train")
    assert len(ds) == 2
    sample = ds[1]
    assert sample["index"] == 1 and sample["captions"] == ["first b"]
    assert sample["image"].mode == "RGB" and sample["image"].size == (40, 30)
    texts, txt2img, img2txt = ds.flat_captions()
    assert texts == ["first a", "second a", "first b"] and txt2img == [0, 0, 1] and img2txt == [[0, 1], [2]]
    with pytest.raises(DataError):
        RetrievalDataset([])


def test_corrupt_and_truncated_images_raise_data_error(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all" * 10)
    noisy = Image.frombytes("RGB", (64, 64), bytes(random.Random(0).randrange(256) for _ in range(64 * 64 * 3)))
    noisy.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 8), 100).save(gray)
    ds = RetrievalDataset([RetrievalItem(garbage, ["x"]), RetrievalItem(truncated, ["y"]),
                           RetrievalItem(gray, ["z"])])
    _single_line_error(lambda: ds[0], "garbage.png")
    _single_line_error(lambda: ds[1], "truncated.png")
    assert ds[2]["image"].mode == "RGB"
    _single_line_error(lambda: load_rgb_image(tmp_path / "absent.png"), "absent.png")


# ----------------------------------------------------------------------------- collator


@pytest.fixture(scope="module")
def processor():
    return make_clip_processor(32, build_shapes_tokenizer(model_max_length=16))


def _samples(n=4):
    rng = random.Random(0)
    out = []
    for i in range(n):
        scene = S.make_scene(rng)
        out.append({"image": S.render(scene, 48), "captions": S.captions(scene, rng, 5), "index": i + 10})
    return out


def test_collator_shapes_padding_and_mask(processor):
    batch = _samples()
    col = RetrievalCollator(processor)
    assert col.max_length == 16
    out = col(batch)
    assert out["pixel_values"].shape == (4, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    assert out["input_ids"].shape == (4, 16) and out["attention_mask"].shape == (4, 16)
    assert out["index"].tolist() == [10, 11, 12, 13]
    tok = processor.tokenizer
    for row, mask, sample in zip(out["input_ids"], out["attention_mask"], batch):
        n = int(mask.sum())
        assert mask.tolist() == [1] * n + [0] * (16 - n)
        assert row[0] == tok.bos_token_id and row[n - 1] == tok.eos_token_id
        assert (row[n:] == tok.pad_token_id).all()
        text = tok.decode(row[:n], skip_special_tokens=True)
        assert text == col.choose_caption(sample["captions"], sample["index"])
        assert text in sample["captions"]
    longest = RetrievalCollator(processor, padding="longest")(batch)
    assert longest["input_ids"].shape[1] == int(out["attention_mask"].sum(1).max())


def test_collator_caption_choice_is_deterministic(processor):
    batch = _samples()
    a, b = RetrievalCollator(processor, seed=1), RetrievalCollator(processor, seed=1)
    assert torch.equal(a(batch)["input_ids"], b(batch)["input_ids"])
    caps = [f"caption {i}" for i in range(5)]
    picks = lambda col: [col.choose_caption(caps, i) for i in range(50)]  # noqa: E731
    first = picks(a)
    a.set_epoch(1)
    assert picks(a) != first and picks(a) == picks(a)
    b.set_epoch(1)
    assert picks(b) == picks(a)


def test_collator_eval_helpers_and_truncation(processor):
    col = RetrievalCollator((processor.image_processor, processor.tokenizer), max_length=6)
    batch = _samples(3)
    imgs = col.collate_images(batch)
    assert imgs["pixel_values"].shape == (3, 3, 32, 32) and imgs["index"].tolist() == [10, 11, 12]
    assert torch.equal(col.encode_images([s["image"] for s in batch]), imgs["pixel_values"])
    enc = col.encode_texts(["a small red circle to the left of a large blue star", "a red circle"])
    assert enc["input_ids"].shape == (2, 6)
    assert enc["input_ids"][0, -1] == 3 and enc["attention_mask"][0].all()
    assert enc["input_ids"][1].tolist() == [2] + processor.tokenizer.convert_tokens_to_ids(["a", "red", "circle"]) \
        + [3, 0]
    for bad in (dict(padding="do_not_pad"), dict(max_length=1)):
        with pytest.raises(ConfigError):
            RetrievalCollator(processor, **bad)
    with pytest.raises(ConfigError):
        RetrievalCollator(object())


def test_clip_processor_save_and_reload(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    images = [s["image"] for s in _samples(2)]
    texts = ["a large red circle above a small blue star", "two red circles"]
    for loaded in (AutoProcessor.from_pretrained(str(tmp_path)), load_processor(tmp_path)):
        assert type(loaded.image_processor).__name__ == "CLIPImageProcessorPil"
        assert torch.equal(loaded.image_processor(images=images, return_tensors="pt")["pixel_values"],
                           processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
        assert loaded.tokenizer(texts)["input_ids"] == processor.tokenizer(texts)["input_ids"]
    wide = Image.new("RGB", (90, 40), (10, 200, 10))
    assert processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError):
        make_clip_processor(0, processor.tokenizer)
    _single_line_error(lambda: load_processor(tmp_path / "none"), "none")
