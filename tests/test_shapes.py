"""Tests for the Shapes world generator (upop.data.shapes) and its tokenizer (upop.data.tokenizer)."""
from __future__ import annotations

import collections
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from upop.data import shapes as S
from upop.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, build_shapes_tokenizer
from upop.errors import ConfigError

SMALL = dict(train=6, val=4, test=5, image_size=32)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> list[dict]:
    """A 200-image test split (the size the hardness claim is about)."""
    out = tmp_path_factory.mktemp("hard")
    S.write_retrieval(out, train=2, val=2, test=200, image_size=16, seed=0)
    return json.loads((out / "test.json").read_text())


# ----------------------------------------------------------------------------- generator


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    S.write_retrieval(a, seed=3, **SMALL)
    S.write_retrieval(b, seed=3, **SMALL)
    S.write_retrieval(c, seed=4, **SMALL)
    fa, fb, fc = _all_files(a), _all_files(b), _all_files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["test.json"] != fc["test.json"]
    assert sum(fa[k] != fc[k] for k in fa if k.endswith(".png")) >= len(SMALL) * 2
    assert not [k for k in fa if k.endswith(".tmp")]


def test_counts_and_layout(tmp_path):
    summary = S.write_retrieval(tmp_path, seed=1, captions_per_image=5, train_captions_per_image=3, **SMALL)
    train = json.loads((tmp_path / "train.json").read_text())
    assert len(train) == 6 * 3 and summary["splits"]["train"] == {
        "images": 6, "captions": 18, "annotation": str(tmp_path / "train.json")}
    assert set(train[0]) == {"image", "caption", "image_id"}
    assert train[0]["image"] == "images/train_00000.png" and train[0]["image_id"] == "shapes_train_00000"
    assert len({e["image"] for e in train}) == 6
    for split, n in (("val", 4), ("test", 5)):
        entries = json.loads((tmp_path / f"{split}.json").read_text())
        assert len(entries) == n
        assert [e["image"] for e in entries] == [f"images/{split}_{i:05d}.png" for i in range(n)]
        assert all(isinstance(e["caption"], list) and len(e["caption"]) == 5 for e in entries)
        assert all(len(set(e["caption"])) == 5 for e in entries)
    assert len(list((tmp_path / "images").glob("*.png"))) == 15
    meta = json.loads((tmp_path / "shapes.json").read_text())
    assert meta["seed"] == 1 and meta["image_size"] == 32 and meta["version"] == S.VERSION
    with __import__("PIL.Image").Image.open(tmp_path / "images" / "val_00003.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"


def test_reuse_does_not_rewrite_and_changed_settings_regenerate(tmp_path):
    first = S.write_retrieval(tmp_path, seed=0, **SMALL)
    assert first["reused"] is False
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in tmp_path.rglob("*") if p.is_file()}
    second = S.write_retrieval(tmp_path, seed=0, **SMALL)
    assert second["reused"] is True
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in tmp_path.rglob("*") if p.is_file()} == before
    # a missing image (e.g. killed run) forces regeneration
    (tmp_path / "images" / "test_00001.png").unlink()
    assert S.write_retrieval(tmp_path, seed=0, **SMALL)["reused"] is False
    assert (tmp_path / "images" / "test_00001.png").is_file()
    # fewer images: stale files from the bigger run are removed
    S.write_retrieval(tmp_path, seed=0, train=3, val=2, test=2, image_size=32)
    assert len(list((tmp_path / "images").glob("*.png"))) == 7


@pytest.mark.parametrize("kwargs", [dict(train=0), dict(val=-1), dict(test=1.5), dict(image_size=8),
                                    dict(image_size=1000), dict(image_size=True), dict(captions_per_image=0),
                                    dict(train_captions_per_image=0), dict(seed="x")])
def test_write_retrieval_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError) as err:
        S.write_retrieval(tmp_path, **{**SMALL, **kwargs})
    name = next(iter(kwargs))
    assert name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("size", [16, 32, 64, 224])
def test_render_sizes_and_mask(size):
    rng = random.Random(11)
    for _ in range(5):
        scene = S.make_scene(rng)
        img, mask = S.render_with_mask(scene, size)
        assert img.size == (size, size) and img.mode == "RGB" and mask.shape == (size, size)
        assert mask.max() == len(scene.objects)
        px = np.asarray(img)
        for i, o in enumerate(scene.objects):
            assert (mask == i + 1).sum() > 0
            cy, cx = min(size - 1, int(o.y * size)), min(size - 1, int(o.x * size))
            if size >= 64:  # object centre pixel has the object's colour
                assert np.abs(px[cy, cx].astype(int) - np.array(S.COLOURS[o.colour])).max() < 40
    assert S.render(scene, size).tobytes() == img.tobytes()


def test_render_rejects_bad_size_and_scene():
    scene = S.Scene([S.ShapeObject("circle", "red", "small", 0.5, 0.5)])
    with pytest.raises(ConfigError):
        S.render(scene, 4)
    with pytest.raises(ConfigError, match="hexagonal"):
        S.render(S.Scene([S.ShapeObject("hexagonal", "red", "small", 0.5, 0.5)]))


def test_scenes_do_not_overlap_and_stay_inside():
    rng = random.Random(5)
    counts = collections.Counter()
    for _ in range(300):
        objs = S.make_scene(rng).objects
        counts[len(objs)] += 1
        for a in objs:
            r = S.RADIUS[a.size]
            assert r <= a.x <= 1 - r and r <= a.y <= 1 - r
            for b in objs:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) >= r + S.RADIUS[b.size]
    assert set(counts) == {1, 2, 3}


# ----------------------------------------------------------------------------- captions


def test_captions_use_only_the_vocabulary(tmp_path):
    vocab = set(S.VOCABULARY)
    assert S.VOCABULARY == sorted(vocab) and all(w.isalpha() and w.islower() for w in vocab)
    rng = random.Random(0)
    for _ in range(500):
        for texts in S.caption_pool(S.make_scene(rng)).values():
            for text in texts:
                assert set(text.split()) <= vocab, text
    S.write_retrieval(tmp_path, seed=2, **SMALL)
    for split in ("train", "val", "test"):
        for entry in json.loads((tmp_path / f"{split}.json").read_text()):
            caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            assert all(set(c.split()) <= vocab for c in caps)


def test_captions_are_deterministic_and_distinct():
    scene = S.make_scene(random.Random(9))
    assert S.captions(scene, random.Random(1), 5) == S.captions(scene, random.Random(1), 5)
    one = S.Scene([S.ShapeObject("star", "orange", "large", 0.5, 0.5)])
    caps = S.captions(one, random.Random(0), 40)  # more than the pool holds: repeats allowed
    assert len(caps) == 40 and len(set(caps)) == sum(len(v) for v in S.caption_pool(one).values())
    assert "an orange star" in S.caption_pool(one)["plain"]
    with pytest.raises(ConfigError):
        S.captions(one, random.Random(0), -1)


_RELATIONS = {"to the left of": lambda a, b: a.x < b.x, "to the right of": lambda a, b: a.x > b.x,
              "above": lambda a, b: a.y < b.y, "below": lambda a, b: a.y > b.y}
_WITH = {"to its left": lambda a, b: b.x < a.x, "to its right": lambda a, b: b.x > a.x,
         "above it": lambda a, b: b.y < a.y, "below it": lambda a, b: b.y > a.y}


def _which(text: str, objs: list[S.ShapeObject]) -> S.ShapeObject:
    hits = [o for o in objs if f"{o.colour} {o.kind}" in text]
    assert len(hits) == 1, (text, objs)
    return hits[0]


def test_relations_in_two_object_captions_match_geometry():
    rng = random.Random(123)
    checked = 0
    while checked < 400:
        scene = S.make_scene(rng)
        objs = scene.objects
        if len(objs) != 2 or (objs[0].colour, objs[0].kind) == (objs[1].colour, objs[1].kind):
            continue
        for text in S.captions(scene, rng, 5) + [c for v in S.caption_pool(scene).values() for c in v]:
            for phrase, holds in _WITH.items():
                if " with " in text and text.endswith(phrase):
                    left, right = text[: -len(phrase)].split(" with ")
                    assert holds(_which(left, objs), _which(right, objs)), (text, objs)
                    checked += 1
                    break
            else:
                for phrase, holds in _RELATIONS.items():
                    if f" {phrase} " in text:
                        left, right = text.split(f" {phrase} ")
                        assert holds(_which(left, objs), _which(right, objs)), (text, objs)
                        checked += 1
    assert checked >= 400


_REGION_TESTS = {"left": lambda o: o.x < 1 / 3, "right": lambda o: o.x > 2 / 3, "center": lambda o: 1 / 3 < o.x < 2 / 3,
                 "top": lambda o: o.y < 1 / 3, "bottom": lambda o: o.y > 2 / 3, "middle": lambda o: 1 / 3 < o.y < 2 / 3}


def test_region_captions_match_geometry():
    rng = random.Random(7)
    checked = 0
    for _ in range(300):
        objs = S.make_scene(rng).objects
        if len({(o.colour, o.kind) for o in objs}) < len(objs):
            continue
        for text in S.caption_pool(S.Scene(objs)).get("region", []):
            words = text.split()
            cut = max(i for i, w in enumerate(words) if w in ("in", "on", "at"))
            obj = _which(" ".join(words[:cut]), objs)
            where = words[cut + 2:]
            if where == ["middle"]:
                where = ["middle", "center"]
            elif len(where) == 1:
                where += ["center"] if where[0] in ("top", "bottom") else ["middle"]
            assert all(_REGION_TESTS[w](obj) for w in where), (text, obj)
            checked += 1
    assert checked > 100


def test_spatial_relations_margin():
    a = S.ShapeObject("circle", "red", "small", 0.2, 0.5)
    b = S.ShapeObject("square", "blue", "small", 0.8, 0.52)
    assert S.spatial_relations(a, b) == ["left"] and S.spatial_relations(b, a) == ["right"]
    c = S.ShapeObject("star", "green", "small", 0.25, 0.1)
    assert S.spatial_relations(c, a) == ["above"]
    assert S.region(a) == "on the left" and S.region(c) == "in the top left"
    assert S.region(S.ShapeObject("star", "green", "small", 0.34, 0.1)) is None


def _near_duplicate_fraction(texts: list[str]) -> float:
    """Fraction of captions with another (different) caption at word edit distance 1."""
    toks = [tuple(t.split()) for t in texts]
    full, subs, dels = set(toks), collections.defaultdict(set), collections.defaultdict(set)
    for t in full:
        for i in range(len(t)):
            subs[t[:i] + ("*",) + t[i + 1:]].add(t)
            dels[t[:i] + t[i + 1:]].add(t)
    hits = 0
    for t in toks:
        near = set(dels.get(t, ()))  # t plus one word
        for i in range(len(t)):
            near |= subs[t[:i] + ("*",) + t[i + 1:]]
            if t[:i] + t[i + 1:] in full:  # t minus one word
                near.add(t[:i] + t[i + 1:])
        near.discard(t)
        hits += bool(near)
    return hits / len(toks)


def test_near_duplicate_measure():
    assert _near_duplicate_fraction(["a red circle", "a blue circle", "x y z w"]) == pytest.approx(2 / 3)
    assert _near_duplicate_fraction(["a red circle", "a circle", "a big red circle"]) == 1.0
    assert _near_duplicate_fraction(["a b c", "a c b"]) == 0.0


def test_test_split_is_hard(test_split):
    texts = [c for e in test_split for c in e["caption"]]
    assert len(texts) == 1000
    assert _near_duplicate_fraction(texts) > 0.2
    # many images share a colour+kind pair with another image
    keys = collections.Counter()
    for e in test_split:
        keys.update({" ".join(c.split()[-2:]) for c in e["caption"]})
    assert sum(n for n in keys.values() if n > 1) > 0.5 * sum(keys.values())
    # relations and multi-object captions dominate, not single-object labels
    relational = sum(any(p in t for p in (" left", " right", " above", " below", " between ")) for t in texts)
    assert relational > 0.3 * len(texts)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_wrapping():
    tok = build_shapes_tokenizer()
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(9))
    assert {k: getattr(tok, f"{k}_token_id") for k in SPECIAL_IDS} == SPECIAL_IDS
    assert tok.padding_side == "right" and tok.model_max_length == 32
    assert len(tok) == 9 + len(S.VOCABULARY)
    ids = tok("A Large RED circle")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) == 6 and 1 not in ids
    assert tok("a blorp circle")["input_ids"][2] == SPECIAL_IDS["unk"]
    assert tok.decode(ids, skip_special_tokens=True) == "a large red circle"
    for word in S.VOCABULARY:
        assert tok.convert_tokens_to_ids(word) >= 9
    batch = tok(["a red circle", "a red circle above a blue star"], padding="max_length", max_length=12,
                truncation=True)
    assert batch["input_ids"][0][5:] == [0] * 7 and batch["attention_mask"][0] == [1] * 5 + [0] * 7
    with pytest.raises(ConfigError):
        build_shapes_tokenizer(model_max_length=1)


def test_tokenizer_round_trip(tmp_path):
    tok = build_shapes_tokenizer(model_max_length=24)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(0)
    texts = [c for _ in range(50) for c in S.captions(S.make_scene(rng), rng, 3)] + ["Unknown WORDS here"]
    assert again(texts)["input_ids"] == tok(texts)["input_ids"]
    assert again.model_max_length == 24 and again.padding_side == "right"
    assert {k: getattr(again, f"{k}_token_id") for k in SPECIAL_IDS} == SPECIAL_IDS
    assert again.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(9))


# ----------------------------------------------------------------------------- every task, the smallest sizes


def _sizes_cases():
    from upop.data import shapes_min_split
    from upop.tasks import task_names

    for task in task_names():
        least = shapes_min_split(task)
        for size in sorted({1, 2, 3, least}):
            yield task, size


@pytest.mark.parametrize("task,size", list(_sizes_cases()))
def test_data_shapes_at_small_sizes_is_accepted_or_refused_before_writing(task, size, tmp_path, capsys):
    """Every writer of the registry, at split sizes 1, 2, 3 and its minimum: the data it writes
    passes ``upop data check`` and loads with the task's reader, or the size is refused in one
    line before anything is written."""
    from upop.cli.main import main
    from upop.data import shapes_min_split
    from upop.tasks import get_task

    out = tmp_path / "d"
    code = main(["data", "shapes", "--task", task, "--out", str(out), "--train", str(size), "--val", str(size),
                 "--test", str(size), "--image-size", "16"])
    err = capsys.readouterr().err
    if size < shapes_min_split(task):
        assert code == 2 and err.count("\n") == 1 and f"need at least {shapes_min_split(task)}" in err, err
        assert not out.exists()
        return
    assert code == 0, err
    assert main(["data", "check", "--task", task, "--data", str(out), "--images", "full"]) == 0, capsys.readouterr()
    splits = get_task(task).load_splits(out)
    assert all(len(splits[s]) >= 1 for s in ("train", "val", "test"))


def test_classification_writer_refuses_too_few_images_per_class(tmp_path):
    from upop.data.shapes_vision import write_classification

    with pytest.raises(ConfigError, match=r"val=8 is not allowed \(need an integer >= 10\)"):
        write_classification(tmp_path / "d", train=10, val=8, test=10, image_size=16)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- all or nothing


def test_data_shapes_failing_mid_write_leaves_nothing_of_it(tmp_path, monkeypatch):
    """A writer that fails after writing some images leaves the folder as it was (the user's
    file kept, no staged temp, no partial data)."""
    import upop.data.shapes as shapes_module
    from upop.cli.main import main

    out = tmp_path / "d"
    out.mkdir()
    calls = []
    real = shapes_module.atomic_save_png

    def failing(img, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(img, path)

    monkeypatch.setattr(shapes_module, "atomic_save_png", failing)
    assert main(["data", "shapes", "--task", "retrieval", "--out", str(out), "--train", "4", "--val", "2",
                 "--test", "2", "--image-size", "16"]) == 130
    assert len(calls) == 3 and sorted(p.name for p in out.iterdir()) == []


def test_data_shapes_killed_mid_write_leaves_nothing_then_overwrite_cleans_up(tmp_path):
    """SIGKILL a ``data shapes`` process while it writes: none of the data's entries is in --out
    (only the staged temp and the stale lock file, both upop's); the next ``--overwrite`` run
    removes them and writes data that ``data check`` accepts."""
    import signal
    import subprocess
    import sys
    import time

    from upop.cli.main import main
    from upop.cli.main import SHAPES_FILES

    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "upop", "data", "shapes", "--task", "retrieval", "--out", str(out),
                             "--train", "20000", "--val", "1", "--test", "1", "--image-size", "16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            staged = list(out.glob(".shapes.json.tmp-*/images/*.png")) if out.is_dir() else []
            if len(staged) >= 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the writer ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = sorted(os.listdir(out))
    assert not set(left) & set(SHAPES_FILES), left
    assert any(name.startswith(".shapes.json.tmp-") for name in left), left
    assert main(["data", "shapes", "--task", "retrieval", "--out", str(out), "--train", "2", "--val", "1", "--test",
                 "1", "--image-size", "16", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["images", "shapes.json", "test.json", "train.json", "val.json"]
    assert main(["data", "check", "--task", "retrieval", "--data", str(out)]) == 0
