"""Shapes-world writers for VQA, NLVR2 and captioning, in the real formats read by
:mod:`upop.data.vqa`, :mod:`upop.data.nlvr` and the Karpathy reader of :mod:`upop.data.retrieval`.

* VQA (:func:`write_vqa`): BLIP/UPop JSON, ``{split}.json`` = ``[{"question_id", "image",
  "question", "answer": [10 x answer]}]`` (ten identical annotator answers, as VQAv2 has ten
  annotators). Questions ask about count, colour, shape and position; every answer is a word
  of :data:`upop.data.shapes.VOCABULARY` (``one two three``, colours, kinds, ``left right top
  bottom``). The question words ``what colour shape how many are or`` are NOT in the Shapes
  vocabulary (the tokenizer maps them to ``<unk>``); the templates stay answerable without them
  because each type is also told apart by the vocabulary words it contains. Questions whose
  answer the question alone nearly gives (``how many red shapes``: almost always one) are left out.
* NLVR2 (:func:`write_nlvr`): BLIP JSON, ``[{"images": [left, right], "sentence", "label"}]``,
  labels exactly alternating True/False (balanced), and each statement drawn before its scenes so
  it is as often true as false (no text prior). Statements use ``there is ... in the left /
  right image``, ``there are N shapes in ...`` and ``... in both images`` (``are``, ``both``,
  ``images`` are not in the vocabulary).
* Captions (:func:`write_caption`): the Karpathy layout of :func:`upop.data.shapes.write_retrieval`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from upop.errors import ConfigError
from upop.data.shapes import (COLOURS, KINDS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, VERSION, Scene, check_int, is_complete_dataset,
                     remove_stale_images, scene_rng, atomic_save_png, atomic_write_json, make_scene, render,
                     write_retrieval)

NUMBERS = {1: "one", 2: "two", 3: "three"}
EXTRA_WORDS = ("what", "colour", "shape", "how", "many", "are", "or", "both", "images")
"""Words the writers use that the Shapes vocabulary lacks (they tokenize to ``<unk>``)."""
N_ANNOTATORS = 10


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def vqa_questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) pair that is unambiguous for ``scene``, grouped by type."""
    objs = scene.objects
    kinds, colours = [o.kind for o in objs], [o.colour for o in objs]
    out: dict[str, list[tuple[str, str]]] = {"count": [("how many shapes are there", NUMBERS[len(objs)])]}
    for o in objs:
        if kinds.count(o.kind) == 1:
            out.setdefault("colour", []).append((f"what colour is the {o.kind}", o.colour))
        if colours.count(o.colour) == 1:
            out.setdefault("shape", []).append((f"what shape is the {o.colour} one", o.kind))
        if sum(1 for p in objs if (p.colour, p.kind) == (o.colour, o.kind)) == 1:
            name = f"the {o.colour} {o.kind}"
            if abs(o.x - 0.5) >= 0.12:
                out.setdefault("position", []).append(
                    (f"is {name} at the left or the right", "left" if o.x < 0.5 else "right"))
            if abs(o.y - 0.5) >= 0.12:
                out.setdefault("position", []).append(
                    (f"is {name} at the top or the bottom", "top" if o.y < 0.5 else "bottom"))
    return out


def pick_questions(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` distinct questions, one type after another in a random order."""
    pool = {t: list(qs) for t, qs in vqa_questions(scene).items()}
    order = list(pool)
    rng.shuffle(order)
    out: list[tuple[str, str]] = []
    while len(out) < n and any(pool.values()):
        for t in order:
            if pool[t] and len(out) < n:
                out.append(pool[t].pop(rng.randrange(len(pool[t]))))
    return out


def _statement(rng: random.Random):
    """A random statement about a (left, right) pair and the predicate that decides it."""
    kind, side = rng.choice(("colour", "kind", "count", "both")), rng.choice(("left", "right"))
    pick = (lambda pair: pair[0]) if side == "left" else (lambda pair: pair[1])
    if kind == "colour":
        c = rng.choice(list(COLOURS))
        return (f"there is {_article(c)} {c} one in the {side} image",
                lambda pair: any(o.colour == c for o in pick(pair).objects))
    if kind == "kind":
        k = rng.choice(KINDS)
        return f"there is {_article(k)} {k} in the {side} image", lambda pair: any(o.kind == k for o in pick(pair).objects)
    if kind == "count":
        n = rng.choice((1, 2, 3))
        shapes = "one shape" if n == 1 else f"{NUMBERS[n]} shapes"
        return (f"there {'is' if n == 1 else 'are'} {shapes} in the {side} image",
                lambda pair: len(pick(pair).objects) == n)
    c = rng.choice(list(COLOURS))
    return (f"there is {_article(c)} {c} one in both images",
            lambda pair: all(any(o.colour == c for o in s.objects) for s in pair))


def nlvr_example(rng: random.Random, truth: bool) -> tuple[str, tuple[Scene, Scene]]:
    """A statement and a pair of scenes for which it has truth value ``truth``.

    The statement is drawn first, then scene pairs until one fits, so every statement is about
    as often true as false: the sentence alone tells nothing about the label (no text prior).
    """
    while True:
        text, holds = _statement(rng)
        for _ in range(200):
            pair = (make_scene(rng), make_scene(rng))
            if holds(pair) == truth:
                return text, pair


def _start(w: str, out_dir, train, val, test, image_size, seed) -> tuple[Path, dict[str, int]]:
    counts = {"train": check_int(w, "train", train, 1), "val": check_int(w, "val", val, 1),
              "test": check_int(w, "test", test, 1)}
    check_int(w, "image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    check_int(w, "seed", seed, -(2 ** 63))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{w}: out_dir {out} exists and is not a directory")
    return out, counts


def write_vqa(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64, seed: int = 0,
              questions_per_image: int = 3) -> dict:
    """Write a Shapes VQA dataset (BLIP JSON, images under ``images/``); counts are images.

    Reuses a finished folder written with the same settings. Returns ``{"out_dir", "reused",
    "settings", "splits": {split: {"images", "questions", "annotation"}}}``.
    """
    out, counts = _start("write_vqa", out_dir, train, val, test, image_size, seed)
    check_int("write_vqa", "questions_per_image", questions_per_image, 1)
    settings = {"format": "upop-shapes-vqa", "version": VERSION, "writer_version": 2, "seed": seed, "image_size": image_size, **counts,
                "questions_per_image": questions_per_image}
    summary = {"out_dir": str(out), "reused": True, "settings": settings, "splits": {}}
    if not is_complete_dataset(out, settings, counts):
        summary["reused"] = False
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "shapes.json").unlink(missing_ok=True)
        for split, count in counts.items():
            entries = []
            for i in range(count):
                rng = scene_rng(seed, f"vqa-{split}", i)
                scene = make_scene(rng)
                rel = f"images/{split}_{i:05d}.png"
                atomic_save_png(render(scene, image_size), out / rel)
                for j, (q, a) in enumerate(pick_questions(scene, rng, questions_per_image)):
                    entries.append({"question_id": f"{split}_{i:05d}_{j}", "image": rel, "question": q,
                                    "answer": [a] * N_ANNOTATORS})
            atomic_write_json(out / f"{split}.json", entries)
        remove_stale_images(out / "images", counts)
        atomic_write_json(out / "shapes.json", settings)
    for split, count in counts.items():
        n_q = len(json.loads((out / f"{split}.json").read_text(encoding="utf-8")))
        summary["splits"][split] = {"images": count, "questions": n_q, "annotation": str(out / f"{split}.json")}
    return summary


def write_nlvr(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64, seed: int = 0) -> dict:
    """Write a Shapes NLVR2 dataset (BLIP JSON); counts are pairs (two images each).

    Pair ``p`` of a split uses ``images/{split}_{2p}.png`` (left) and ``{split}_{2p+1}.png``
    (right); labels alternate True/False. Returns ``{"out_dir", "reused", "settings", "splits":
    {split: {"images", "pairs", "true", "annotation"}}}``.
    """
    out, counts = _start("write_nlvr", out_dir, train, val, test, image_size, seed)
    settings = {"format": "upop-shapes-nlvr", "version": VERSION, "writer_version": 2, "seed": seed, "image_size": image_size, **counts}
    images = {s: 2 * c for s, c in counts.items()}
    summary = {"out_dir": str(out), "reused": is_complete_dataset(out, settings, images), "settings": settings,
               "splits": {s: {"images": 2 * c, "pairs": c, "true": (c + 1) // 2, "annotation": str(out / f"{s}.json")}
                          for s, c in counts.items()}}
    if summary["reused"]:
        return summary
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").unlink(missing_ok=True)
    for split, count in counts.items():
        entries = []
        for p in range(count):
            rng = scene_rng(seed, f"nlvr-{split}", p)
            truth = p % 2 == 0
            sentence, scenes = nlvr_example(rng, truth)
            rels = [f"images/{split}_{2 * p + k:05d}.png" for k in (0, 1)]
            for scene, rel in zip(scenes, rels):
                atomic_save_png(render(scene, image_size), out / rel)
            entries.append({"images": rels, "sentence": sentence, "label": "True" if truth else "False"})
        atomic_write_json(out / f"{split}.json", entries)
    remove_stale_images(out / "images", images)
    atomic_write_json(out / "shapes.json", settings)
    return summary


def write_caption(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64,
                  seed: int = 0) -> dict:
    """Write a Shapes caption dataset: the Karpathy layout of ``write_retrieval`` (5 reference
    captions per val/test image, 2 per train image)."""
    return write_retrieval(out_dir, train=train, val=val, test=test, image_size=image_size, seed=seed)
