"""Bad input, everywhere: one table of user mistakes across the CLI and the API.

Each must give ONE line naming the problem (CLI: ``upop: error: ...`` and exit code 2; API: a
typed ``UPopError``) and leave no partial output behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import upop
from upop.cli import main

from ._families import clip_world

TINY = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "8", "--no-progress", "--latency-time", "0.02"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = clip_world(tmp_path_factory.mktemp("bad"), 32, 8, 8)
    import transformers

    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8))
    vit.save_pretrained(root / "vit")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "model" / name, root / "vit" / name)
    # a compressed checkpoint to tamper with
    model, _ = upop.load_model(root / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:3] = 0
    upop.prune(model, masks)
    upop.save_compressed(model, root / "compressed")
    return root


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _data(world, tmp, edit) -> str:
    data = tmp / "data"
    shutil.copytree(world / "data", data)
    edit(data)
    return str(data)


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _tampered(world, tmp) -> str:
    ckpt = tmp / "ckpt"
    shutil.copytree(world / "compressed", ckpt)
    plan = json.loads((ckpt / "upop_plan.json").read_text())
    next(iter(plan["groups"].values()))["kept"].append(999)
    (ckpt / "upop_plan.json").write_text(json.dumps(plan))
    return str(ckpt)


def _val_json(text: str):
    return lambda d: _write(d / "val.json", text)


# case -> (argument override builder, text the one-line message must contain)
CLI = {
    "ratio above 1": (lambda w, t: ["--ratio", "1.5"], "ratio=1.5"),
    "ratio zero": (lambda w, t: ["--ratio", "0"], "ratio=0.0"),
    "ratio not a number": (lambda w, t: ["--ratio", "nan"], "ratio=nan"),
    "learning rate infinite": (lambda w, t: ["--lr", "inf"], "lr=inf"),
    "zero search epochs": (lambda w, t: ["--search-epochs", "0"], "search_epochs=0"),
    "negative retrain epochs": (lambda w, t: ["--retrain-epochs", "-1"], "retrain_epochs=-1"),
    "zero interval": (lambda w, t: ["--interval", "0"], "interval=0"),
    "negative workers": (lambda w, t: ["--workers", "-1"], "workers=-1"),
    "ratio not numeric": (lambda w, t: ["--ratio", "half"], "half"),
    "unknown method": (lambda w, t: ["--method", "magic"], "magic"),
    "unknown cost": (lambda w, t: ["--cost", "watts"], "watts"),
    "unknown task": (lambda w, t: ["--task", "juggling"], "juggling"),
    "missing data folder": (lambda w, t: ["--data", str(t / "nope")], "nope"),
    "empty data folder": (lambda w, t: ["--data", str(_write(t / "empty" / ".keep", "").parent)], "empty"),
    "annotation not JSON": (lambda w, t: ["--data", _data(w, t, _val_json("[{"))], "val.json"),
    "annotation without caption": (lambda w, t: ["--data", _data(w, t, _val_json('[{"image": "images/val_00000.png"}]'))], "val.json"),
    "empty caption list": (lambda w, t: ["--data", _data(w, t, _val_json('[{"image": "images/val_00000.png", "caption": []}]'))], "val.json"),
    "annotation names a missing image": (lambda w, t: ["--data", _data(w, t, _val_json('[{"image": "images/gone.png", "caption": ["a red circle"]}]'))], "gone.png"),
    "corrupt image": (lambda w, t: ["--data", _data(w, t, lambda d: _write(d / "images" / "test_00001.png", b"garbage"))], "test_00001.png"),
    "truncated image": (lambda w, t: ["--data", _data(w, t, lambda d: _truncate(d / "images" / "test_00002.png"))], "test_00002.png"),
    "missing model folder": (lambda w, t: ["--model", str(t / "no-model")], "no-model"),
    "task the model cannot do": (lambda w, t: ["--model", str(w / "vit")], "ViTForImageClassification"),
    "config file missing": (lambda w, t: ["--config", str(t / "none.yaml")], "none.yaml"),
    "config file not YAML": (lambda w, t: ["--config", str(_write(t / "c.yaml", "ratio: [1,"))], "c.yaml"),
    "config file unknown key": (lambda w, t: ["--config", str(_write(t / "c.yaml", "ratoi: 0.5\n"))], "ratoi"),
    "config file bad value": (lambda w, t: ["--config", str(_write(t / "c.yaml", "batch_size: 0\n"))], "batch_size=0"),
}

EVALUATE = {
    "tampered checkpoint": (lambda w, t: _tampered(w, t), "outside"),
    "not a model folder": (lambda w, t: str(_write(t / "x" / "notes.txt", "hi").parent), "x"),
}


def _api_compress_without_processor(w, t):
    model, _ = upop.load_model(w / "model")
    upop.compress(model, "retrieval", w / "data", out_dir=t / "out", progress=False)


def _compress_into(w, out):
    model, processor = upop.load_model(w / "model")
    upop.compress(model, "retrieval", w / "data", processor=processor, out_dir=out, progress=False,
                  config=upop.UPopConfig(search_epochs=1, retrain_epochs=0, batch_size=8))


API = {
    "output folder not writable": (lambda w, t: _compress_into(w, _write(t / "file", "x") / "out"), upop.ConfigError,
                                   "cannot be created"),
    "config ratio out of range": (lambda w, t: upop.UPopConfig(ratio=1.2), upop.ConfigError, "ratio=1.2"),
    "config batch size zero": (lambda w, t: upop.UPopConfig(batch_size=0), upop.ConfigError, "batch_size=0"),
    "unsupported model": (
        lambda w, t: upop.find_groups(__import__("transformers").GPT2Model(__import__("transformers").GPT2Config(n_layer=1, n_embd=16, n_head=2))),
        upop.UnsupportedModelError, "gpt2"),
    "load a missing checkpoint": (lambda w, t: upop.load_compressed(t / "nothing"), upop.CheckpointError, "nothing"),
    "compress without processor": (_api_compress_without_processor, upop.ConfigError, "processor"),
    "unknown task": (lambda w, t: upop.compress(upop.load_model(w / "model")[0], "juggling", w / "data"), upop.TaskError, "juggling"),
}


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case", sorted(CLI))
def test_cli_compress(case, world, tmp_path, capsys):
    make, needle = CLI[case]
    extra = make(world, tmp_path)
    base = {"--model": str(world / "model"), "--task": "retrieval", "--data": str(world / "data"),
            "--out": str(tmp_path / "out")}
    argv = ["compress", *[x for k, v in base.items() if k not in extra for x in (k, v)], *TINY, *extra]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("upop: error:") and needle in line, line
    assert not (tmp_path / "out").exists(), "a rejected run leaves no output behind"


@pytest.mark.parametrize("case", sorted(EVALUATE))
def test_cli_evaluate(case, world, tmp_path, capsys):
    make, needle = EVALUATE[case]
    capsys.readouterr()
    code = main(["evaluate", "--model", make(world, tmp_path), "--task", "retrieval", "--data", str(world / "data")])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("upop: error:") and needle in line, line


@pytest.mark.parametrize("case", sorted(API))
def test_api(case, world, tmp_path):
    call, error, needle = API[case]
    with pytest.raises(error) as info:
        call(world, tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_table_is_large_enough():
    assert len(CLI) + len(EVALUATE) + len(API) >= 20


def test_full_disk_is_reported_before_training(world, tmp_path, monkeypatch):
    import collections
    import shutil as shutil_module

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(upop.ConfigError, match="MiB free") as info:
        _compress_into(world, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
