"""sentence-transformers folders (``modules.json``): the pipeline's pooling as upop reads it, the
files a compressed folder carries over, the label-free task comparing the pipeline's embeddings,
and (with the library installed) ``SentenceTransformer(compressed, trust_remote_code=True)``
giving upop's embeddings."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

import upop
import upop.models.folders as M
from upop.data.unlabelled import write_unlabelled
from upop.distill.distiller import make_teacher
from upop.errors import CheckpointError, UnsupportedModelError
from upop.models.sentence_transformers import (PIPELINE_FILES, POOLING_MODES, TOKENIZER_FILES, Pooling, read_pipeline)
from upop.tasks import get_task
from upop.tasks.distill import outputs

from ._families import prune_every_third

SENTENCES = ["a red circle", "two blue squares on the left of a green triangle", "green", "a small yellow star"]
LEGACY_TYPE = "sentence_transformers.models."  # what sentence-transformers 2.x-5.x writes in modules.json


def _write_pipeline(folder, modes=("mean",), normalize=True, extra=()):
    """Hand-written sentence-transformers files: Transformer + Pooling(modes) (+ Normalize) (+ extra types)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": LEGACY_TYPE + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": LEGACY_TYPE + "Pooling"}]
    for kind in (*extra, *(("Normalize",) if normalize else ())):
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_{kind}", "type": LEGACY_TYPE + kind})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
              "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
              "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
    config = {"word_embedding_dimension": 32, **{k: m in modes for k, m in legacy.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    for m in modules[2:]:
        (folder / m["path"]).mkdir(exist_ok=True)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"sentence_transformers":
                                                                                          "2.0.0"}}))


def _st_folder(root, **pipeline):
    """A tiny BertModel with the Shapes tokenizer and sentence-transformers files, in ``root``."""
    torch.manual_seed(0)
    transformers.BertModel(M.make_model("bert").config).eval().save_pretrained(root)
    M.make_processor("bert", 32).save_pretrained(root)
    _write_pipeline(root, **pipeline)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _st_folder(tmp_path_factory.mktemp("st") / "base")


@pytest.fixture(scope="module")
def compressed(base, tmp_path_factory):
    """``base`` loaded by upop, pruned and saved with its processor (as a run saves it)."""
    model, processor = M.load_any(base)
    prune_every_third(model)
    out = tmp_path_factory.mktemp("st") / "compressed"
    upop.save_compressed(model, out, processor=processor)
    return out


def _reference(mode: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling, sample by sample over the real tokens (right padding)."""
    rows = []
    for x, m in zip(tokens, mask):
        real = x[: int(m.sum())]
        n = len(real)
        rows.append({"cls": real[0], "max": real.max(0).values, "mean": real.mean(0),
                     "mean_sqrt_len_tokens": real.sum(0) / n ** 0.5, "lasttoken": real[-1],
                     "weightedmean": (real * torch.arange(1, n + 1).unsqueeze(1)).sum(0) / (n * (n + 1) / 2)}[mode])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_equals_a_reference_computed_by_hand(mode):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 6, 5, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5])
    tokens[mask == 0] = 100.0  # padding states must not count
    want = _reference(mode, tokens, mask)
    assert torch.allclose(Pooling((mode,)).embed(tokens, mask), want, atol=1e-5)
    unit = Pooling((mode,), normalize=True).embed(tokens, mask)
    assert torch.allclose(unit, want / want.norm(dim=-1, keepdim=True), atol=1e-5)
    both = Pooling(("cls", mode)).embed(tokens, mask)  # modes concatenate in order
    assert both.shape == (3, 10) and torch.allclose(both[:, 5:], want, atol=1e-5)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_config_is_read_in_both_spellings(mode, tmp_path):
    _write_pipeline(tmp_path, modes=(mode,), normalize=False)
    pipeline = read_pipeline(tmp_path)
    assert pipeline.pooling == Pooling((mode,), normalize=False) and pipeline.max_length == 24
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32,
                                                                    "pooling_mode": ["max", mode]}))
    assert read_pipeline(tmp_path).pooling.modes == ("max", mode)


def test_unsupported_pipelines_fail_in_one_line(tmp_path):
    _write_pipeline(tmp_path, extra=("Dense",))
    with pytest.raises(UnsupportedModelError, match="Dense") as info:
        read_pipeline(tmp_path)
    assert len(str(info.value).splitlines()) == 1
    modules = json.loads((tmp_path / "modules.json").read_text())[:2]
    modules[1]["path"] = "../elsewhere"
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="plain folder name"):
        read_pipeline(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(modules[:1]))
    with pytest.raises(UnsupportedModelError, match="Pooling"):
        read_pipeline(tmp_path)


def test_compressed_folder_carries_the_pipeline(base, compressed):
    for rel in (*PIPELINE_FILES, "1_Pooling/config.json"):
        assert (compressed / rel).read_bytes() == (base / rel).read_bytes(), rel
    for rel in TOKENIZER_FILES:
        assert (compressed / rel).is_file() == (base / rel).is_file(), rel
    assert (compressed / "2_Normalize").is_dir()
    assert read_pipeline(compressed).pooling == read_pipeline(base).pooling == Pooling(("mean",), True)
    upop.load_compressed(compressed)  # the carried modules.json passes upop's own folder checks


def test_no_processor_given_copies_the_pipeline_and_tokenizer_files(base, tmp_path):
    model, _ = M.load_any(base)
    prune_every_third(model)
    upop.save_compressed(model, tmp_path / "out")  # the plan's base model is the folder
    for rel in (*PIPELINE_FILES, "1_Pooling/config.json", *(n for n in TOKENIZER_FILES if (base / n).is_file())):
        assert (tmp_path / "out" / rel).read_bytes() == (base / rel).read_bytes(), rel


def test_unsupported_or_hooked_pipelines_are_not_carried(tmp_path, caplog):
    root = _st_folder(tmp_path / "dense", extra=("Dense",))
    model, processor = M.load_any(root)
    prune_every_third(model)
    with caplog.at_level(logging.WARNING, logger="upop"):
        upop.save_compressed(model, tmp_path / "out", processor=processor)
    assert "Dense" in caplog.text
    assert not (tmp_path / "out" / "modules.json").exists() and not (tmp_path / "out" / "1_Pooling").exists()
    # a code hook in a module's config refuses the save (the base folder itself was loaded before it appeared)
    _write_pipeline(root)
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean", "auto_map": {"x": "y.Z"}}))
    with pytest.raises(CheckpointError, match="auto_map"):
        upop.save_compressed(model, tmp_path / "out2", processor=processor)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sentences") / "data"
    write_unlabelled(root, train=40, val=12, test=12, image_size=32)
    return root


def test_label_free_task_compares_the_pipeline_embeddings(base, data):
    model, processor = M.load_any(base)
    task = get_task("distill")
    task.check_model(model)
    assert task.pooling == Pooling(("mean",), normalize=True)
    splits = task.load_splits(data)
    for split in splits.values():
        task.check_data(model, split)
    task.set_teacher(make_teacher(model))
    batch = task.collator(processor)([splits["train"][i] for i in range(4)])
    assert batch["input_ids"].shape[1] <= 24  # the pipeline's max_seq_length
    with torch.no_grad():
        found = outputs(model, batch, task.pooling)["embeds"]["pooled"]
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    m = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    assert torch.allclose(found, want, atol=1e-6)
    assert not torch.allclose(found, out.pooler_output, atol=1e-2)  # not BERT's tanh pooler
    dense = task.evaluate(model, splits["val"], processor, batch_size=5)
    assert set(dense) == {"cosine", "cosine_pooled", "cosine_tokens", "top1_agreement"}
    assert all(v == pytest.approx(100.0, abs=1e-9) for v in dense.values()), dense
    student, _ = M.load_any(base)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert task.loss(student, batch).item() > 0.01
    moved = task.evaluate(student, splits["val"], processor, batch_size=5)
    assert moved["cosine_pooled"] < 100.0 and 0.0 <= moved["top1_agreement"] <= 100.0
    # a folder without modules.json keeps the model's own pooled output
    plain = get_task("distill")
    plain.check_model(M.make_model("bert"))
    assert plain.pooling is None


def test_label_free_run_writes_a_sentence_transformers_folder(base, data, tmp_path):
    model, processor = M.load_any(base)
    config = upop.UPopConfig(search_epochs=1, retrain_epochs=1, batch_size=8, lr=1e-3, eval_batch_size=16, ratio=0.3,
                             latency_time=0.02)
    result = upop.compress(model, "distill", data, processor=processor, out_dir=tmp_path / "run", config=config,
                           check_images="none", progress=False, log=lambda _: None, base_model=str(base))
    out = tmp_path / "run" / "compressed"
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    assert "top1_agreement" in result.report["compressed"]["metrics"]


def _upop_embeddings(folder, pooling_folder, processor) -> torch.Tensor:
    model = upop.load_compressed(folder) if (folder / "upop_plan.json").is_file() else M.load_any(folder)[0]
    enc = processor(SENTENCES, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    return read_pipeline(pooling_folder).pooling.embed(states, enc["attention_mask"])


def test_sentence_transformers_loads_the_compressed_folder_with_upops_embeddings(base, compressed):
    st = pytest.importorskip("sentence_transformers")
    processor = M.load_any(base)[1]
    for folder, trust in ((base, False), (compressed, True)):
        model = st.SentenceTransformer(str(folder), device="cpu", trust_remote_code=trust)
        got = model.encode(SENTENCES, convert_to_tensor=True)
        want = _upop_embeddings(folder, folder, processor)
        assert torch.allclose(got, want, atol=1e-5), folder
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
