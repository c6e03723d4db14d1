"""Adversarial rows: where a run writes (see tests/test_adversarial.py).

The user's own files in the output folder, ``--out`` inside the run's inputs, an empty ``--out``,
a compressed model compressed again, an export over the model's own weights, a ratio no search
can reach: each refused in one line before anything is written, the user's folders unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import upop
from upop.checkpoint.folder import WEIGHTS_FILE

from ._adversarial_common import Row, compress, write


def _users_folder(t: Path) -> Path:
    """A folder of the user's own files that happen to carry a run's names, and no run.json."""
    out = t / "mine"
    write(out / "report.md", "# my report")
    write(out / "log.jsonl", '{"mine": true}\n')
    write(out / "compressed" / "thesis.tex", "\\documentclass{article}")
    write(out / "state" / "mine.txt", "notes")
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _truncated_test_image(w: Path, t: Path) -> Path:
    data = _copy(w / "data", t / "data")
    image = data / "images" / "test_00001.png"
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    return data


def _restart_over_users_files(w, t, *extra, data=None):
    return compress(w, _users_folder(t), "--resume", "--restart-if-missing", *extra, data=data)


def _no_run_left(_w, t: Path) -> None:
    assert not (t / "out").exists()


def _export_over_weights(w, t):
    model = _copy(w / "run" / "compressed", t / "model")
    return ["export", "--model", str(model), "--out", str(model / WEIGHTS_FILE), "--overwrite"]


def _compress_compressed(w, t):
    return compress(w, t / "out", model=w / "run" / "compressed")


def _api_prune_twice(w, t):
    model = upop.load_compressed(w / "run" / "compressed")
    return lambda: upop.attach_masks(model)


ROWS: dict[str, Row] = {
    # 1. --resume --restart-if-missing over the user's files: refused, nothing replaced or deleted
    "restart-if-missing over the user's run-named files": Row(
        _restart_over_users_files, "holds files but no run", watch=("mine",)),
    "restart-if-missing over the user's files, the run then rejected": Row(
        lambda w, t: _restart_over_users_files(w, t, "--check-images", "none", data=_truncated_test_image(w, t)),
        "holds files but no run", watch=("mine", "data")),
    "overwrite over the user's run-named files, no run.json": Row(
        lambda w, t: compress(w, _users_folder(t), "--overwrite"), "but no run.json", watch=("mine",)),
    "overwrite over the user's hidden file beside run names": Row(
        lambda w, t: compress(w, write(_users_folder(t) / ".env", "TOKEN=1").parent, "--overwrite"),
        "'.env'", watch=("mine",)),
    "empty --out": Row(lambda w, t: compress(w, ""), "--out '' is empty", after=lambda w, t: _no_files_in(t)),
    "blank --out": Row(lambda w, t: compress(w, "  "), "is empty"),
    "restart-if-missing with --out the model folder": Row(
        lambda w, t: compress(w, _copy(w / "model", t / "model"), "--resume", "--restart-if-missing",
                              model=t / "model"), "is the model", watch=("model",)),
    "resume with --out the model folder": Row(
        lambda w, t: compress(w, _copy(w / "model", t / "model"), "--resume", model=t / "model"),
        "is the model", watch=("model",)),
    "--out inside the model folder": Row(
        lambda w, t: compress(w, _copy(w / "model", t / "model") / "run", model=t / "model"),
        "is inside the model", watch=("model",)),
    # 6. --out inside --data
    "--out inside the data folder": Row(
        lambda w, t: compress(w, _copy(w / "data", t / "data") / "images" / "run", data=t / "data"),
        "is inside the data", watch=("data",)),
    "--out inside the data through a link": Row(
        lambda w, t: compress(w, _link(t / "data-link", _copy(w / "data", t / "data")) / "run", data=t / "data"),
        "is inside the data", watch=("data",)),
    # 7. export over the model's own weights
    "export --out over the model's weights": Row(_export_over_weights, "is inside the model", watch=("model",)),
    "import --out the tokenizer folder it reads": Row(
        lambda w, t: ["import", "blip-nlvr", str(write(t / "nlvr.pth", b"x")), "--out", str(_copy(w / "model", t / "model")),
                      "--tokenizer", str(t / "model"), "--overwrite"], "is the tokenizer folder", watch=("model",)),
    "export --out empty": Row(lambda w, t: ["export", "--model", str(w / "run" / "compressed"), "--out", ""],
                              "is empty"),
    # 5. plans do not compose: refused before the folder is touched
    "compress a compressed model": Row(_compress_compressed, "already compressed by upop",
                                       after=_no_run_left),
    "attach masks to a compressed model": Row(_api_prune_twice, "already compressed by upop",
                                              error=upop.ConfigError),
    # 10. a ratio no search can reach: refused before the dense evaluation, no folder left
    "ratio that no search can reach": Row(lambda w, t: compress(w, t / "out", "--ratio", "0.999999"),
                                          "cannot be met", after=_no_run_left),
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


def _no_files_in(t: Path) -> None:
    left = [p.name for p in t.iterdir()]
    assert not any(name in left for name in ("report.md", "run.json", "state", "compressed", "log.jsonl")), left
