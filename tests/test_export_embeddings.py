"""``upop export --pooling``: text encoders export as sentence embedders into a folder that loads the
way optimum's ``ORTModelForFeatureExtraction`` loads its own exports (``config.json`` through
``AutoConfig`` without remote code, the tokenizer from the folder, the session fed by its input
names), and ``sentence_embedding`` equals ``upop.load_compressed`` + the pooling. The text encoders
are read from the registry (every registered class that reads text only, of a family with a tiny
model to build it from); a sentence-transformers folder pools and normalises as its pipeline says.
Refusals are one line, exit code 2, and nothing written; a user's files in --out are never
replaced or deleted. Skipped without onnx/onnxruntime.

optimum itself: its ONNX Runtime classes live in ``optimum-onnx``, whose releases pin
``transformers<4.58`` (this project runs transformers 5), so :func:`test_optimum_loads_the_folder`
runs only where a compatible optimum is installed (docs/sharing.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import upop
import upop.models.folders as M
from upop.arch import CLASSES, TINY
from upop.cli.main import main
from upop.errors import UnsupportedModelError
from upop.export.graph import POOLED_OUTPUTS, text_encoders
from upop.export.onnx import export_onnx
from upop.export.options import MODEL_FILE, POOLINGS
from upop.models.sentence_transformers import POOLING_MODES, Pooling, read_pipeline

from ._families import prune_every_third

SENTENCES = ["a red circle", "two blue squares on the left of a green triangle", "green", "a small yellow star"]
ST_TYPE = "sentence_transformers.models."


@pytest.fixture(scope="module", autouse=True)
def _onnx():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")


def _text_encoder_cases() -> dict[str, tuple[str, str]]:
    """class -> (tiny model, class) over the registry: for every tiny model whose class reads text,
    its class if it reads text only, else every class of its family that reads text only (built
    from the tiny model's ``text_config``)."""
    cases = {}
    for tiny in TINY.values():
        family, info = CLASSES[tiny.model_class]
        if "text" not in info.reads:
            continue
        names = [tiny.model_class] if tuple(info.reads) == ("text",) else \
            [c.name for c in family.classes if tuple(c.reads) == ("text",)]
        for name in names:
            cases.setdefault(name, (tiny.name, name))
    return cases


CASES = _text_encoder_cases()


def _build(tiny: str, name: str):
    """A ``name`` model of ``tiny``'s widths and its tokenizer."""
    processor = M.make_processor(tiny, 32)
    model = M.make_model(tiny)
    if type(model).__name__ != name:
        torch.manual_seed(0)
        model = getattr(transformers, name)(model.config.text_config).eval()
    return model, getattr(processor, "tokenizer", processor)


def _compressed(model, tokenizer, out):
    upop.save_compressed(prune_every_third(model), out, processor=tokenizer)
    return out


def _export(*args) -> int:
    return main(["export", "--format", "onnx", *map(str, args)])


def _as_optimum(folder):
    """What ORTModelForFeatureExtraction does with ``folder``: the config through AutoConfig (no
    remote code), the tokenizer of the folder, the session fed by its input names (zeros for
    token types the tokenizer does not give); the outputs by name, and the encoding."""
    import onnxruntime as ort

    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    got, feed = _run(session, enc)
    return config, got, feed


def _run(session, enc) -> tuple[dict, dict]:
    """``session``'s outputs by name, fed its inputs by name from the encoding ``enc`` (numpy
    arrays; zeros for token types it does not give), and that feed as tensors."""
    feed = {i.name: np.asarray(enc[i.name] if i.name in enc else np.zeros_like(enc["input_ids"]), dtype=np.int64)
            for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed))), {k: torch.from_numpy(v) for k, v in feed.items()}


def _upop_embedding(folder, feed: dict, pooling: Pooling):
    """``upop.load_compressed(folder)``'s token states and their pooling, computed here from the
    loaded model (the base encoder of a head)."""
    model = upop.load_compressed(folder)
    with torch.no_grad():
        states = model.base_model(**feed).last_hidden_state
    return states, pooling.embed(states, feed["attention_mask"])


def test_choices_are_the_library_modes():
    assert POOLINGS == ("auto", "none", *POOLING_MODES)
    assert set(text_encoders()) == {n for n, (_, info) in CLASSES.items() if tuple(info.reads) == ("text",)}
    assert set(CASES) <= set(text_encoders()) and CASES  # every case is one --pooling accepts


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if i == 0 else pytest.mark.slow)  # CI's second stage
                                  for i, n in enumerate(sorted(CASES))])
def test_text_encoders_export_a_mean_pooled_embedding(name, tmp_path):
    tiny, cls = CASES[name]
    folder = _compressed(*_build(tiny, cls), tmp_path / "compressed")
    out = tmp_path / "onnx"
    assert _export("--model", folder, "--out", out, "--pooling", "auto") == 0
    config, got, feed = _as_optimum(out)
    assert not config.model_type.startswith("upop_") and config.model_type == transformers.AutoConfig.for_model(
        config.model_type).model_type
    raw = json.loads((out / "config.json").read_text())
    assert "auto_map" not in raw and "upop_shapes" not in raw
    assert list(got) == list(POOLED_OUTPUTS)
    assert feed["attention_mask"].min() == 0  # padding present: the mask is used
    states, want = _upop_embedding(folder, feed, Pooling(("mean",)))  # auto without modules.json: mean
    assert np.allclose(got["last_hidden_state"], states.numpy(), atol=1e-4)
    assert np.allclose(got["sentence_embedding"], want.numpy(), atol=1e-4)
    assert not np.allclose(got["sentence_embedding"], states[:, 0].numpy(), atol=1e-3)  # not the first token


def _st_folder(root, modes=("max",)):
    """A tiny BertModel with the Shapes tokenizer and a sentence-transformers pipeline Transformer ->
    Pooling(modes) -> Normalize, written here."""
    torch.manual_seed(0)
    transformers.BertModel(M.make_model("bert").config).eval().save_pretrained(root)
    M.make_processor("bert", 32).save_pretrained(root)
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TYPE + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_TYPE + "Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_TYPE + "Normalize"}]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode": list(modes)}))
    (root / "2_Normalize").mkdir()
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (root / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"sentence_transformers":
                                                                                          "5.0.0"}}))
    return root


def test_sentence_transformers_folder_pools_and_normalises_as_its_pipeline(tmp_path):
    base = _st_folder(tmp_path / "base")
    model, processor = M.load_any(base)
    folder = tmp_path / "compressed"
    upop.save_compressed(prune_every_third(model), folder, processor=processor)
    out = tmp_path / "onnx"
    assert _export("--model", folder, "--out", out, "--pooling", "auto") == 0
    for rel in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                "config_sentence_transformers.json"):
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel
    assert (out / "2_Normalize").is_dir()
    pooling = read_pipeline(out).pooling
    assert pooling == Pooling(("max",), normalize=True)
    _, got, feed = _as_optimum(out)
    states, want = _upop_embedding(folder, feed, pooling)
    assert np.allclose(got["sentence_embedding"], want.numpy(), atol=1e-4)
    assert np.allclose(np.linalg.norm(got["sentence_embedding"], axis=-1), 1.0, atol=1e-5)
    plain = Pooling(("mean",)).embed(states, feed["attention_mask"])
    assert not np.allclose(got["sentence_embedding"], torch.nn.functional.normalize(plain, dim=-1).numpy(), atol=1e-3)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A compressed tiny BERT head folder (from the registry's text tiny model)."""
    tiny, cls = next(c for c in CASES.values() if c[1] == TINY[c[0]].model_class)
    return _compressed(*_build(tiny, cls), tmp_path_factory.mktemp("bert") / "compressed")


#: every mode, concatenated in one graph as sentence-transformers concatenates several (the pooling
#: indexes the batch by ``tokens.shape[0]``, so the batch stays dynamic for cls and lasttoken too)
MODE_GROUPS = [pytest.param(tuple(POOLING_MODES), id="every-mode")]


@pytest.mark.parametrize("modes", MODE_GROUPS)
def test_pooling_modes_export(modes, bert, tmp_path):
    """The modes, concatenated in one graph (the Python API takes a Pooling), match Pooling.embed."""
    import onnxruntime as ort

    pooling = Pooling(modes, normalize=False)
    result = export_onnx(bert, tmp_path / "modes.onnx", pooling=pooling)
    assert result.folder is None and sorted(p.name for p in tmp_path.iterdir()) == ["modes.onnx"]
    tokenizer = M.load_any(bert)[1]
    enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
    got, feed = _run(ort.InferenceSession(str(tmp_path / "modes.onnx"), providers=["CPUExecutionProvider"]), enc)
    _, want = _upop_embedding(bert, feed, pooling)
    assert got["sentence_embedding"].shape[1] == len(modes) * got["last_hidden_state"].shape[2]
    assert np.allclose(got["sentence_embedding"], want.numpy(), atol=1e-4)


def test_a_mode_by_name_and_the_users_files(bert, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / MODEL_FILE).write_text("an older export")
    capsys.readouterr()
    assert _export("--model", bert, "--out", out, "--pooling", "weightedmean") == 2  # a folder with files
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert (out / MODEL_FILE).read_text() == "an older export"
    assert _export("--model", bert, "--out", out, "--pooling", "weightedmean", "--overwrite") == 0
    assert "weightedmean (--pooling weightedmean)" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine"  # never touched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    _, got, feed = _as_optimum(out)
    _, want = _upop_embedding(bert, feed, Pooling(("weightedmean",)))
    assert np.allclose(got["sentence_embedding"], want.numpy(), atol=1e-4)


def test_folder_outs_that_cannot_be_written_are_refused(bert, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for out, needle in ((tmp_path / "a-file", "is not a folder"), (tmp_path / "link", "symbolic link"),
                        (tmp_path / "missing" / "onnx", "does not exist")):
        capsys.readouterr()
        assert _export("--model", bert, "--out", out, "--pooling", "auto") == 2, out
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert (tmp_path / "a-file").read_text() == "mine" and not any((tmp_path / "elsewhere").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "elsewhere", "link"]


def test_a_pipeline_upop_cannot_pool_is_refused_by_auto(tmp_path, capsys):
    base = _st_folder(tmp_path / "base")
    modules = json.loads((base / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": ST_TYPE + "Dense"})
    (base / "modules.json").write_text(json.dumps(modules))
    capsys.readouterr()
    assert _export("--model", base, "--out", tmp_path / "onnx", "--pooling", "auto") == 2
    err = capsys.readouterr().err
    assert "Dense" in err and err.count("\n") == 1
    assert not (tmp_path / "onnx").exists()


def _other_tinies() -> list[str]:
    """Every registered tiny model whose class is no text encoder."""
    return [t.name for t in TINY.values() if t.model_class not in text_encoders()]


@pytest.mark.parametrize("tiny", _other_tinies())
def test_a_mode_on_a_class_without_token_states_to_pool_is_refused(tiny, tmp_path, capsys):
    model = M.make_model(tiny)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    capsys.readouterr()
    assert _export("--model", folder, "--out", tmp_path / "onnx", "--pooling", "mean") == 2
    err = capsys.readouterr().err
    assert err.startswith("upop: error:") and err.count("\n") == 1
    assert type(model).__name__ in err and "text encoder" in err and all(n in err for n in text_encoders())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_pooling_with_a_tower_part_is_refused(tmp_path, capsys):
    tiny = next(t for t in TINY.values() if CLASSES[t.model_class][1].export.get("text") == "features")
    folder = tmp_path / "model"
    M.make_model(tiny.name).save_pretrained(folder)
    capsys.readouterr()
    assert _export("--model", folder, "--out", tmp_path / "onnx", "--part", "text", "--pooling", "mean") == 2
    err = capsys.readouterr().err
    assert "--part text" in err and tiny.model_class in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_auto_on_an_image_model_exports_its_own_outputs(tmp_path):
    tiny = next(t for t in TINY.values() if tuple(CLASSES[t.model_class][1].reads) == ("image",)
                and CLASSES[t.model_class][1].export_refused is None)
    folder = tmp_path / "model"
    M.make_model(tiny.name).save_pretrained(folder)
    result = export_onnx(folder, tmp_path / "onnx", pooling="auto", exporter="torchscript", batch=1)
    assert result.pooling is None and "sentence_embedding" not in result.outputs
    assert {"model.onnx", "config.json"} <= set(result.files)
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "onnx")).model_type == \
        json.loads((folder / "config.json").read_text())["model_type"]


def test_optimum_loads_the_folder(bert, tmp_path):
    """optimum's own class, where an optimum with ONNX Runtime support installs (see the module docstring)."""
    onnxruntime = pytest.importorskip("optimum.onnxruntime")
    out = tmp_path / "onnx"
    assert _export("--model", bert, "--out", out, "--pooling", "auto") == 0
    model = onnxruntime.ORTModelForFeatureExtraction.from_pretrained(str(out))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    got = model(**enc)
    states, _ = _upop_embedding(bert, dict(enc), Pooling(("mean",)))
    assert torch.allclose(torch.as_tensor(got.last_hidden_state), states, atol=1e-4)
