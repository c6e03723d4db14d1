"""SigLIP2: NaFlex vision token costs, the NaFlex processor and collator, the sigmoid retrieval loss
and evaluation with ``pixel_attention_mask`` / ``spatial_shapes``, one ``upop compress`` end to
end, and the ONNX export refusal.

The engine properties (groups, masked == pruned, round trip, Hub folders) of the four SigLIP2
classes run over tests/_families.py (``siglip2``, ``siglip2-vision``, ``siglip2-text``,
``siglip2-classifier``).
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

import upop
import upop.models.folders as M
from upop.arch import vision_tokens
from upop.cli.main import main
from upop.errors import UnsupportedModelError
from upop.tasks import siglip_retrieval
from upop.tasks.retrieval import VARIANTS, RetrievalTask

from ._families import FAMILIES, prune_every_third
from ._forwards import naflex as _naflex


def _batch(index, length=32, seed=0):
    """A SigLIP2 batch of NaFlex images (the second one padded) at the full text length."""
    g = torch.Generator().manual_seed(seed)
    images = _naflex(batch=max(index) + 1, seed=seed)
    pick = torch.tensor(index)
    return {"input_ids": torch.randint(9, 60, (len(index), length), generator=g),
            "attention_mask": torch.ones(len(index), length, dtype=torch.long),
            **{k: v[pick] for k, v in images.items()}, "index": pick}


def test_vision_tokens_are_the_maximum_patch_count():
    model = M.make_model("siglip2")
    vcfg = model.config.vision_config
    assert not hasattr(vcfg, "image_size") and vcfg.num_patches == 16 and vision_tokens(vcfg, 0) == 16
    groups = upop.find_groups(model)
    assert {g.tokens_q for g in groups if g.modality == "vision"} == {16}
    assert {g.tokens_q for g in groups if g.modality == "text"} == {32}
    # costs follow num_patches: a model allowed 4x the patches has 4x the vision MLP FLOPs
    cfg = transformers.Siglip2Config.from_dict(model.config.to_dict())
    cfg.vision_config.num_patches = 64
    bigger = upop.find_groups(transformers.Siglip2Model(cfg))
    mlp = [(a.flop_cost, b.flop_cost) for a, b in zip(groups, bigger) if a.kind == "mlp" and a.modality == "vision"]
    assert mlp and all(b == 4 * a for a, b in mlp)
    # an image_size config is unchanged: (image / patch) ** 2 + extra tokens
    assert vision_tokens(M.make_model("siglip").config.vision_config, 1) == 17


def _images():
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (20, 48), (48, 16), (32, 40)]  # (height, width): other aspect ratios get other grids
    return [PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_processor_and_collator_pass_the_naflex_inputs(tmp_path):
    M.make_model_folder("siglip2", tmp_path / "m", image_size=32)
    model, processor = M.load_any(tmp_path / "m")  # the saved processor reloads offline, PIL backend
    assert type(model).__name__ == "Siglip2Model" and siglip_retrieval.is_naflex(processor)
    collate = RetrievalTask().collator(processor)
    assert isinstance(collate, siglip_retrieval.NaFlexCollator)
    parts = (processor.image_processor, processor.tokenizer)
    assert siglip_retrieval.is_naflex(parts) and siglip_retrieval.is_naflex(dict(zip(("image_processor", "tokenizer"),
                                                                                     parts)))
    assert not siglip_retrieval.is_naflex(M.make_processor("clip", 32))
    assert type(RetrievalTask().collator(M.make_processor("siglip", 32))) is not siglip_retrieval.NaFlexCollator
    samples = [{"image": im, "caption": f"a shape {i}", "index": i} for i, im in enumerate(_images())]
    batch = collate(samples)
    assert batch["pixel_values"].shape == (4, 16, 3 * 8 * 8)
    assert batch["spatial_shapes"].tolist()[0] == [4, 4]
    assert batch["pixel_attention_mask"].sum(1).tolist() == batch["spatial_shapes"].prod(1).tolist()
    assert batch["pixel_attention_mask"].sum(1).min() < 16  # a non-square image is padded
    inputs = RetrievalTask().example_inputs(model, processor, samples, batch_size=2)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "spatial_shapes"}
    with torch.no_grad():
        loss = siglip_retrieval.loss(model, batch)
    assert torch.isfinite(loss)


def test_sigmoid_loss_matches_transformers_and_uses_the_patch_mask():
    assert VARIANTS["Siglip2Model"] is siglip_retrieval and "Siglip2Model" in RetrievalTask.model_classes
    model = M.make_model("siglip2")
    batch = _batch([0, 1])
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_loss=True,
                     **siglip_retrieval.image_inputs(batch)).loss
        got = siglip_retrieval.loss(model, batch)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        # the padded patch of image 1 is masked out: its values change nothing (they would without the mask)
        noisy = dict(batch, pixel_values=batch["pixel_values"].clone())
        noisy["pixel_values"][1, 15] = 5.0
        assert torch.allclose(siglip_retrieval.loss(model, noisy), got, atol=1e-6)
        unmasked = {k: v for k, v in noisy.items() if k != "pixel_attention_mask"}
        assert not torch.allclose(siglip_retrieval.loss(model, unmasked), got, atol=1e-4)


class _Captions:
    """A tiny retrieval evaluation set of images of several aspect ratios."""

    def __init__(self):
        self.images = _images()
        colours = ("red", "green", "blue", "yellow")
        self.captions = [[f"a {c} circle", f"a small {c} square on the left"] for c in colours]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "captions": self.captions[i], "index": i}

    def flat_captions(self):
        texts = [c for cs in self.captions for c in cs]
        return texts, [i for i in range(4) for _ in range(2)], [[2 * i, 2 * i + 1] for i in range(4)]


def test_evaluation_passes_the_naflex_inputs_and_does_not_depend_on_the_batch():
    model, data, processor = M.make_model("siglip2"), _Captions(), M.make_processor("siglip2", 32)
    one = siglip_retrieval.embed(model, data, processor, batch_size=1)
    many = siglip_retrieval.embed(model, data, processor, batch_size=8)
    assert torch.allclose(one[0], many[0], atol=1e-5) and torch.allclose(one[1], many[1], atol=1e-5)
    # the image embeddings are the model's on the processor's full NaFlex inputs
    inputs = processor.image_processor(images=data.images, return_tensors="pt")
    with torch.no_grad():
        want = model.get_image_features(**inputs).pooler_output
    assert torch.allclose(one[0], torch.nn.functional.normalize(want, dim=-1), atol=1e-5)
    metrics = RetrievalTask().evaluate(model, data, processor, batch_size=3)
    assert set(metrics) >= {"txt_r1", "img_r1", "r_mean"} and all(0 <= v <= 100 for v in metrics.values())


@pytest.mark.slow  # CI's second stage; SigLIP2 retrieval also runs in the registry tables
def test_compress_end_to_end_on_shapes_retrieval(tmp_path, capsys):
    assert main(["data", "shapes", "--task", "retrieval", "--out", str(tmp_path / "data"), "--train", "16",
                 "--val", "8", "--test", "8", "--image-size", "32"]) == 0
    assert main(["make-model", "siglip2", "--out", str(tmp_path / "model"), "--size", "tiny", "--image-size", "32"]) == 0
    out = tmp_path / "run"
    assert main(["compress", "--model", str(tmp_path / "model"), "--task", "retrieval", "--data", str(tmp_path / "data"),
                 "--out", str(out), "--ratio", "0.5", "--search-epochs", "1", "--retrain-epochs", "1",
                 "--batch-size", "8", "--eval-batch-size", "8", "--latency-time", "0.02", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert report["compressed"]["flops"] < report["dense"]["flops"]
    assert set(report["compressed"]["metrics"]) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10",
                                                    "r_mean"}
    model = upop.load_compressed(out / "compressed")
    assert type(model).__name__ == "Siglip2Model"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", "retrieval", "--data",
                 str(tmp_path / "data")]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(report["compressed"]["metrics"], abs=1e-9)


@pytest.mark.parametrize("family", ["siglip2", "siglip2-vision", "siglip2-classifier"])
def test_onnx_export_refuses_the_naflex_vision_tower(family, tmp_path):
    import upop.export.onnx

    with pytest.raises(UnsupportedModelError, match="NaFlex") as info:
        upop.export.onnx.export_onnx(FAMILIES[family][0](), tmp_path / "m.onnx")
    assert "\n" not in str(info.value) and "spatial_shapes" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_onnx_export_of_the_text_tower(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import upop.export.onnx

    model = FAMILIES["siglip2-text"][0]()
    prune_every_third(model)
    upop.save_compressed(model, tmp_path / "c")
    result = upop.export.onnx.export_onnx(tmp_path / "c", tmp_path / "m.onnx")
    assert result.model_class == "Siglip2TextModel" and all(p.relative <= 1e-3 for p in result.parity)
    assert "pooler_output" in result.outputs


