"""No code from model folders, ever; weights and plans checked.

One table of damaged or hostile model folders (dense and compressed): each must be refused with
ONE line naming the problem, through the CLI (``upop: error: ...``, exit code 2, no traceback)
and through the API (a :class:`CheckpointError`), and no Python shipped in the folder (modules
named by an ``auto_map``, a pickle) may ever run, even with ``yes`` on stdin.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import upop
from upop.cli import main

from ._families import clip_world

KEY = "text_model.encoder.layers.0.mlp.fc1.weight"
MARKER = "code-ran"  # created (in the test's tmp folder) by any code of a hostile folder that runs
EVIL_SOURCE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny Shapes retrieval data, a tiny CLIP folder, its compressed checkpoint, and the
    weights of a CLIP of another size."""
    root = clip_world(tmp_path_factory.mktemp("safety"), 16, 8, 8)
    model, _ = upop.load_model(root / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:3] = 0
    upop.prune(model, masks)
    upop.save_compressed(model, root / "compressed")
    other = upop.models.make_model("clip", size="small", image_size=32)
    save_file(other.state_dict(), str(root / "other-size.safetensors"), metadata={"format": "pt"})
    return root


class _Pickled:
    """Unpickling this creates the marker file: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---- edits of a copied folder ------------------------------------------------------------------

Edit = Callable[[Path, Path], None]  # (copied folder, world folder) -> None


def _json(name: str, change: Callable[[dict], None]) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return edit


def _text(name: str, text: str) -> Edit:
    return lambda folder, world: (folder / name).write_text(text)


def _tensor(change: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        state = load_file(str(folder / "model.safetensors"))
        state[KEY] = change(state[KEY])
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _poke(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t
    return change


def _truncate(folder: Path, world: Path) -> None:
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def _bin_only(folder: Path, world: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _pickle_bin(folder: Path, world: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Pickled(folder.parent / MARKER)))


def _drop(key: str) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        state = load_file(str(folder / "model.safetensors"))
        del state[key]
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _weights_from(source: str) -> Edit:
    return lambda folder, world: shutil.copy(world / source, folder / "model.safetensors")


def _custom_code(folder: Path, world: Path) -> None:
    """A folder that asks for its own Python: a custom model_type and an auto_map naming modules
    that create the marker when imported."""
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(EVIL_SOURCE.format(marker=str(folder.parent / MARKER)))
    _json("config.json", lambda c: c.update(model_type="evilclip", auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}))(folder, world)


def _shard(folder: Path, world: Path) -> None:
    """Split model.safetensors into two shards and an index, as save_pretrained does for big models."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _first_group(change: Callable[[dict], None]) -> Edit:
    return _json("upop_plan.json", lambda plan: change(next(iter(plan["groups"].values()))))


def _both(*edits: Edit) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        for e in edits:
            e(folder, world)
    return edit

NO_CODE = "never runs code from model folders"

# case -> (folder it edits: "model" (dense) or "compressed", edit, text the one-line message must contain)
CASES = {
    # code from the folder
    "auto_map with a custom model_type": ("model", _custom_code, NO_CODE),
    "auto_map with a known model_type": ("model", _json("config.json", lambda c: c.update(
        auto_map={"AutoModel": "modeling_evil.EvilModel"})), "config.json has an auto_map"),
    "custom model_type without auto_map": ("model", _json("config.json", lambda c: c.update(model_type="evilclip")),
                                           "'evilclip'"),
    "auto_map in tokenizer_config.json": ("model", _json("tokenizer_config.json", lambda c: c.update(
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})),
        "tokenizer_config.json has an auto_map"),
    "compressed: auto_map": ("compressed", _custom_code, NO_CODE),
    # weights that are not safetensors, or damaged
    "pytorch_model.bin only": ("model", _bin_only, "use_safetensors=False"),
    "pickle in pytorch_model.bin": ("model", _pickle_bin, "pytorch_model.bin"),
    "bool tensor": ("model", _tensor(lambda t: t > 0), f"'{KEY}' is torch.bool"),
    "integer tensor": ("model", _tensor(lambda t: (t * 100).to(torch.int32)), f"'{KEY}' is torch.int32"),
    "NaN in a tensor": ("model", _tensor(_poke(float("nan"))), f"'{KEY}' has 1 NaN/Inf"),
    "Inf in a tensor": ("model", _tensor(_poke(float("inf"))), f"'{KEY}' has 1 NaN/Inf"),
    "truncated safetensors": ("model", _truncate, "model.safetensors': cannot be read as a safetensors file"),
    "not a safetensors file": ("model", _text("model.safetensors", "garbage"), "cannot be read as a safetensors file"),
    "missing tensor": ("model", _drop(KEY), f"no tensor '{KEY}'"),
    "weights of another size": ("model", _weights_from("other-size.safetensors"), "different-size model"),
    "sharded: NaN in a shard": ("model", _both(_tensor(_poke(float("nan"))), _shard), "-of-00002.safetensors': tensor"),
    "sharded: index names a file outside the folder": ("model", _both(_shard, _json(
        "model.safetensors.index.json", lambda i: i["weight_map"].update({KEY: "../x.safetensors"}))),
        "'../x.safetensors' is not a .safetensors file in the same folder"),
    "config.json not JSON": ("model", _text("config.json", "{not json"), "config.json': not valid JSON"),
    "config.json a list": ("model", _text("config.json", "[1, 2]"), "not an object"),
    "compressed: bool tensor": ("compressed", _tensor(lambda t: t > 0), f"'{KEY}' is torch.bool"),
    "compressed: integer tensor": ("compressed", _tensor(lambda t: t.to(torch.int64)), f"'{KEY}' is torch.int64"),
    "compressed: NaN in a tensor": ("compressed", _tensor(_poke(float("nan"))), "NaN/Inf"),
    "compressed: Inf in a tensor": ("compressed", _tensor(_poke(float("-inf"))), "NaN/Inf"),
    "compressed: truncated safetensors": ("compressed", _truncate, "cannot be read as a safetensors file"),
    "compressed: dense weights": ("compressed", _weights_from("model/model.safetensors"), "has shape"),
    "compressed: config.json not JSON": ("compressed", _text("config.json", "{"), "config.json': not valid JSON"),
    # the plan
    "plan nested 200k deep": ("compressed", _text("upop_plan.json", "[" * 200_000 + "]" * 200_000), "nested deeper"),
    "plan not JSON": ("compressed", _text("upop_plan.json", '{"groups": '), "upop_plan.json': not valid JSON"),
    "plan groups []": ("compressed", _json("upop_plan.json", lambda p: p.update(groups=[])), "groups is []"),
    "plan groups {}": ("compressed", _json("upop_plan.json", lambda p: p.update(groups={})), "at least one group"),
    "plan kept 5": ("compressed", _first_group(lambda g: g.update(kept=5)), "kept is 5"),
    "plan kept unsorted": ("compressed", _first_group(lambda g: g.update(kept=[2, 1])), "kept is [2, 1]"),
    "plan kept with a bool": ("compressed", _first_group(lambda g: g.update(kept=[False, 1])), "kept is [False, 1]"),
    "plan kept out of range": ("compressed", _first_group(lambda g: g["kept"].append(999)), "999 is outside"),
    "plan dense_units a string": ("compressed", _first_group(lambda g: g.update(dense_units=str(g["dense_units"]))),
                                  "dense_units is '"),
    "plan group without kind": ("compressed", _first_group(lambda g: g.pop("kind")), "missing kind"),
    "plan unknown field": ("compressed", _json("upop_plan.json", lambda p: p.update(extra=1)), "unknown ['extra']"),
    "plan format_version true": ("compressed", _json("upop_plan.json", lambda p: p.update(format_version=True)),
                                 "format_version True"),
    "plan model_class of another known class": ("compressed", _json("upop_plan.json", lambda p: p.update(
        model_class="ViTForImageClassification")), "'ViTForImageClassification' is not the class config.json records"),
    "plan model_class of another class, config without architectures": ("compressed", _both(
        _json("upop_plan.json", lambda p: p.update(model_class="ViTForImageClassification")),
        _json("config.json", lambda c: c.pop("architectures"))), "needs a ViTConfig"),
    "plan model_class with a newline and NUL": ("compressed", _json("upop_plan.json", lambda p: p.update(
        model_class="CLIP\nModel\x00")), "'CLIP\\nModel\\x00'"),
}


def _folder(world: Path, tmp: Path, case: str) -> Path:
    source, edit, _ = CASES[case]
    folder = tmp / "m"
    shutil.copytree(world / source, folder)
    edit(folder, world)
    return folder


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_refuses_in_one_line(case, world, tmp_path, capsys):
    folder = _folder(world, tmp_path, case)
    capsys.readouterr()
    code = main(["evaluate", "--model", str(folder), "--task", "retrieval", "--data", str(world / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = _one_line(err)
    assert line.startswith("upop: error: ") and CASES[case][2] in line, line
    assert not (tmp_path / MARKER).exists(), "code from the model folder ran"


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_refuses_with_a_checkpoint_error(case, world, tmp_path):
    folder = _folder(world, tmp_path, case)
    load = upop.load_compressed if CASES[case][0] == "compressed" else upop.load_model
    with pytest.raises(upop.CheckpointError) as info:
        load(folder)
    message = str(info.value)
    assert CASES[case][2] in message and "\n" not in message and "\x00" not in message, message
    assert not (tmp_path / MARKER).exists(), "code from the model folder ran"


def test_the_bin_hint_converts_the_folder(world, tmp_path):
    """The command in the pytorch_model.bin message is one that works."""
    folder = _folder(world, tmp_path, "pytorch_model.bin only")
    with pytest.raises(upop.CheckpointError) as info:
        upop.load_model(folder)
    command = str(info.value).split("Convert it once with: ")[1]
    assert command.startswith('python -c "') and command.endswith('"')
    exec(command[len('python -c "'):-1], {})  # noqa: S102  (our own message's code)
    model, _ = upop.load_model(folder)
    reference, _ = upop.load_model(world / "model")
    assert torch.equal(model.state_dict()[KEY], reference.state_dict()[KEY])


def test_sharded_safetensors_load(world, tmp_path):
    """The checks read every shard an index names; a sound sharded folder loads unchanged."""
    folder = tmp_path / "m"
    shutil.copytree(world / "model", folder)
    _shard(folder, world)
    model, _ = upop.load_model(folder)
    reference, _ = upop.load_model(world / "model")
    assert all(torch.equal(t, reference.state_dict()[k]) for k, t in model.state_dict().items())


def test_a_hub_id_fetches_data_files_only(world, tmp_path, monkeypatch):
    """A Hub id is fetched as a snapshot of configs, safetensors and vocabularies (never Python or
    pickles) and then checked and loaded like a local folder."""
    import fnmatch

    import huggingface_hub

    def snapshot_download(repo_id, allow_patterns):
        assert repo_id == "someone/tiny-clip"
        fetched = [name for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "modeling_x.py",
                                     "pytorch_model.bin", "model.pkl")
                   if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns)]
        assert fetched == ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]
        shutil.copytree(world / "model", tmp_path / "snapshot")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, processor = upop.load_model("someone/tiny-clip")
    assert type(model).__name__ == "CLIPModel" and processor is not None


def test_json_size_is_checked_before_parsing(world, tmp_path, monkeypatch):
    import upop._safe_load as safe_load

    monkeypatch.setattr(safe_load, "MAX_JSON_BYTES", 100)
    with pytest.raises(upop.CheckpointError, match=r"upop_plan.json': [0-9,]+ bytes, more than the 100 "):
        upop.load_compressed(world / "compressed")


# ---- a hostile folder with ``yes`` on stdin: transformers' [y/N] prompt must never be reached ----

DRIVER = """
import contextlib, io, json, pathlib, sys
import upop
from upop.cli import main
from upop.models import load_processor_or_none

data, out, dense, compressed, marker = sys.argv[1:6]
tiny = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "8", "--no-progress"]


def processor():
    load_processor_or_none(dense)  # called on its own, without load_any's folder check first
    return 0


runs = {
    "compress": lambda: main(["compress", "--model", dense, "--task", "retrieval", "--data", data, "--out", out,
                              *tiny]),
    "evaluate": lambda: main(["evaluate", "--model", dense, "--task", "retrieval", "--data", data]),
    "evaluate compressed": lambda: main(["evaluate", "--model", compressed, "--task", "retrieval", "--data", data]),
    "load_compressed": lambda: upop.load_compressed(compressed),
    "load_processor_or_none": processor,
}
results = {}
for name, run in runs.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = run()
        except upop.CheckpointError as exc:
            code, err = 2, io.StringIO("upop: error: " + str(exc))
        except Exception as exc:  # recorded, so the test names the entry point that failed
            code, err = -1, io.StringIO("Traceback: " + repr(exc))
    results[name] = {"code": code, "err": err.getvalue(), "ran": pathlib.Path(marker).exists()}
print("RESULTS " + json.dumps(results))
"""

# entry point -> (exit code, text its one error line must contain; "" for none)
STDIN_CASES = {
    "compress": (2, NO_CODE),
    "evaluate": (2, NO_CODE),
    "evaluate compressed": (2, NO_CODE),
    "load_compressed": (2, NO_CODE),
    "load_processor_or_none": (0, ""),
}


@pytest.fixture(scope="module")
def with_yes(world, tmp_path_factory):
    """One process runs every entry point on hostile folders, with ``yes`` piped to stdin."""
    root = tmp_path_factory.mktemp("yes")
    for name, source in (("dense", "model"), ("compressed", "compressed")):
        shutil.copytree(world / source, root / name)
        _custom_code(root / name, world)
    _json("tokenizer_config.json", lambda c: c.update(
        auto_map={"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}))(root / "dense", world)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(world / "data"), str(root / "out"), str(root / "dense"),
         str(root / "compressed"), str(root / MARKER)],
        input="yes\n" * 10_000, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = proc.stdout.rsplit("RESULTS ", 1)[1]  # after a prompt, if one was (wrongly) shown
    return root, proc, json.loads(results)


@pytest.mark.parametrize("entry", sorted(STDIN_CASES))
def test_yes_on_stdin_changes_nothing(entry, with_yes):
    root, proc, results = with_yes
    result = results[entry]
    assert not result["ran"], "code from the model folder ran"
    assert "[y/N]" not in proc.stdout + proc.stderr, "transformers' remote-code prompt was reached"
    code, needle = STDIN_CASES[entry]
    assert result["code"] == code and "Traceback" not in result["err"]
    if needle:
        line = _one_line(result["err"])
        assert line.startswith("upop: error: ") and needle in line, line
    assert not (root / "out").exists()
