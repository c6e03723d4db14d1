"""``upop export --format onnx``: every family with an ONNX graph exports (dynamo) from a
compressed folder and matches PyTorch in ONNX Runtime; bad options are one-line errors with exit
code 2 and leave no file; --dense times both models. Skipped without onnx/onnxruntime."""

from __future__ import annotations

import sys

import pytest
import torch

import upop
import upop.export.onnx
from upop.cli.main import main
from upop.errors import ConfigError, UnsupportedModelError

from ._families import FAMILIES, prune_every_third


@pytest.fixture
def ort():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")




def _compressed(family: str, root, dense: bool = False):
    """A compressed folder of ``family`` (tests/_families.py) under ``root``; with ``dense`` also the
    dense folder it was pruned from."""
    model = FAMILIES[family][0]()
    if dense:
        model.save_pretrained(root / "dense")
    upop.save_compressed(prune_every_third(model), root / "compressed")
    return root / "compressed"


def _cases() -> dict[str, tuple[str, str | None]]:
    """case -> (tests/_families.py row, --part), over the registry: every registered tiny model
    whose class exports whole (``ModelClass.export_refused`` is None), and each of its towers
    exported through ``get_*_features`` (towers exported as a submodule: tests/test_export_parts.py)."""
    from upop.arch import CLASSES, TINY

    from ._families import row_of

    cases = {}
    for tiny in TINY.values():
        info = CLASSES[tiny.model_class][1]
        if info.export_refused is None:
            cases[tiny.name] = (row_of(tiny.name), None)
        for part, how in info.export.items():
            if how == "features":
                cases[f"{tiny.name}-{part}-tower"] = (row_of(tiny.name), part)
    return cases


CASES = _cases()


def _params() -> list:
    """The cases as pytest params: those of the first exported tiny model of each data task in the
    default suite, the others (the same guarantee for the task's other families) in CI's second stage."""
    from upop.arch import TINY

    tiny_of = {case: next(name for name in sorted(TINY, key=len, reverse=True) if case == name or
                          case.startswith(name + "-")) for case in CASES}
    first: dict[str, str] = {}
    for tiny in TINY.values():
        if tiny.name in tiny_of.values():
            first.setdefault(tiny.data_task, tiny.name)
    fast = set(first.values())
    return [pytest.param(case, marks=[] if tiny_of[case] in fast else [pytest.mark.slow]) for case in sorted(CASES)]


def _reference(model, part, inputs):
    """The outputs PyTorch gives, by ONNX output name, computed here independently of upop.export.onnx."""
    with torch.no_grad():
        if part is not None:
            get = model.get_image_features if part == "vision" else model.get_text_features
            x = get(**inputs)
            x = getattr(x, "pooler_output", x)
            return {f"{'image' if part == 'vision' else 'text'}_embeds": x / x.norm(dim=-1, keepdim=True)}
        out = model(**inputs)
        return {k: v for k, v in out.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("case", _params())
def test_compressed_model_exports_and_matches(case, ort, tmp_path):
    import onnx

    family, part = CASES[case]
    folder = _compressed(family, tmp_path)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    result = upop.export.onnx.export_onnx(folder, out, part=part)
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert [p.batch for p in result.parity] == [2, 3] and all(p.relative <= 1e-3 for p in result.parity)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp, no external data left
    graph = onnx.load(str(out)).graph
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.input)  # the batch axis is dynamic
    # a third batch size and another sequence length, every row unpadded, against the loaded model
    model = upop.load_compressed(folder)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(7)
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32, generator=g), "input_ids": torch.randint(9, 100, (1, 9), generator=g),
              "attention_mask": torch.ones(1, 9, dtype=torch.long), "token_type_ids": torch.zeros(1, 9, dtype=torch.long)}
    inputs = {k: v for k, v in inputs.items() if k in names}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {k: v.numpy() for k, v in inputs.items()})))
    expected = _reference(model, part, inputs)
    assert got.keys() == set(result.outputs) and set(got) <= set(expected)
    for name, value in got.items():
        assert value.shape == tuple(expected[name].shape)
        assert abs(torch.from_numpy(value) - expected[name]).max() <= 1e-4 * max(1.0, float(expected[name].abs().max()))


def _export(*args):
    return main(["export", "--format", "onnx", *map(str, args)])


def test_cli_writes_once_and_replaces_only_with_overwrite(ort, tmp_path, capsys):
    folder = _compressed("vit", tmp_path)
    out = tmp_path / "vit.onnx"
    assert _export("--model", folder, "--out", out, "--exporter", "torchscript", "--batch", "1") == 0
    text = capsys.readouterr().out
    assert "TorchScript exporter" in text and "batch 1: max abs diff" in text and "batch 2: max abs diff" in text
    assert "pixel_values [batch, 3, 32, 32]" in text
    first = out.read_bytes()
    assert _export("--model", folder, "--out", out, "--exporter", "torchscript") == 2
    err = capsys.readouterr().err
    assert err.startswith("upop: error:") and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == first
    assert _export("--model", folder, "--out", out, "--exporter", "torchscript", "--overwrite", "--opset", "17") == 0
    assert "opset 17" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed", "vit.onnx"]


ERRORS = {
    "--part on a one-tower model": (lambda f, t: ["--model", f, "--out", t / "m.onnx", "--part", "vision"],
                                    "two-tower"),
    "batch 0": (lambda f, t: ["--model", f, "--out", t / "m.onnx", "--batch", "0"], "batch 0"),
    "tolerance 0": (lambda f, t: ["--model", f, "--out", t / "m.onnx", "--tolerance", "0"], "tolerance 0"),
    "opset too high": (lambda f, t: ["--model", f, "--out", t / "m.onnx", "--opset", "999"], "opset 999"),
    "out in a missing folder": (lambda f, t: ["--model", f, "--out", t / "nope" / "m.onnx"], "does not exist"),
    "out is a folder": (lambda f, t: ["--model", f, "--out", t], "is a folder"),
    "dense of another class": (lambda f, t: ["--model", f, "--out", t / "m.onnx", "--dense", t / "bert" / "dense"],
                               "BertForSequenceClassification"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_options_are_one_line_errors(name, ort, tmp_path, capsys):
    folder = _compressed("vit", tmp_path / "vit")
    if "dense" in name:
        _compressed("bert", tmp_path / "bert", dense=True)
    args, needle = ERRORS[name]
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert _export(*args(folder, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("upop: error:") and needle in err and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("family", ["blip-retrieval", "blip-caption"])
def test_blip_is_refused_with_the_reason(family, ort, tmp_path):
    model = FAMILIES[family][0]()
    with pytest.raises(UnsupportedModelError, match="does not export whole") as info:
        upop.export.onnx.export_onnx(model, tmp_path / "m.onnx")
    assert "\n" not in str(info.value) and "export its vision tower with --part vision" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_parity_failure_keeps_no_file(ort, tmp_path, monkeypatch, capsys):
    folder = _compressed("vit", tmp_path)
    real = upop.export.onnx.ort_outputs
    monkeypatch.setattr(upop.export.onnx, "ort_outputs", lambda s, i: [o + 0.01 for o in real(s, i)])
    capsys.readouterr()
    assert _export("--model", folder, "--out", tmp_path / "m.onnx", "--exporter", "torchscript") == 2
    err = capsys.readouterr().err
    assert "differs from PyTorch by up to 0.01" in err and "not kept" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed"]
    # a looser tolerance accepts the same difference
    assert _export("--model", folder, "--out", tmp_path / "m.onnx", "--exporter", "torchscript",
                   "--tolerance", "0.02") == 0


def test_dynamo_failure_falls_back_to_torchscript(ort, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no torch.export today\nsecond line")

    monkeypatch.setattr(upop.export.onnx, "_export_dynamo", broken)
    result = upop.export.onnx.export_onnx(_compressed("vit", tmp_path), tmp_path / "m.onnx")
    assert result.exporter == "torchscript"
    assert result.fallback_reason == "RuntimeError: no torch.export today"
    assert "after the dynamo exporter failed: RuntimeError: no torch.export today" in result.summary()
    with pytest.raises(UnsupportedModelError, match="dynamo: RuntimeError: no torch.export today"):
        upop.export.onnx.export_onnx(_compressed("vit", tmp_path), tmp_path / "n.onnx", exporter="dynamo")
    assert not (tmp_path / "n.onnx").exists()


def test_dense_and_compressed_timed_in_the_same_run(ort, tmp_path, capsys):
    folder = _compressed("vit", tmp_path, dense=True)
    out = tmp_path / "vit.onnx"
    assert _export("--model", folder, "--out", out, "--dense", tmp_path / "dense", "--exporter", "torchscript",
                   "--latency-time", "0.02") == 0
    text = capsys.readouterr().out
    assert "dense export parity: batch 2" in text and "speedup" in text and "7 interleaved rounds" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed", "dense", "vit.onnx"]  # dense export not kept
    result = upop.export.onnx.export_onnx(folder, tmp_path / "again.onnx", dense=tmp_path / "dense",
                                     exporter="torchscript", latency_time=0.02)
    lat = result.latency
    assert lat["rounds"] == 7 and len(lat["dense_ms_per_round"]) == len(lat["compressed_ms_per_round"]) == 7
    assert lat["dense_ms"] > 0 and lat["compressed_ms"] > 0
    assert lat["speedup"] == pytest.approx(sorted(d / c for d, c in zip(lat["dense_ms_per_round"],
                                                                       lat["compressed_ms_per_round"]))[3])
    assert [p.batch for p in result.dense_parity] == [2, 3]


def test_without_onnx_the_install_command_is_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert _export("--model", tmp_path, "--out", tmp_path / "m.onnx") == 2
    err = capsys.readouterr().err
    assert 'pip install "upop[onnx]"' in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="onnxruntime"):
        upop.export.onnx.export_onnx(tmp_path, tmp_path / "m.onnx")


def test_exporting_a_module_leaves_the_callers_model_as_it_was(ort, tmp_path):
    """A model in bf16 and in training mode (as after training on a GPU): the export works on a
    float32 CPU copy; the caller's model keeps its dtype, device and mode."""
    model = prune_every_third(FAMILIES["vit"][0]()).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = upop.export.onnx.export_onnx(model, tmp_path / "vit.onnx")
    assert all(p.relative <= 1e-3 for p in result.parity)
    assert model.training and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
