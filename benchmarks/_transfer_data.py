"""Data of the transfer benchmark (benchmarks/transfer.py): Shapes scenes filtered by attribute
combination, written in the retrieval folder layout of :func:`upop.data.shapes.write_retrieval`.

Two folders, each built once and cached under ``<cache>/<name>-<digest>`` (the digest covers the
folder's settings, :data:`DATA_VERSION` and the Shapes generator's version):

- ``pretrain-*``: the large, varied corpus: every kind, colour, size, position and relation,
  scenes unfiltered (``train`` and ``val``); it does not depend on the held-out pairs;
- ``task-*``: the small task set and its test sets, filtered by the (colour, kind) pairs of
  :data:`HELD_OUT`: ``train`` and ``val`` hold NO object of a held-out pair; ``test`` has at least
  one held-out object in EVERY image, and each of its captions names a held-out pair (drawn from
  the image's true captions that do: 'a red circle above a blue square', 'two red circles', ...),
  so retrieving it takes the held-out binding, not only the image's other objects; ``seen`` is a
  second test set drawn like ``train`` (only seen pairs, captions of every family), for contrast.

Scenes come from the unchanged Shapes generator (:func:`upop.data.shapes.make_scene`, captions by
:func:`upop.data.shapes.captions`, same rendering); candidate ``j`` of a split draws from its own
``random.Random("upop-transfer:{seed}:{folder}:{split}:{j}")`` and is kept or skipped by the
split's rule, so every split is deterministic and no two splits share a scene. Each folder also
holds ``scenes.json`` (the objects of every image of every split, for checking the filter) and,
written last, ``transfer.json`` (its settings: a folder without it is unfinished and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from upop.data.shapes import (COLOURS, KINDS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, VERSION, Scene, check_int,
                              atomic_save_png, atomic_write_json, caption_pool, captions, make_scene, render)
from upop.errors import ConfigError

DATA_VERSION = 2
"""Bump when what the writer produces for the same settings changes (the cache key includes it)."""

HELD_OUT: tuple[tuple[str, str], ...] = (("red", "circle"), ("green", "square"), ("blue", "triangle"),
                                         ("yellow", "star"), ("purple", "diamond"), ("orange", "cross"))
"""(colour, kind) pairs absent from the task set: one per colour and one per kind (a diagonal of the
6 x 6 grid), so every colour and every kind is still seen in the task set, in 5 other pairings."""

TRAIN_CAPTIONS, EVAL_CAPTIONS = 2, 5
"""Captions per image: training splits (as write_retrieval's train), evaluation splits."""

MAX_DRAWS = 100
"""Candidates drawn per kept image at most before giving up (the rarest rule keeps about 1 in 3)."""


def combos(scene: Scene) -> set[tuple[str, str]]:
    """The (colour, kind) pairs of the objects of ``scene``."""
    return {(o.colour, o.kind) for o in scene.objects}


def has_held_out(scene: Scene, held_out=HELD_OUT) -> bool:
    """True if an object of ``scene`` is of a held-out (colour, kind) pair."""
    return bool(combos(scene) & set(held_out))


RULES: dict[str, Callable[[Scene, tuple], bool]] = {
    "any": lambda scene, held: True,
    "seen": lambda scene, held: not has_held_out(scene, held),
    "held-out": lambda scene, held: has_held_out(scene, held),
}
"""Split rules: keep every scene, only scenes without held-out pairs, only scenes with one."""


def mentions_held_out(caption: str, held_out=HELD_OUT) -> bool:
    """True if ``caption`` names a held-out pair ('red circle', also inside 'red circles')."""
    return any(f"{colour} {kind}" in caption for colour, kind in held_out)


def held_out_captions(scene: Scene, rng: random.Random, n: int, held_out=HELD_OUT) -> list[str]:
    """``n`` true captions of ``scene`` that name a held-out pair, distinct while the pool lasts
    (then repeated); the scene must hold a held-out object (every one is named by some caption)."""
    pool = [c for texts in caption_pool(scene).values() for c in texts if mentions_held_out(c, held_out)]
    pool = list(dict.fromkeys(pool))
    if not pool:
        raise ConfigError(f"scene {scene.objects!r} has no caption naming a held-out pair of {held_out}")
    picked = rng.sample(pool, min(n, len(pool)))
    return picked + [rng.choice(pool) for _ in range(n - len(picked))]


def _check_held_out(held_out) -> tuple[tuple[str, str], ...]:
    pairs = tuple(tuple(p) for p in held_out)
    for p in pairs:
        if len(p) != 2 or p[0] not in COLOURS or p[1] not in KINDS:
            raise ConfigError(f"held-out pair {p!r} is not allowed (need (colour, kind) with a colour of "
                              f"{list(COLOURS)} and a kind of {list(KINDS)})")
    if not pairs or len(set(pairs)) == len(COLOURS) * len(KINDS):
        raise ConfigError(f"held_out has {len(set(pairs))} distinct pairs (need between 1 and "
                          f"{len(COLOURS) * len(KINDS) - 1})")
    return pairs


def write_folder(out: Path, splits: dict[str, tuple[int, str, int]], *, image_size: int, seed: int, name: str,
                 held_out=HELD_OUT) -> dict:
    """Write one retrieval folder. ``splits`` maps a split to ``(images, rule, captions per image)``
    (rule: a key of :data:`RULES`; a "held-out" split's captions all name a held-out pair);
    ``train`` is written one entry per caption, other splits one entry per image with its
    captions. Reuses a finished folder of the same settings.
    Returns the settings."""
    held_out = _check_held_out(held_out)
    check_int(f"transfer data {name}", "image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    for split, (count, rule, caps) in splits.items():
        check_int(f"transfer data {name}", f"{split} images", count, 1)
        check_int(f"transfer data {name}", f"{split} captions", caps, 1)
        if rule not in RULES:
            raise ConfigError(f"transfer data {name}: split {split} has rule {rule!r} (allowed: {', '.join(RULES)})")
    settings = {"format": "upop-transfer-retrieval", "data_version": DATA_VERSION, "shapes_version": VERSION,
                "name": name, "seed": seed, "image_size": image_size, "splits": {s: list(v) for s, v in splits.items()}}
    if any(rule != "any" for _, rule, _ in splits.values()):
        settings["held_out"] = [list(p) for p in held_out]
    meta = Path(out) / "transfer.json"
    if meta.is_file() and json.loads(meta.read_text()) == settings:
        return settings
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)  # an interrupted rewrite must never look finished
    scenes: dict[str, list] = {}
    for split, (count, rule, caps) in splits.items():
        entries, kept, draws = [], [], 0
        while len(kept) < count:
            if draws >= MAX_DRAWS * count:
                raise ConfigError(f"transfer data {name}: split {split} kept {len(kept)} of {count} scenes in "
                                  f"{draws} draws (rule {rule!r} with held-out pairs {held_out} keeps too few)")
            rng = random.Random(f"upop-transfer:{seed}:{name}:{split}:{draws}")
            draws += 1
            scene = make_scene(rng)
            if not RULES[rule](scene, held_out):
                continue
            i = len(kept)
            rel = f"images/{split}_{i:05d}.png"
            texts = held_out_captions(scene, rng, caps, held_out) if rule == "held-out" else captions(scene, rng, caps)
            atomic_save_png(render(scene, image_size), out / rel)
            if split == "train":
                entries.extend({"image": rel, "caption": c, "image_id": f"{name}_{split}_{i:05d}"} for c in texts)
            else:
                entries.append({"image": rel, "caption": texts})
            kept.append([asdict(o) for o in scene.objects])
        atomic_write_json(out / f"{split}.json", entries)
        scenes[split] = kept
    atomic_write_json(out / "scenes.json", scenes)
    atomic_write_json(meta, settings)
    return settings


def data_settings(*, pretrain: int = 20000, pretrain_val: int = 300, task: int = 1000, task_val: int = 200,
                  test: int = 500, seen: int = 500, image_size: int = 48, seed: int = 0, held_out=HELD_OUT) -> dict:
    """The settings of both folders (what :func:`build_data` writes and keys the cache by)."""
    held_out = _check_held_out(held_out)
    return {
        "image_size": image_size, "seed": seed, "held_out": [list(p) for p in held_out],
        "pretrain": {"train": (pretrain, "any", TRAIN_CAPTIONS), "val": (pretrain_val, "any", EVAL_CAPTIONS)},
        "task": {"train": (task, "seen", TRAIN_CAPTIONS), "val": (task_val, "seen", EVAL_CAPTIONS),
                 "test": (test, "held-out", EVAL_CAPTIONS), "seen": (seen, "seen", EVAL_CAPTIONS)},
    }


def digest(obj) -> str:
    """A short, stable key of a JSON-able object (with the data version)."""
    text = json.dumps({"data_version": DATA_VERSION, "shapes_version": VERSION, "obj": obj}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_data(cache, **settings) -> dict:
    """Write (or reuse) both folders under ``cache`` (``pretrain-<digest>``, ``task-<digest>``);
    ``settings`` are those of :func:`data_settings`. Returns ``{"pretrain", "task", "digest",
    "pretrain_digest", "settings"}`` (``digest`` covers everything, ``pretrain_digest`` the corpus)."""
    spec = data_settings(**settings)
    common = {"image_size": spec["image_size"], "seed": spec["seed"]}
    keys = {"pretrain": digest({**common, "splits": spec["pretrain"]}),
            "task": digest({**common, "held_out": spec["held_out"], "splits": spec["task"]})}
    cache = Path(cache).expanduser()
    out = {"digest": digest(spec), "pretrain_digest": keys["pretrain"], "settings": spec}
    for name, key in keys.items():
        out[name] = cache / f"{name}-{key}"
        write_folder(out[name], spec[name], image_size=spec["image_size"], seed=spec["seed"], name=name,
                     held_out=[tuple(p) for p in spec["held_out"]])
    return out


def split_scenes(folder, split: str) -> list[set[tuple[str, str]]]:
    """The (colour, kind) pairs of every image of ``split`` in a folder written here."""
    data = json.loads((Path(folder) / "scenes.json").read_text())
    return [{(o["colour"], o["kind"]) for o in objects} for objects in data[split]]
