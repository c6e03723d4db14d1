"""Shapes world: a seeded generator of small synthetic scenes with compositional captions.

Scenes, objects and rendering are in :mod:`upop.data.shapes_scene` (re-exported here); this module
writes the captions and the retrieval data set.

A scene holds 1-3 flat-coloured shapes on a light, slightly varied background. Every object has
a kind, a colour, a size and a position; captions describe objects, their attribute binding,
pairwise spatial relations and image regions using a closed lowercase vocabulary
(:data:`VOCABULARY`), so a word-level tokenizer covers them. Many scenes share kinds and
colours, so retrieval needs the binding and the relation, not just a bag of words.

Everything is deterministic for a seed: each image ``i`` of a split draws from its own
``random.Random("upop-shapes:{seed}:{split}:{i}")``; the global RNG is never used.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import tempfile
from pathlib import Path

from PIL import Image

from upop.errors import ConfigError

from upop.data.shapes_scene import (  # noqa: F401 (the scene part of the module, re-exported)
    VERSION, KINDS, PLURALS, COLOURS, SIZES, RADIUS, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, REL_MARGIN,
    _REGION_DEAD_ZONE, _NUMBERS, _TEMPLATE_WORDS, _QUESTION_WORDS, VOCABULARY, ShapeObject, Scene,
    make_scene, _place, spatial_relations, region, _shape_points, check_int, _check_scene,
    render_with_mask, render
)

_FAMILY_WEIGHT = {"plain": 1.0, "single": 1.0, "there": 1.0, "that_is": 1.0, "region": 1.0,
                  "relation": 3.0, "relation_the": 1.0, "relation_with": 1.0, "list": 1.5,
                  "count": 1.0, "plural": 1.5, "between": 1.5}
_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_REL_IT = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}


def _words(o: ShapeObject, detail: str) -> str:
    return f"{o.size} {o.colour} {o.kind}" if detail == "full" else f"{o.colour} {o.kind}"


def _np(o: ShapeObject, detail: str = "full") -> str:
    """Noun phrase with an indefinite article, e.g. 'an orange star'."""
    w = _words(o, detail)
    return ("an " if w[0] in "aeiou" else "a ") + w


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else " ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_pool(scene: Scene) -> dict[str, list[str]]:
    """All captions true for ``scene``, grouped by template family (deterministic order)."""
    objs, k = scene.objects, len(scene.objects)
    fam: dict[str, dict[str, None]] = {}

    def add(name: str, text: str) -> None:
        fam.setdefault(name, {})[text] = None

    if k == 1:
        o = objs[0]
        add("plain", _np(o)), add("plain", _np(o, "colour"))
        add("single", f"a single {_words(o, 'full')}"), add("single", f"just one {_words(o, 'colour')}")
        add("there", f"there is {_np(o)}"), add("there", f"a picture of {_np(o)}")
        add("there", f"an image of {_np(o, 'colour')}")
        add("that_is", f"a {o.kind} that is {o.colour}"), add("that_is", f"a {o.size} {o.kind} that is {o.colour}")
        add("that_is", f"{_np(o, 'colour')} that is {o.size}")
    for o in objs:
        where = region(o)
        if where:
            add("region", f"{_np(o)} {where}"), add("region", f"{_np(o, 'colour')} {where}")
            if k == 1:
                add("region", f"there is {_np(o, 'colour')} {where}")
    colour_kind = [(o.colour, o.kind) for o in objs]
    for a in objs:
        for b in objs:
            if a is b:
                continue
            for rel in spatial_relations(a, b):
                for da in ("full", "colour"):
                    for db in ("full", "colour"):
                        add("relation", f"{_np(a, da)} {_REL_PHRASE[rel]} {_np(b, db)}")
                if colour_kind.count((a.colour, a.kind)) == 1 and colour_kind.count((b.colour, b.kind)) == 1:
                    the_a, the_b = _words(a, "colour"), _words(b, "colour")
                    add("relation_the", f"the {the_a} is {_REL_PHRASE[rel]} the {the_b}")
            for rel in spatial_relations(b, a):
                add("relation_with", f"{_np(a)} with {_np(b)} {_REL_IT[rel]}")
    if k >= 2:
        for perm in itertools.permutations(objs):
            for d in ("full", "colour"):
                listed = _join([_np(o, d) for o in perm])
                add("list", listed)
                add("count", f"{_NUMBERS[k]} shapes {listed}"), add("count", f"{_NUMBERS[k]} objects {listed}")
            if k == 2:
                add("list", f"{_np(perm[0])} next to {_np(perm[1])}")
            if k == 3:
                add("count", f"three shapes including {_np(perm[0])} and {_np(perm[1])}")
        _plural_captions(objs, lambda text: add("plural", text))
    if k == 3:
        for a in objs:
            b, c = [o for o in objs if o is not a]
            for axis in ("x", "y"):
                lo, mid, hi = sorted((getattr(b, axis), getattr(a, axis), getattr(c, axis)))
                if mid == getattr(a, axis) and mid - lo >= REL_MARGIN and hi - mid >= REL_MARGIN:
                    add("between", f"{_np(a)} between {_np(b)} and {_np(c)}")
                    add("between", f"{_np(a)} between {_np(c)} and {_np(b)}")
    return {name: list(texts) for name, texts in fam.items()}


def _plural_captions(objs: list[ShapeObject], add) -> None:
    """Captions such as 'two red circles', 'two circles one red and one blue', 'two blue shapes'."""
    groups = [(lambda o: (o.kind,), lambda o: PLURALS[o.kind]),
              (lambda o: (o.colour, o.kind), lambda o: f"{o.colour} {PLURALS[o.kind]}"),
              (lambda o: (o.size, o.kind), lambda o: f"{o.size} {PLURALS[o.kind]}"),
              (lambda o: (o.colour,), lambda o: f"{o.colour} shapes")]
    for key, noun in groups:
        for first in objs:
            members = [o for o in objs if key(o) == key(first)]
            if len(members) < 2 or members[0] is not first:
                continue
            phrase = f"{_NUMBERS[len(members)]} {noun(first)}"
            others = [o for o in objs if key(o) != key(first)]
            if len(members) == 2 and not others and key(first) == (first.kind,):
                a, b = members
                if a.colour != b.colour:
                    add(f"{phrase} one {a.colour} and one {b.colour}")
                if a.size != b.size:
                    add(f"{phrase} one {a.size} and one {b.size}")
                if a.colour != b.colour or a.size != b.size:
                    continue  # the bare 'two circles' says too little here
            add(phrase if not others else f"{phrase} and {_join([_np(o) for o in others])}")


def captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """Pick ``n`` captions for ``scene``, distinct where the pool allows, spread over families.

    Families are visited in a weighted random order (relations weigh most) and one caption is
    drawn from each in turn; only if every caption is used are repeats drawn.
    """
    check_int("captions", "n", n, 0)
    pool = caption_pool(scene)
    names = list(pool)
    order = sorted(names, key=lambda f: -(rng.random() ** (1.0 / _FAMILY_WEIGHT[f])))
    used: list[str] = []
    left = {f: list(pool[f]) for f in names}
    while len(used) < n and any(left.values()):
        for f in order:
            cand = [c for c in left[f] if c not in used]
            left[f] = cand
            if cand and len(used) < n:
                pick = rng.choice(cand)
                used.append(pick)
                cand.remove(pick)
    distinct = list(used)
    while len(used) < n:
        used.append(rng.choice(distinct))
    return used


# ----------------------------------------------------------------------------- writers


def _atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to a temp file next to ``path`` then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (a killed run never leaves half a file)."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=1) + "\n").encode("utf-8"), fsync=True)


def atomic_save_png(img: Image.Image, path: Path) -> None:
    """Save ``img`` as PNG atomically."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    _atomic_write_bytes(Path(path), buf.getvalue())


def scene_rng(seed: int, split: str, i: int) -> random.Random:
    return random.Random(f"upop-shapes:{seed}:{split}:{i}")


def write_retrieval(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64,
                    seed: int = 0, captions_per_image: int = 5, train_captions_per_image: int = 2) -> dict:
    """Write a Shapes retrieval dataset in the BLIP/UPop Karpathy layout under ``out_dir``.

    Files: ``images/{split}_{i:05d}.png``; ``train.json`` (one ``{"image", "caption",
    "image_id"}`` entry per caption); ``val.json`` / ``test.json`` (one ``{"image", "caption":
    [...]}`` entry per image); ``shapes.json`` (the settings, written last). Every file is
    written atomically. If ``shapes.json`` holds the same settings and every file exists, nothing
    is rewritten. Returns ``{"out_dir", "reused", "settings", "splits": {split: {"images",
    "captions", "annotation"}}}``.
    """
    w = "write_retrieval"
    counts = {"train": check_int(w, "train", train, 1), "val": check_int(w, "val", val, 1),
              "test": check_int(w, "test", test, 1)}
    check_int(w, "captions_per_image", captions_per_image, 1)
    check_int(w, "train_captions_per_image", train_captions_per_image, 1)
    check_int(w, "image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    check_int(w, "seed", seed, -(2 ** 63))
    settings = {"format": "upop-shapes-retrieval", "version": VERSION, "seed": seed, "image_size": image_size,
                **counts, "captions_per_image": captions_per_image,
                "train_captions_per_image": train_captions_per_image}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"write_retrieval: out_dir {out} exists and is not a directory")
    meta = out / "shapes.json"
    per_split = {s: train_captions_per_image if s == "train" else captions_per_image for s in counts}
    summary = {"out_dir": str(out), "reused": False, "settings": settings,
               "splits": {s: {"images": c, "captions": c * per_split[s], "annotation": str(out / f"{s}.json")}
                          for s, c in counts.items()}}
    if is_complete_dataset(out, settings, counts):
        return {**summary, "reused": True}
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)  # an interrupted rewrite must never look complete
    for split, count in counts.items():
        entries: list[dict] = []
        for i in range(count):
            rng = scene_rng(seed, split, i)
            scene = make_scene(rng)
            caps = captions(scene, rng, per_split[split])
            rel = f"images/{split}_{i:05d}.png"
            atomic_save_png(render(scene, image_size), out / rel)
            if split == "train":
                entries.extend({"image": rel, "caption": c, "image_id": f"shapes_{split}_{i:05d}"} for c in caps)
            else:
                entries.append({"image": rel, "caption": caps})
        atomic_write_json(out / f"{split}.json", entries)
    remove_stale_images(out / "images", counts)
    atomic_write_json(meta, settings)
    return summary


def is_complete_dataset(out: Path, settings: dict, counts: dict[str, int]) -> bool:
    """True if ``out`` holds a finished dataset written with exactly ``settings``."""
    try:
        old = json.loads((out / "shapes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if old != settings:
        return False
    return all((out / f"{split}.json").is_file()
               and all((out / "images" / f"{split}_{i:05d}.png").is_file() for i in range(count))
               for split, count in counts.items())


def remove_stale_images(images_dir: Path, counts: dict[str, int]) -> None:
    """Delete generator images left by an earlier, larger run (``{split}_{i}.png`` with i >= count)."""
    pattern = re.compile(r"^(train|val|test)_(\d{5,})\.png$")
    for p in images_dir.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(2)) >= counts[m.group(1)]:
            p.unlink()
