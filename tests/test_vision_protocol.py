"""The vision tasks' training augmentation (DeiT; mmseg for segmentation) and Segmenter's
sliding-window evaluation at the original resolution, on tiny images and fake models."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from upop.data.ade20k import SegmentationCollator
from upop.data.augment import (center_crop_eval, draw_mix, normalize, padded_random_crop, random_resized_crop,
                               soft_targets)
from upop.data.augment_batch import augment_batch, mix
from upop.data.imagefolder import ImageClassificationCollator
from upop.data.seg_augment import hsv_to_rgb, random_crop, rgb_to_hsv
from upop.config import UPopConfig
from upop.errors import ConfigError
from upop.models.folders import make_processor
from upop.models.segmenter import make_segmenter
from upop.tasks.classification import ClassificationTask
from upop.tasks.segmentation import SegmentationTask, sliding_window, window_anchors
from upop.engine.runtime import StepBatches

SIZE = 32


@pytest.fixture(scope="module")
def processor():
    return make_processor("vit", SIZE)


def _image(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def cls_data():
    rng = np.random.default_rng(0)
    return [{"image": _image(rng, 40 + i % 3, 48), "label": i % 3, "index": i} for i in range(8)]


@pytest.fixture(scope="module")
def seg_data():
    rng = np.random.default_rng(1)
    out = []
    for i in range(6):
        h, w = 37 + i, 53
        label = rng.integers(0, 3, (h, w)).astype(np.uint8)
        label[:3] = 255
        out.append({"image": _image(rng, h, w), "label": Image.fromarray(label, mode="L"), "index": i})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pixels(batch: dict) -> torch.Tensor:
    """The pixels the model trains on (a classification batch augmented on its device)."""
    return augment_batch(dict(batch))["pixel_values"]


# ----------------------------------------------------------------------------- training batches

@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_augmentation_is_seeded_by_seed_epoch_and_sample(kind, processor, cls_data, seg_data):
    make, data = ((ImageClassificationCollator, cls_data) if kind == "classification"
                  else (SegmentationCollator, seg_data))
    collate = make(processor, augment="deit", seed=0)
    first = collate(data[:4])
    assert first["pixel_values"].shape == (4, 3, SIZE, SIZE)
    assert _same(first, make(processor, augment="deit", seed=0)(data[:4]))  # a fresh collator: the same batch
    trained = _pixels(first)
    assert torch.equal(_pixels(make(processor, augment="deit", seed=0)(data[:4])), trained)
    collate.set_epoch(1)
    assert not torch.equal(_pixels(collate(data[:4])), trained)  # the next epoch differs
    assert not torch.equal(_pixels(make(processor, augment="deit", seed=1)(data[:4])), trained)
    # two processes with B samples each make the batch one process makes with 2B (B even)
    halves = [make(processor, augment="deit", seed=0)(part) for part in (data[:2], data[2:4])]
    for key in first:
        joined = torch.cat([h[key] + (2 * i if key == "mix_partner" else 0) for i, h in enumerate(halves)])
        assert torch.equal(joined, first[key]), key
    assert torch.equal(torch.cat([_pixels(h) for h in halves]), trained)


def test_none_gives_the_processor_batches(processor, cls_data, seg_data):
    batch = ImageClassificationCollator(processor, augment="none")(cls_data[:3])
    expected = processor(images=[s["image"] for s in cls_data[:3]], return_tensors="pt")["pixel_values"]
    assert set(batch) == {"pixel_values", "labels", "index"} and torch.equal(batch["pixel_values"], expected)
    seg = SegmentationCollator(processor, augment="none")(seg_data[:2])
    assert torch.equal(seg["pixel_values"], processor(images=[s["image"] for s in seg_data[:2]],
                                                      return_tensors="pt")["pixel_values"])
    nearest = np.asarray(seg_data[1]["label"].resize((SIZE, SIZE), Image.Resampling.NEAREST))
    assert torch.equal(seg["labels"][1], torch.from_numpy(nearest.astype(np.int64)))
    with pytest.raises(ConfigError, match="augment='flip'"):
        ImageClassificationCollator(processor, augment="flip")
    with pytest.raises(ConfigError, match="augment='strong'"):
        UPopConfig(augment="strong")
    assert ClassificationTask().configure(UPopConfig(augment="none")).augment == "none"
    assert SegmentationTask().configure(UPopConfig()).augment == "deit"


def test_segmentation_crops_keep_labels_and_pad_with_ignore(processor, seg_data):
    batch = SegmentationCollator(processor, augment="deit", seed=3)(seg_data)
    labels, pixels = batch["labels"], batch["pixel_values"]
    assert labels.shape == (len(seg_data), SIZE, SIZE)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 255}
    # a random resize below 1 leaves crops shorter than S: padded with 0 (the normalised mean, which
    # no 8-bit pixel of this processor maps to) and ignored labels
    pad = (pixels == 0).all(1)
    assert pad.any() and bool((labels[pad] == 255).all())
    assert not (labels == 255).flatten(1).all(1).any()  # every sample keeps labelled pixels


@pytest.mark.parametrize("world", [1, 2])
def test_resume_and_processes_reproduce_the_batches(world, processor, cls_data):
    def steps(start, rank=0, bs=4):
        collate = ImageClassificationCollator(processor, augment="deit", seed=5)
        return StepBatches(cls_data, collate, batch_size=bs // world, seed=5, start=start, stop=6, rank=rank,
                           world=world)

    whole = StepBatches(cls_data, ImageClassificationCollator(processor, augment="deit", seed=5), batch_size=4,
                        seed=5, start=0, stop=6)
    for step in (1, 3, 4):  # a resume at `step` (epochs of 2 steps: 3 and 4 are in later epochs)
        ranks = [steps(step, rank)[0] for rank in range(world)]
        assert torch.equal(torch.cat([b["pixel_values"] for b in ranks]), whole[step]["pixel_values"])
        assert torch.equal(torch.cat([b["mix_weight"] for b in ranks]), whole[step]["mix_weight"])
        assert torch.equal(torch.cat([_pixels(b) for b in ranks]), _pixels(whole[step]))
    assert not torch.equal(whole[1]["pixel_values"], whole[3]["pixel_values"])


@pytest.mark.parametrize("image,size", [((48, 40), (64, 64)), ((300, 20), (64, 64)), ((40, 40), (32, 32)),
                                        ((20, 24), (32, 32))])
def test_train_crops_have_the_input_size(image, size):
    rng = np.random.default_rng(0)
    img = _image(rng, image[1], image[0])
    crop = (padded_random_crop if max(size) <= 32 else random_resized_crop)(img, size, rng)
    assert crop.size == (size[1], size[0])
    if max(size) <= 32 and min(image) >= 32:  # DeiT's small-input crop: the image shifted by at most 4
        padded = np.zeros((image[1] + 8, image[0] + 8, 3), dtype=np.uint8)
        padded[4:-4, 4:-4] = np.asarray(img)
        windows = [padded[y:y + 32, x:x + 32] for y in range(image[1] - 23) for x in range(image[0] - 23)]
        assert any(np.array_equal(w, np.asarray(crop)) for w in windows)


def test_large_inputs_use_the_random_resized_crop(cls_data):
    collate = ImageClassificationCollator(make_processor("vit", 64), augment="deit", seed=0)
    batch = collate(cls_data[:2])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["pixel_values"].dtype == torch.uint8
    assert torch.equal(batch["pixel_values"], collate(cls_data[:2])["pixel_values"])
    assert _pixels(batch).shape == (2, 3, 64, 64)


# ----------------------------------------------------------------------------- mixing and targets

def test_mixed_pairs_keep_their_weight_as_share():
    n = 40
    pixels = torch.zeros(n, 3, 16, 16)
    pixels[1::2] = 1.0  # even samples black, odd white: the mixed mean is the partner's share
    drawn = draw_mix(list(range(100, 100 + n)), seed=0, epoch=0, size=(16, 16))
    partner, weight = drawn["mix_partner"], drawn["mix_weight"]
    out = mix(pixels, partner, weight, drawn["aug_cutmix"], drawn["aug_box"])
    assert torch.equal(partner, torch.arange(n) ^ 1)
    assert torch.equal(weight[0::2], weight[1::2]) and bool(((weight > 0) & (weight <= 1)).all())
    means = out.mean(dim=(1, 2, 3))
    assert torch.allclose(means[0::2], 1 - weight[0::2], atol=1e-6)
    assert torch.allclose(means[1::2], weight[1::2], atol=1e-6)
    binary = ((out == 0) | (out == 1)).flatten(1).all(1)[0::2]
    assert binary.any() and not binary.all()  # both cutmix (binary) and mixup (grey) pairs occur
    odd = draw_mix([7, 8, 9], seed=0, epoch=0, size=(16, 16))
    single = mix(pixels[:3], odd["mix_partner"], odd["mix_weight"], odd["aug_cutmix"], odd["aug_box"])
    assert odd["mix_partner"][2] == 2 and odd["mix_weight"][2] == 1  # an odd batch's last sample is unmixed
    assert torch.equal(single[2], pixels[2])


def test_soft_targets_by_hand():
    labels, partner, weight = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 2]), torch.tensor([0.7, 0.7, 1.0])
    t = soft_targets(labels, partner, weight, num_classes=4, smoothing=0.1)
    on, off = 0.9 + 0.025, 0.025
    expected = torch.tensor([[0.7 * on + 0.3 * off, off, 0.3 * on + 0.7 * off, off],
                             [0.3 * on + 0.7 * off, off, 0.7 * on + 0.3 * off, off],
                             [off, on, off, off]])
    assert torch.allclose(t, expected) and torch.allclose(t.sum(1), torch.ones(3))


def test_unmixed_deit_loss_is_label_smoothed_cross_entropy():
    import transformers

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=SIZE, patch_size=8, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    pixels, labels = torch.randn(3, 3, SIZE, SIZE), torch.tensor([0, 4, 2])
    batch = {"pixel_values": pixels, "labels": labels, "mix_partner": torch.arange(3), "mix_weight": torch.ones(3)}
    loss = ClassificationTask().loss(model, batch)
    expected = F.cross_entropy(model(pixel_values=pixels).logits, labels, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_eval_resize_and_centre_crop(processor):
    rng = np.random.default_rng(2)
    wide = _image(rng, 48, 64)
    crop = center_crop_eval(wide, (SIZE, SIZE))
    by_hand = wide.resize((48, 36), Image.Resampling.BICUBIC).crop((8, 2, 40, 34))  # short side 32 / 0.875 = 36
    assert np.array_equal(np.asarray(crop), np.asarray(by_hand))
    assert center_crop_eval(_image(rng, 32, 40), (SIZE, SIZE)) is None  # not larger: the processor resizes
    samples = [{"image": wide, "label": 0, "index": 0}, {"image": _image(rng, 30, 30), "label": 1, "index": 1}]
    batch = ImageClassificationCollator(processor).collate_eval(samples)
    assert torch.equal(batch["pixel_values"][0], normalize(processor, [by_hand])[0])
    assert torch.equal(batch["pixel_values"][1], processor(images=[samples[1]["image"]],
                                                           return_tensors="pt")["pixel_values"][0])


def test_random_crop_prefers_mixed_windows_and_hsv_round_trips():
    label = np.zeros((32, 64), dtype=np.uint8)
    label[:, :16] = 1  # a 32-wide crop is mixed enough (class 0 < 75%) only when it starts before x = 8
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    ok = [np.mean(random_crop(image, label, 32, np.random.default_rng(s))[1] == 0) < 0.75 for s in range(60)]
    assert np.mean(ok) > 0.7  # one draw succeeds 8 times in 33
    colours = np.random.default_rng(0).uniform(0, 255, (50, 3))
    assert np.allclose(hsv_to_rgb(rgb_to_hsv(colours)), colours, atol=1e-6)


# ----------------------------------------------------------------------------- sliding-window evaluation

def test_one_window_is_a_plain_forward():
    torch.manual_seed(0)
    model = make_segmenter(hidden=32, layers=1, heads=2, intermediate=64, image_size=SIZE, num_labels=4).eval()
    image = torch.randn(3, SIZE, SIZE)
    with torch.no_grad():
        plain = model(pixel_values=image[None]).logits[0]
        (slid,) = sliding_window(lambda x: model(pixel_values=x).logits, [image], SIZE, SIZE, batch_size=4)
    assert torch.equal(slid, plain)


def test_windows_cover_every_pixel_and_overlaps_are_averaged():
    h, w, window = 20, 40, 16
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    image = torch.stack([ys, xs, torch.zeros(h, w)])

    def fake(crops):  # per window: its top, its left and a one, constant over the window
        corner = crops[:, :2, :1, :1]
        return torch.cat([corner, torch.ones_like(corner[:, :1])], 1).expand(-1, -1, window, window)

    assert window_anchors(w, window, window) == [0, 16, 24] and window_anchors(h, window, window) == [0, 4]
    (out,) = sliding_window(fake, [image], window, window, batch_size=4)  # 6 windows in 2 chunks
    assert out.shape == (3, h, w) and torch.equal(out[2], torch.ones(h, w))  # every pixel covered
    left = torch.tensor([0.0] * 16 + [16.0] * 8 + [20.0] * 8 + [24.0] * 8)  # columns 24-31: mean of 16 and 24
    top = torch.tensor([0.0] * 4 + [2.0] * 12 + [4.0] * 4)  # rows 4-15: mean of 0 and 4
    assert torch.equal(out[1], left.expand(h, w)) and torch.equal(out[0], top[:, None].expand(h, w))
    (short,) = sliding_window(fake, [image[:, :12]], window, window, batch_size=4)  # padded to the window, cut back
    assert short.shape == (3, 12, w) and torch.equal(short[2], torch.ones(12, w))


class _ConstantModel(nn.Module):
    """A fake segmentation model that predicts class ``klass`` everywhere."""

    def __init__(self, klass: int, num_labels: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.klass, self.sizes = klass, []
        self.config = SimpleNamespace(num_labels=num_labels, vision_config=SimpleNamespace(image_size=SIZE))

    def forward(self, pixel_values):
        self.sizes.append(tuple(pixel_values.shape[-2:]))
        logits = torch.zeros(pixel_values.shape[0], self.config.num_labels, *pixel_values.shape[-2:])
        logits[:, self.klass] = 1.0
        return SimpleNamespace(logits=logits + self.weight)


@pytest.mark.parametrize("mode", ["slide", "whole"])
@pytest.mark.parametrize("klass", [0, 2])
def test_metrics_are_computed_at_the_original_resolution(klass, mode, processor, seg_data):
    model = _ConstantModel(klass)
    task = SegmentationTask().configure(UPopConfig(eval_mode=mode))
    metrics = task.evaluate(model, seg_data, processor, batch_size=4)
    labels = np.concatenate([np.asarray(s["label"]).ravel() for s in seg_data])  # 37..42 x 53 each
    valid = labels != 255
    assert metrics["pixel_acc"] == pytest.approx(100 * np.mean(labels[valid] == klass), abs=1e-9)
    assert set(model.sizes) == {(SIZE, SIZE)}  # windows of the model's size only


def test_whole_image_evaluation_is_one_forward_per_image(processor, seg_data):
    model = _ConstantModel(1)
    SegmentationTask().configure(UPopConfig(eval_mode="whole")).evaluate(model, seg_data, processor, batch_size=64)
    assert model.sizes == [(SIZE, SIZE)]  # every image of the (small) split in one batch, resized to the input
