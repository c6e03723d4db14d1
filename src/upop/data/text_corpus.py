"""Plain-text corpora for causal language modelling (the ``lm`` task): a reader, a checker and the
Shapes writer.

Layout of a data folder ``DIR``: one file per split, in one of two formats::

    DIR/train.jsonl   one JSON object per line with a "text" string (other keys are ignored)
    DIR/train.txt     plain UTF-8 text (see below)
    DIR/val.jsonl | DIR/val.txt
    DIR/test.jsonl | DIR/test.txt

A split given in both formats is refused (which one is meant cannot be told). Each split is a
list of documents, read in file order:

* ``.jsonl``: each line is one document, the object's ``"text"``. Blank lines are skipped, and so
  are documents whose text is only white space; the text is otherwise kept exactly (new lines
  inside it included). A line that is not a JSON object, or whose ``"text"`` is missing or not a
  string, is an error naming the file and the line.
* ``.txt``: when the file has a blank line (only white space) between two non-blank lines, its
  documents are the runs of non-blank lines separated by blank lines (paragraphs, each joined by
  ``\\n``); a file without such a blank line holds one document per non-blank line. Each
  document is stripped of surrounding white space.

Lines end at ``\\n`` (a ``\\r`` before it is dropped); other Unicode line separators are text.
A UTF-8 byte-order mark is dropped; text that is not UTF-8 (UTF-16, binary data) is an error
naming the file and the line. A split without any document is an error. Every problem is one
:class:`~upop.errors.DataError` line; with ``problems`` (a list, :mod:`upop.data._problems`)
they are recorded instead and reading goes on, for ``upop data check``.

The Shapes writer (:func:`write_lm`) writes one ``.jsonl`` per split; each document is several
Shapes captions of one scene, one per line, so a model can learn that later sentences agree with
earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from upop.data._files import decode_utf8, read_limited
from upop.data._problems import report
from upop.errors import ConfigError, DataError, show

SPLITS = ("train", "val", "test")
#: the file formats of a split, by suffix
SUFFIXES = (".jsonl", ".txt")
#: the largest split file read (the documents are held in memory)
MAX_FILE_BYTES = 16 * 2**30
#: the layout, for messages
LAYOUT = "DIR/{split}.jsonl (one {\"text\": ...} object per line) or DIR/{split}.txt (documents separated by " \
         "blank lines, else one per line)"
#: captions per Shapes document (inclusive range)
SHAPES_CAPTIONS = (2, 3)


class TextCorpus(Dataset):
    """One split of a text corpus: ``ds[i] == {"text": str, "index": i}``, in file order.

    ``texts`` are the documents, ``split`` the split's name and ``path`` the file read (None for
    texts given from Python); ``items`` is what a run's fingerprint reads (the count and a
    digest of every document, not the documents themselves)."""

    def __init__(self, texts: Sequence[str], split: str = "", path: Path | None = None):
        self.texts, self.split, self.path = list(texts), split, path
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self.texts):
            raise IndexError(f"document {i} of a split of {len(self.texts)}")
        return {"text": self.texts[i], "index": i}

    @property
    def items(self) -> tuple:
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            for text in self.texts:
                data = text.encode("utf-8", "surrogatepass")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
            self._digest = h.hexdigest()
        return ("text-corpus", len(self.texts), self._digest)

    def __repr__(self) -> str:
        return f"TextCorpus(split={self.split!r}, documents={len(self.texts)})"


def split_file(data_dir, split: str) -> Path:
    """The file of ``split`` in ``data_dir``: ``{split}.jsonl`` or ``{split}.txt``; a DataError when
    there is neither, or both."""
    root = Path(data_dir)
    found = [root / f"{split}{suffix}" for suffix in SUFFIXES if (root / f"{split}{suffix}").exists()
             or (root / f"{split}{suffix}").is_symlink()]
    if len(found) > 1:
        raise DataError(f"split {show(split)} is given twice, as {show(found[0])} and {show(found[1])}; keep one of "
                        "them")
    if not found:
        raise DataError(f"no {split}.jsonl or {split}.txt in {show(root)} (need {LAYOUT})")
    return found[0]


def _lines(text: str) -> list[str]:
    """The lines of ``text``, ending at ``\\n`` only (a ``\\r`` before it dropped)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read(path: Path, problems: list[str] | None) -> str | None:
    """The text of ``path``, or None (problem recorded) when it is no readable UTF-8 file."""
    try:
        data = read_limited(path, MAX_FILE_BYTES, "text file", DataError)
        return decode_utf8(data, path, "text file", DataError)
    except DataError as exc:
        report(problems, str(exc))
        return None


def _jsonl_document(path: Path, number: int, line: str) -> str:
    """The ``"text"`` of line ``number`` of a ``.jsonl`` file (a DataError naming file and line)."""
    where = f"text file {show(path)} line {number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); need one "
                        "{\"text\": ...} object per line") from None
    except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
        raise DataError(f"{where} cannot be read as JSON ({show(str(exc), 80)}); need one {{\"text\": ...}} "
                        "object per line") from None
    if not isinstance(entry, dict):
        raise DataError(f"{where} is a JSON {type(entry).__name__}; need an object with a \"text\" string")
    if "text" not in entry:
        keys = ", ".join(show(k, 40) for k in list(entry)[:8]) or "none"
        raise DataError(f"{where} has no \"text\" field (its fields: {keys}); need an object with a \"text\" string")
    if not isinstance(entry["text"], str):
        raise DataError(f"{where}: \"text\" is {show(entry['text'], 60)}, a {type(entry['text']).__name__}; need a "
                        "string")
    return entry["text"]


def jsonl_documents(path: Path, text: str, problems: list[str] | None = None) -> list[str]:
    """The documents of a ``.jsonl`` file's ``text`` (see the module's text)."""
    documents = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            document = _jsonl_document(path, number, line)
        except DataError as exc:
            report(problems, str(exc))
            continue
        if document.strip():
            documents.append(document)
    return documents


def txt_documents(text: str) -> list[str]:
    """The documents of a ``.txt`` file's ``text``: its paragraphs when a blank line separates two
    of them, else its non-blank lines (see the module's text)."""
    paragraphs: list[list[str]] = [[]]
    for line in _lines(text):
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]
    if len(paragraphs) > 1:
        return ["\n".join(p).strip() for p in paragraphs]
    return [line.strip() for p in paragraphs for line in p]


def load_lm_split(data_dir, split: str, problems: list[str] | None = None) -> TextCorpus:
    """One split of the text corpus in ``data_dir`` (see the module's text). Without ``problems`` the
    first problem raises a one-line DataError; with a list each is recorded there and the split
    holds the documents that could be read."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {show(root)} is not a directory (need {LAYOUT})")
    path = split_file(root, split)
    found: list[str] = []
    text = _read(path, found)
    documents: list[str] = []
    if text is not None:
        documents = (jsonl_documents(path, text, found) if path.suffix == ".jsonl" else txt_documents(text))
        if not documents and not found:
            found.append(f"text file {show(path)} holds no document (need at least one non-blank text; {LAYOUT})")
    for message in found:
        report(problems, message)
    return TextCorpus(documents, split, path)


def load_lm(data_dir, splits: Sequence[str] = SPLITS) -> dict[str, TextCorpus]:
    """``{split: TextCorpus}`` of the text corpus in ``data_dir``."""
    return {split: load_lm_split(data_dir, split) for split in splits}


def check_lm(root: Path, split: str, files, problems: list[str]) -> dict[str, int]:
    """``upop data check`` of one split (the checker signature of :mod:`upop.data.check`; a corpus
    has no image for ``files`` to check): every bad line and an empty split are problems."""
    corpus = load_lm_split(root, split, problems=problems)
    return {"documents": len(corpus), "characters": sum(len(t) for t in corpus.texts)}


def shapes_document(seed: int, split: str, i: int) -> str:
    """Document ``i`` of ``split``: 2 or 3 distinct captions of one Shapes scene, one per line."""
    from upop.data.shapes import captions, make_scene

    rng = random.Random(f"upop-shapes-lm:{seed}:{split}:{i}")
    scene = make_scene(rng)
    return "\n".join(captions(scene, rng, rng.randint(*SHAPES_CAPTIONS)))


def write_lm(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64,
             seed: int = 0) -> dict:
    """Write a Shapes text corpus under ``out_dir``: ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``
    with ``train``, ``val`` and ``test`` documents (:func:`shapes_document`, deterministic for
    ``seed``), then ``shapes.json`` (the settings, written last); every file atomically.
    ``image_size`` is checked like the other writers' and unused (there are no images). Returns
    ``{"out_dir", "reused": False, "settings", "splits": {split: {"images", "documents", "file"}}}``
    (``images``: the scenes the documents describe, one each)."""
    from upop.data.shapes import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, VERSION, check_int
    from upop.runs.atomic import write_json_atomic, write_text_atomic

    w = "write_lm"
    counts = {split: check_int(w, split, n, 1) for split, n in (("train", train), ("val", val), ("test", test))}
    check_int(w, "image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    check_int(w, "seed", seed, -(2 ** 63))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{w}: out_dir {show(out)} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").unlink(missing_ok=True)  # an interrupted rewrite must never look complete
    settings = {"format": "upop-shapes-lm", "version": VERSION, "seed": seed, **counts,
                "captions_per_document": list(SHAPES_CAPTIONS)}
    splits = {}
    for split, count in counts.items():
        path = out / f"{split}.jsonl"
        lines = (json.dumps({"text": shapes_document(seed, split, i)}, ensure_ascii=False) for i in range(count))
        write_text_atomic(path, "\n".join(lines) + "\n")
        splits[split] = {"images": count, "documents": count, "file": str(path)}
    write_json_atomic(out / "shapes.json", settings)
    return {"out_dir": str(out), "reused": False, "settings": settings, "splits": splits}


__all__ = ["LAYOUT", "MAX_FILE_BYTES", "SPLITS", "SUFFIXES", "TextCorpus", "check_lm", "jsonl_documents",
           "load_lm", "load_lm_split", "shapes_document", "split_file", "txt_documents", "write_lm"]
