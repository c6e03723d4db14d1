"""``upop export --part``: the towers of BLIP, LLaVA and SigLIP2 that are one forward export through
the CLI and match PyTorch in ONNX Runtime (checked here again, against the loaded model, independently
of upop.export.onnx); the whole BLIP and LLaVA models, their text towers and SigLIP2's NaFlex vision
tower are refused in one line with exit code 2, leaving no file. Skipped without onnx/onnxruntime."""

from __future__ import annotations

import re

import pytest
import torch

import upop
import upop.export.graph
from upop.arch import CLASSES
from upop.cli.main import main

from ._families import FAMILIES, prune_every_third


def _submodule_towers() -> dict[str, str]:
    """Every registered tiny model whose class exports a tower as a submodule and is refused whole
    (BLIP's four and LLaVA today), with its class: from the registry, so a family added later is here too."""
    from upop.arch import CLASSES, TINY

    return {tiny.name: tiny.model_class for tiny in TINY.values()
            if (info := CLASSES[tiny.model_class][1]).export_refused
            and any(how != "features" for how in info.export.values())}


BLIP = _submodule_towers()
# family -> the words of its one-line reason (upop.export.graph.REFUSED); a family BLIP gains
# later fails below until its reason is written here
REASONS = {"blip-retrieval": "two modes", "blip-vqa": "decoding loop", "blip-caption": "decoding loop",
           "blip-nlvr": "image pairs", "llava": "decoding loop"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One compressed folder per family (every third unit of every group dropped), built once."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("parts")
    out = {}
    for family in (*BLIP, "siglip2"):
        model = FAMILIES[family][0]()
        upop.save_compressed(prune_every_third(model), root / family)
        out[family] = root / family
    return out


def _export(*args):
    return main(["export", "--format", "onnx", *map(str, args)])


def _onnx_run(path, inputs: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})))


def _close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in got.items():
        ref = expected[name]
        assert value.shape == tuple(ref.shape), name
        assert abs(torch.from_numpy(value) - ref).max() <= 1e-4 * max(1.0, float(ref.abs().max())), name


def _diffs(text: str) -> list[float]:
    return [float(d) for d in re.findall(r"max abs diff (\S+) \(", text)]


@pytest.mark.parametrize("family", sorted(BLIP))
def test_blip_vision_tower_exports_and_matches(family, folders, tmp_path, capsys):
    out = tmp_path / "vision.onnx"
    capsys.readouterr()
    assert _export("--model", folders[family], "--out", out, "--part", "vision") == 0
    text = capsys.readouterr().out
    assert f"exported {BLIP[family]} (vision tower)" in text and "dynamo exporter" in text
    assert "pixel_values [batch, 3, 32, 32]; outputs: last_hidden_state, pooler_output" in text
    diffs = _diffs(text)
    assert len(diffs) == 2 and all(0 <= d <= 1e-4 for d in diffs), text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx"]
    # a batch the export never saw, against the compressed model's own vision tower
    model = upop.load_compressed(folders[family])
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tower = CLASSES[BLIP[family]][1].export["vision"]  # the submodule's path the registry declares
    with torch.no_grad():
        ref = model.get_submodule(tower)(pixel_values=pixels)
    _close(_onnx_run(out, {"pixel_values": pixels}),
           {"last_hidden_state": ref.last_hidden_state, "pooler_output": ref.pooler_output})


@pytest.mark.parametrize("part", [None, "text"])
@pytest.mark.parametrize("family", sorted(BLIP))
def test_blip_whole_model_and_text_tower_are_refused(family, part, folders, tmp_path, capsys):
    capsys.readouterr()
    args = ["--model", folders[family], "--out", tmp_path / "m.onnx"] + ([] if part is None else ["--part", part])
    assert _export(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("upop: error:") and err.count("\n") == 1
    assert BLIP[family] in err and REASONS[family] in err
    assert "export its vision tower with --part vision" in err
    assert ("does not export whole" if part is None else "whose text tower upop export does not export") in err
    assert not list(tmp_path.iterdir())


def test_siglip2_text_tower_exports_and_matches(folders, tmp_path, capsys):
    out = tmp_path / "text.onnx"
    capsys.readouterr()
    assert _export("--model", folders["siglip2"], "--out", out, "--part", "text") == 0
    text = capsys.readouterr().out
    assert "exported Siglip2Model (text tower)" in text and "outputs: text_embeds" in text
    diffs = _diffs(text)
    assert len(diffs) == 2 and all(0 <= d <= 1e-4 for d in diffs), text
    model = upop.load_compressed(folders["siglip2"])
    g = torch.Generator().manual_seed(4)
    inputs = {"input_ids": torch.randint(9, 100, (3, 7), generator=g), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    with torch.no_grad():
        x = model.get_text_features(**inputs)
        x = getattr(x, "pooler_output", x)
    _close(_onnx_run(out, inputs), {"text_embeds": x / x.norm(dim=-1, keepdim=True)})


@pytest.mark.parametrize("part", [None, "vision"])
def test_siglip2_vision_tower_is_refused(part, folders, tmp_path, capsys):
    capsys.readouterr()
    args = ["--model", folders["siglip2"], "--out", tmp_path / "m.onnx"] + ([] if part is None else ["--part", part])
    assert _export(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("upop: error:") and err.count("\n") == 1
    assert "NaFlex" in err and "spatial_shapes" in err and "export its text tower with --part text" in err
    assert not list(tmp_path.iterdir())
