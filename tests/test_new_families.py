"""SigLIP's sigmoid retrieval loss and evaluation, DINOv2 classification and its SwiGLU refusal.

The engine properties (masked == pruned, round trip, costs) of both families run in
test_engine.py over tests/_families.py.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch

import upop

import upop.models.folders as M
from upop.errors import UnsupportedModelError
from upop.tasks import siglip_retrieval
from upop.tasks.classification import ClassificationTask
from upop.tasks.retrieval import VARIANTS, RetrievalTask

from ._forwards import pixels as _pixels


def _batch(index, length=32, seed=0):
    """A SigLIP batch at the full text length (no padding added by the loss)."""
    g = torch.Generator().manual_seed(seed)
    n = len(index)
    images = _pixels(batch=max(index) + 1, seed=seed)
    return {"input_ids": torch.randint(9, 60, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "pixel_values": images[torch.tensor(index)], "index": torch.tensor(index)}


def test_sigmoid_loss_matches_transformers_on_distinct_images():
    model = M.make_model("siglip")
    batch = _batch([0, 1, 2])
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], return_loss=True).loss
        got = siglip_retrieval.loss(model, batch)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sigmoid_loss_counts_captions_of_one_image_as_positives():
    model = M.make_model("siglip")
    index = [0, 0, 1]  # two captions of image 0
    batch = _batch(index, seed=1)
    with torch.no_grad():
        got = float(siglip_retrieval.loss(model, batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits_per_text.tolist()
    hand = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if index[i] == index[j] else -1.0
            hand -= math.log(1.0 / (1.0 + math.exp(-z * logits[i][j])))
    assert got == pytest.approx(hand / 3, rel=1e-5)
    # the diagonal-only loss (transformers') differs: caption 1 / image 0 is a positive here
    assert got != pytest.approx(float(siglip_retrieval.sigmoid_loss(torch.tensor(logits))), rel=1e-4)


def test_sigmoid_loss_does_not_depend_on_the_batch_padding():
    """SigLIP pools the last token: the loss pads every caption to the fixed length, so extra
    padding of the batch (``padding="longest"`` with a longer caption) changes nothing."""
    model = M.make_model("siglip")
    batch = _batch([0, 1], length=6)
    batch["attention_mask"][0, 4:] = 0
    ids, mask = siglip_retrieval.fixed_length(model, batch["input_ids"], batch["attention_mask"])
    assert ids.shape == (2, 32) and mask.sum(dim=1).tolist() == [4, 6]
    longer = dict(batch, input_ids=torch.nn.functional.pad(batch["input_ids"], (0, 5)),
                  attention_mask=torch.nn.functional.pad(batch["attention_mask"], (0, 5)))
    with torch.no_grad():
        assert torch.allclose(siglip_retrieval.loss(model, batch), siglip_retrieval.loss(model, longer), atol=1e-6)


class _Captions:
    """A tiny retrieval evaluation set: per-image samples and flattened captions."""

    def __init__(self, n=4):
        rng = np.random.default_rng(0)
        self.images = [PIL.Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
        colours = ("red", "green", "blue", "yellow")
        self.captions = [[f"a {colours[i % 4]} circle", f"a small {colours[i % 4]} square on the left"]
                         for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "captions": self.captions[i], "index": i}

    def flat_captions(self):
        texts = [c for cs in self.captions for c in cs]
        txt2img = [i for i, cs in enumerate(self.captions) for _ in cs]
        img2txt = [[2 * i, 2 * i + 1] for i in range(len(self.captions))]
        return texts, txt2img, img2txt


def test_siglip_retrieval_evaluation_does_not_depend_on_the_batch():
    assert VARIANTS["SiglipModel"] is siglip_retrieval and "SiglipModel" in RetrievalTask.model_classes
    model, data = M.make_model("siglip"), _Captions()
    processor = M.make_processor("siglip", 32)
    one = siglip_retrieval.embed(model, data, processor, batch_size=1)
    many = siglip_retrieval.embed(model, data, processor, batch_size=8)
    assert torch.allclose(one[1], many[1], atol=1e-5) and torch.allclose(one[0], many[0], atol=1e-5)
    metrics = RetrievalTask().evaluate(model, data, processor, batch_size=3)
    assert set(metrics) >= {"txt_r1", "img_r1", "r_mean"} and all(0 <= v <= 100 for v in metrics.values())


def test_dinov2_classification_loss_and_swiglu_refusal():
    model = M.make_model("dinov2")
    assert type(model).__name__ in ClassificationTask.model_classes
    loss = ClassificationTask().loss(model, {"pixel_values": _pixels(), "labels": torch.tensor([1, 3])})
    assert torch.isfinite(loss) and loss.requires_grad
    from upop.arch import dinov2

    dinov2.check_model(model)  # the standard MLP is accepted
    model.config.use_swiglu_ffn = True
    with pytest.raises(UnsupportedModelError, match="use_swiglu_ffn"):
        upop.find_groups(model)  # what attach_masks and a run call first: one clear line, not an AttributeError


def test_siglip_classifier_compresses_through_the_cli(tmp_path, capsys):
    """A SiglipForImageClassification (a SigLIP vision tower with a linear head, as fine-tuned
    SigLIP classifiers are) compresses with --task classification, reloads and evaluates to the
    report's numbers; SigLIP2's NaFlex classifier is refused in one line."""
    import json

    import transformers

    from upop.cli.main import main

    assert main(["data", "shapes", "--task", "classification", "--out", str(tmp_path / "data"), "--train", "20",
                 "--val", "10", "--test", "10", "--image-size", "32"]) == 0
    for family, cls in (("siglip", transformers.SiglipForImageClassification),
                        ("siglip2", transformers.Siglip2ForImageClassification)):
        base = M.make_model(family, image_size=32)
        cfg = type(base.config)(vision_config=base.config.vision_config.to_dict(),
                                text_config=base.config.text_config.to_dict(),
                                id2label={i: f"c{i}" for i in range(10)}, label2id={f"c{i}": i for i in range(10)})
        cls(cfg).save_pretrained(tmp_path / family)
        M.make_processor(family, 32).save_pretrained(tmp_path / family)
    capsys.readouterr()
    args = ["--task", "classification", "--data", str(tmp_path / "data"), "--ratio", "0.3", "--search-epochs", "1",
            "--retrain-epochs", "1", "--batch-size", "8", "--eval-batch-size", "16", "--no-progress",
            "--latency-time", "0.01"]
    assert main(["compress", "--model", str(tmp_path / "siglip2"), "--out", str(tmp_path / "run2"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Siglip2ForImageClassification" in err[0] and not (tmp_path / "run2").exists()
    assert main(["compress", "--model", str(tmp_path / "siglip"), "--out", str(tmp_path / "run"), *args]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["compressed"]["params"] < report["dense"]["params"]
    model = upop.load_compressed(tmp_path / "run" / "compressed")
    assert type(model).__name__ == "SiglipForImageClassification"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "run" / "compressed"), "--task", "classification",
                 "--data", str(tmp_path / "data")]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(report["compressed"]["metrics"], abs=1e-9)
