"""VQA data: readers for the BLIP/UPop JSON and the official VQAv2 pair of files, a Dataset and a collator.

Supported layouts for split ``S`` of ``data_dir`` (searched directly and in ``annotation/`` /
``annotations/``, first match wins):

* BLIP/UPop: ``S.json``, ``vqa_S.json`` or ``vqa_S2014.json`` — a JSON list of
  ``{"question_id", "image", "question", "answer": str | [str, ...]}`` (``image`` relative to
  ``data_dir``). ``question_id`` is optional.
* Official VQAv2: ``*_S2014_questions.json`` (or ``*_S_questions.json``), ``{"questions":
  [{"image_id", "question", "question_id"}]}``, next to ``*_S2014_annotations.json``,
  ``{"annotations": [{"question_id", "answers": [{"answer": ...}]}]}``. Image files are
  ``data_dir/{image_pattern % image_id}`` with ``image_pattern`` defaulting to
  ``"S2014/COCO_S2014_%012d.jpg"`` (COCO's naming); pass ``image_pattern=`` for other layouts.

Every problem raises a one-line :class:`~upop.errors.DataError` naming the file and the entry
(or, given ``problems=[]``, is recorded there and the entry skipped: ``upop data check``).
Answers are kept verbatim (the official accuracy compares them raw when the annotators agree).

Candidate answers for rank inference: :func:`load_answer_list` reads a JSON list of strings
(VQAv2/BLIP ``answer_list.json``, :data:`ANSWER_LIST`); :func:`frequent_answers` lists the distinct
answers of a split, most frequent first.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from upop.errors import ConfigError, DataError, show
from upop.data._problems import collect, collect_list, require_fields
from upop.data.images import load_rgb_image
from upop.data.retrieval import ANNOTATION_DIRS, processor_parts, read_json, check_images_exist


@dataclass
class VQAItem:
    """One question about one image, with every annotator's answer."""

    question_id: str
    image: Path
    question: str
    answers: list[str]


def _check_dir(data_dir) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data_dir {show(data_dir)} is not an existing directory (need a folder with the annotation "
                        "files)")
    return data_dir


def _folders(data_dir: Path) -> list[Path]:
    return [data_dir / sub if sub else data_dir for sub in ANNOTATION_DIRS]


def _text(path: Path, where: str, key: str, value) -> str:
    return " ".join(_nonempty(path, where, value, key).split())


def _nonempty(path: Path, where: str, value, key: str = "answer") -> str:
    """A non-empty string, kept verbatim (the official accuracy compares raw answers when the
    annotators agree)."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"annotation file {show(path)}: {where} has {key} {show(value, 80)} (need a non-empty string)")
    return value


def _blip_entry(path: Path, i: int, entry, root: Path) -> VQAItem:
    where = f"entry {i}"
    require_fields(path, where, entry, ("image", "question", "answer"))
    answers = entry["answer"] if isinstance(entry["answer"], list) else [entry["answer"]]
    if not answers:
        raise DataError(f"annotation file {show(path)}: {where} has no answers (need 'answer': a string or a "
                        "non-empty list of strings)")
    answers = [_nonempty(path, where, a) for a in answers]
    return VQAItem(str(entry.get("question_id", i)), root / _text(path, where, "image", entry["image"]),
                   _text(path, where, "question", entry["question"]), answers)


def _blip_entries(path: Path, data, root: Path, problems: list[str] | None = None) -> list[VQAItem]:
    return collect_list(problems, _blip_entry, path, data, root, "{'image', 'question', 'answer'}")


def _official_answers(apath: Path, i: int, ann) -> tuple[str, list[str]]:
    where = f"annotations[{i}]"
    if not isinstance(ann, dict) or "question_id" not in ann or "answers" not in ann:
        raise DataError(f"annotation file {show(apath)}: {where} has no 'question_id' or 'answers' field")
    if not isinstance(ann["answers"], list) or not ann["answers"]:
        raise DataError(f"annotation file {show(apath)}: {where} (question_id {show(ann['question_id'], 40)}) has "
                        "no answers (need a non-empty list of {'answer': ...})")
    got = []
    for j, a in enumerate(ann["answers"]):
        if not isinstance(a, dict) or "answer" not in a:
            raise DataError(f"annotation file {show(apath)}: {where}.answers[{j}] has no 'answer' field")
        got.append(_nonempty(apath, f"{where}.answers[{j}]", a["answer"]))
    return str(ann["question_id"]), got


def _official_question(qpath: Path, apath: Path, i: int, q, answers: dict[str, list[str]], root: Path,
                       pattern: str) -> VQAItem:
    where = f"questions[{i}]"
    require_fields(qpath, where, q, ("image_id", "question", "question_id"))
    qid = str(q["question_id"])
    if qid not in answers:
        raise DataError(f"annotation file {show(qpath)}: {where} (question_id {show(qid, 40)}) has no answers in "
                        f"{show(apath.name)}")
    try:
        rel = pattern % int(q["image_id"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"annotation file {show(qpath)}: {where} has image_id {show(q['image_id'], 40)} that does not "
                        f"fit image_pattern {show(pattern)} ({show(str(exc))})") from None
    return VQAItem(qid, root / rel, _text(qpath, where, "question", q["question"]), answers[qid])


def _official_entries(qpath: Path, apath: Path, root: Path, pattern: str,
                      problems: list[str] | None = None) -> list[VQAItem]:
    qdata, adata = read_json(qpath), read_json(apath)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataError(f"annotation file {show(qpath)}: no 'questions' list at the top level (need the VQAv2 "
                        "layout)")
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise DataError(f"annotation file {show(apath)}: no 'annotations' list at the top level (need the VQAv2 "
                        "layout)")
    pairs = (collect(problems, _official_answers, apath, i, ann) for i, ann in enumerate(adata["annotations"]))
    answers = dict(p for p in pairs if p is not None)
    items = (collect(problems, _official_question, qpath, apath, i, q, answers, root, pattern)
             for i, q in enumerate(qdata["questions"]))
    return [it for it in items if it is not None]


def load_vqa_split(data_dir, split: str, image_root=None, image_pattern: str | None = None,
                   problems: list[str] | None = None) -> list[VQAItem]:
    """Read split ``split`` of a VQA dataset (either layout, see the module doc) into items.

    With ``problems`` (a list), bad entries and missing images are recorded there and left out.
    """
    data_dir = _check_dir(data_dir)
    if not isinstance(split, str) or not split or "/" in split:
        raise ConfigError(f"split={show(split)} is not allowed (need a name such as 'train', 'val' or 'test')")
    root = Path(image_root) if image_root is not None else data_dir
    items = None
    for folder in _folders(data_dir):
        for name in (f"{split}.json", f"vqa_{split}.json", f"vqa_{split}2014.json"):
            if (folder / name).is_file():
                path = folder / name
                items = _blip_entries(path, read_json(path), root, problems)
                break
        if items is not None:
            break
        qs = sorted(folder.glob(f"*_{split}2014_questions.json")) + sorted(folder.glob(f"*_{split}_questions.json"))
        if qs:
            qpath = qs[0]
            apath = qpath.with_name(qpath.name.replace("_questions.json", "_annotations.json"))
            apath = apath if apath.is_file() else qpath.with_name(
                qpath.name.replace("OpenEnded_", "").replace("_questions.json", "_annotations.json"))
            if not apath.is_file():
                raise DataError(f"annotation file {show(qpath)}: no matching annotations file next to it (need "
                                f"{show(apath.name)}; test-dev/test questions have no answers and cannot be "
                                "evaluated)")
            path = qpath
            pattern = image_pattern or f"{split}2014/COCO_{split}2014_%012d.jpg"
            items = _official_entries(qpath, apath, root, pattern, problems)
            break
    if items is None:
        raise DataError(f"data_dir {show(data_dir)}: no VQA annotation file for split {show(split)} (looked for "
                        f"{split}.json, vqa_{split}.json or *_{split}2014_questions.json + *_annotations.json)")
    if not items:
        raise DataError(f"annotation file {show(path)}: split {show(split)} has no "
                        f"{'usable ' if problems else ''}questions")
    first_use: dict[Path, str] = {}
    for it in items:
        first_use.setdefault(it.image, f"question_id {show(it.question_id, 40)}")
    missing = check_images_exist(path, list(first_use.items()), root, problems)
    return [it for it in items if it.image not in missing]


ANSWER_LIST = "answer_list.json"
"""Name of the candidate answer file looked for in a VQA data folder."""


def load_answer_list(path) -> list[str]:
    """The candidate answers of a JSON file holding a non-empty list of non-empty strings, in file
    order, whitespace runs collapsed, duplicates dropped."""
    path = Path(path)
    need = "need a JSON list of answer strings, as VQAv2's answer_list.json"
    if not path.is_file():
        raise DataError(f"answer list {show(path)} is not an existing file ({need})")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"answer list {show(path)} cannot be read as UTF-8 text ({show(str(exc))})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"answer list {show(path)}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}; "
                        f"{need})") from None
    if not isinstance(data, list):
        raise DataError(f"answer list {show(path)}: top level is a JSON {type(data).__name__} ({need})")
    if not data:
        raise DataError(f"answer list {show(path)} is empty ({need})")
    for i, answer in enumerate(data):
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"answer list {show(path)}: entry {i} is {show(answer, 80)} (need a non-empty string)")
    return list(dict.fromkeys(" ".join(a.split()) for a in data))


def frequent_answers(items: Sequence[VQAItem]) -> list[str]:
    """Distinct annotator answers of ``items`` (whitespace runs collapsed), most frequent first,
    ties in alphabetical order."""
    counts = Counter(" ".join(a.split()) for it in items for a in it.answers)
    return sorted(counts, key=lambda a: (-counts[a], a))


def draw_answer(sample: dict, seed: int, epoch: int) -> str:
    """The training answer of ``sample`` (a :class:`VQADataset` item) in ``epoch``: one annotator's,
    drawn by frequency (a repeated answer is drawn as often as annotators gave it), seeded by
    ``(seed, epoch, index)``, so every process and worker draws the same."""
    return random.Random(f"{seed}:{epoch}:{sample['index']}").choice(sample["answers"])


class VQADataset(Dataset):
    """``ds[i] == {"image": PIL RGB, "question", "answers": [...], "index": i}``; ``candidates`` are
    the answers rank inference chooses from (set by the task's ``load_splits``, else None)."""

    def __init__(self, items: Sequence[VQAItem], candidates: Sequence[str] | None = None):
        self.items = list(items)
        if not self.items:
            raise DataError("VQA dataset has no questions")
        self.candidates = list(candidates) if candidates is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        return {"image": load_rgb_image(it.image), "question": it.question, "answers": list(it.answers),
                "index": int(i)}


class VQACollator:
    """Training batch: the image, the question (``input_ids``, ``attention_mask``) and ONE answer
    drawn by annotator frequency, seeded by ``(seed, epoch, index)`` (``answer_ids``,
    ``answer_mask``: plain tokenizer output; the task turns them into BLIP decoder inputs)."""

    def __init__(self, processor, seed: int = 0, max_length: int = 32):
        self.image_processor, self.tokenizer = processor_parts(processor)
        self.seed, self.epoch, self.max_length = seed, 0, max_length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def encode_images(self, samples) -> torch.Tensor:
        return self.image_processor(images=[s["image"] for s in samples], return_tensors="pt")["pixel_values"]

    def encode_questions(self, samples) -> dict:
        enc = self.tokenizer([s["question"] for s in samples], padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, samples) -> dict:
        answers = [draw_answer(s, self.seed, self.epoch) for s in samples]
        enc = self.tokenizer(answers, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"pixel_values": self.encode_images(samples), **self.encode_questions(samples),
                "answer_ids": enc["input_ids"], "answer_mask": enc["attention_mask"]}
