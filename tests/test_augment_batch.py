"""DeiT's batched augmentation (upop.data.augment_batch): each RandAugment op against Pillow as timm
calls it and on constructed images, timm's magnitude mapping, erasing, mixing, determinism, process
invariance, the device it runs on, and the classification loss that applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from upop.data.augment import (AUG_KEYS, RA_OPS, deit_params, draw_mix, draw_rand_augment, norm_constants, normalize,
                               op_argument, padded_random_crop, sample_rng)
from upop.data.augment_batch import (COLOUR_OPS, affine_matrices, augment_batch, deit_batch, erase_noise, mix,
                                     random_erase, warp)
from upop.data.imagefolder import ImageClassificationCollator
from upop.models.folders import make_processor
from upop.tasks.classification import ClassificationTask

SIZE = 32
FILL = (128, 128, 128)
BICUBIC = Image.Resampling.BICUBIC


def _affine(img, data):
    return img.transform(img.size, Image.Transform.AFFINE, data, resample=BICUBIC, fillcolor=FILL)


# timm's op functions (auto_augment.py), the reference of the batched ops: name -> (Pillow op, argument)
PILLOW = {
    "AutoContrast": lambda im, a: ImageOps.autocontrast(im),
    "Equalize": lambda im, a: ImageOps.equalize(im),
    "Invert": lambda im, a: ImageOps.invert(im),
    "PosterizeIncreasing": lambda im, a: ImageOps.posterize(im, int(a)),
    "SolarizeIncreasing": lambda im, a: ImageOps.solarize(im, int(a)),
    "SolarizeAdd": lambda im, a: im.point([min(255, i + int(a)) if i < 128 else i for i in range(256)] * 3),
    "ColorIncreasing": lambda im, a: ImageEnhance.Color(im).enhance(a),
    "ContrastIncreasing": lambda im, a: ImageEnhance.Contrast(im).enhance(a),
    "BrightnessIncreasing": lambda im, a: ImageEnhance.Brightness(im).enhance(a),
    "SharpnessIncreasing": lambda im, a: ImageEnhance.Sharpness(im).enhance(a),
    "Rotate": lambda im, a: im.rotate(a, resample=BICUBIC, fillcolor=FILL),
    "ShearX": lambda im, a: _affine(im, (1, a, 0, 0, 1, 0)),
    "ShearY": lambda im, a: _affine(im, (1, 0, 0, a, 1, 0)),
    "TranslateXRel": lambda im, a: _affine(im, (1, 0, a * im.width, 0, 1, 0)),
    "TranslateYRel": lambda im, a: _affine(im, (1, 0, 0, 0, 1, a * im.height)),
}


def _tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]).astype(np.float32)).permute(0, 3, 1, 2)


def _apply(name: str, x: torch.Tensor, args) -> torch.Tensor:
    """Op ``name`` on the batch ``x`` (8-bit values as floats), one argument per sample."""
    args, fill = torch.tensor(args, dtype=torch.float32), torch.tensor([FILL] * x.shape[0], dtype=torch.float32)
    if name in COLOUR_OPS:
        return COLOUR_OPS[name](x.clone(), args, fill)
    ops = torch.full((x.shape[0],), RA_OPS.index(name))
    return warp(x.clone(), affine_matrices(ops, args, *x.shape[-2:]), fill)


def _images(n=6, h=20, w=24, seed=0):
    rng = np.random.default_rng(seed)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]
    out.append(Image.fromarray((np.asarray(out[0]) // 3 + 60).astype(np.uint8)))  # a narrow range
    out.append(Image.new("RGB", (w, h), (90, 10, 200)))  # one value per channel
    return out


def _smooth(h=20, w=24):
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(x / 5.0), 128 + 100 * np.cos(y / 4.0), 128 + 60 * np.sin((x + y) / 7.0)], -1)
    return Image.fromarray(a.round().astype(np.uint8))


# ----------------------------------------------------------------------------- the ops

@pytest.mark.parametrize("name", sorted(COLOUR_OPS))
def test_colour_ops_equal_pillow_as_timm_calls_it(name):
    images = _images()
    rng = np.random.default_rng(1)
    args = [op_argument(name, float(rng.uniform(0, 10)), bool(rng.random() > 0.5)) for _ in images]
    expected = _tensor([PILLOW[name](im, a) for im, a in zip(images, args)])
    assert torch.equal(_apply(name, _tensor(images), args), expected)  # all samples at once, each its own arg


@pytest.mark.parametrize("name,arg", [("TranslateXRel", 0.25), ("TranslateYRel", -0.25), ("Rotate", 90.0),
                                      ("Rotate", -90.0)])
def test_whole_pixel_warps_equal_pillow(name, arg):
    image = _images(1, 24, 24)[0]  # square: a quarter turn maps pixel centres onto pixel centres
    assert torch.equal(_apply(name, _tensor([image]), [arg]), _tensor([PILLOW[name](image, arg)]))


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_geometric_ops_follow_pillow_up_to_the_bicubic_kernel(name):
    image = _smooth()
    for magnitude, negate in ((9.0, False), (6.5, True)):
        arg = op_argument(name, magnitude, negate)
        diff = (_apply(name, _tensor([image]), [arg]) - _tensor([PILLOW[name](image, arg)])).abs()
        assert float(diff.max()) <= 2, (name, arg)  # torch's kernel a=-0.75, Pillow's -0.5; same coordinates


def test_ops_on_constructed_images():
    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 1, 6] = 200.0  # a marked pixel in row 1, column 6
    turned = _apply("Rotate", x, [90.0])  # counter-clockwise: (row 1, col 6) -> (row 1, col 1)
    assert turned[0, 0, 1, 1] == 200 and int((turned[0, 0] == 200).sum()) == 1
    shifted = _apply("TranslateXRel", x, [0.25])  # content moves 2 pixels left, the right edge is filled
    assert shifted[0, 0, 1, 4] == 200 and bool((shifted[0, :, :, 6:] == 128).all())
    down = _apply("TranslateYRel", x, [-0.25])
    assert down[0, 0, 3, 6] == 200 and bool((down[0, :, :2] == 128).all())
    ramp = torch.arange(256.0).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(_apply("Invert", ramp, [0]), 255 - ramp)
    solar = _apply("SolarizeIncreasing", ramp, [100])
    assert torch.equal(solar, torch.where(ramp >= 100, 255 - ramp, ramp))
    assert torch.equal(_apply("SolarizeAdd", ramp, [99]), torch.where(ramp < 128, (ramp + 99).clamp_max(255), ramp))
    for bits in (0, 1, 2, 4):
        kept = _apply("PosterizeIncreasing", ramp, [bits])
        assert kept.unique().numel() == 2 ** bits and torch.equal(kept, ramp - ramp % 2 ** (8 - bits))
    dark = (torch.arange(4096.0) // 256).view(1, 1, 64, 64).expand(1, 3, 64, 64)  # values 0..15, 256 pixels each
    levels, counts = _apply("Equalize", dark, [0])[0, 0].unique(return_counts=True)
    gaps = levels.diff()  # 16 levels spread evenly over 0..255
    assert levels[0] == 0 and levels[-1] == 255 and bool((counts == 256).all())
    assert bool(((gaps >= 15) & (gaps <= 18)).all())
    stretched = _apply("AutoContrast", dark + 10, [0])
    assert stretched.min() == 0 and stretched.max() == 255 and stretched.unique().numel() == 16
    assert torch.equal(_apply("BrightnessIncreasing", ramp, [0.5]), (ramp * 0.5).floor())
    grey = _apply("ColorIncreasing", torch.tensor([200.0, 100.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4), [0.0])
    assert bool((grey == grey[:, :1]).all())  # no colour left


def test_magnitudes_follow_timms_mapping():
    cases = {("Rotate", 9.0, False): 27.0, ("Rotate", 9.0, True): -27.0, ("ShearX", 5.0, True): -0.15,
             ("TranslateYRel", 10.0, False): 0.45, ("PosterizeIncreasing", 9.0, False): 1.0,
             ("PosterizeIncreasing", 10.0, False): 0.0, ("PosterizeIncreasing", 0.0, False): 4.0,
             ("SolarizeIncreasing", 9.0, False): 256 - 230, ("SolarizeIncreasing", 0.0, False): 256,
             ("SolarizeAdd", 9.0, True): 99, ("ColorIncreasing", 9.0, False): 1.81,
             ("ContrastIncreasing", 9.0, True): 0.19, ("SharpnessIncreasing", 10.0, True): 0.1,
             ("BrightnessIncreasing", 0.0, True): 1.0, ("Equalize", 9.0, True): 0.0}
    for (name, magnitude, negate), expected in cases.items():
        assert op_argument(name, magnitude, negate) == pytest.approx(expected), name
    draws = [draw_rand_augment(np.random.default_rng(s)) for s in range(1500)]
    ops = np.array([o for d in draws for o in d[0]])
    assert abs(np.mean(ops < 0) - 0.5) < 0.04  # each layer applied with probability 0.5
    assert np.bincount(ops[ops >= 0], minlength=15).min() > 0.5 * len(ops) / 30  # every op drawn, about evenly
    rotations = np.array([abs(a) for d in draws for o, a in zip(*d) if o == RA_OPS.index("Rotate")])
    assert abs(rotations.mean() - 27.0) < 1.0 and rotations.max() <= 30.0  # magnitude ~ N(9, 0.5) clipped at 10


# ----------------------------------------------------------------------------- erasing and mixing

def test_erasing_fills_the_box_with_noise_wherever_it_lies():
    pixels = torch.full((3, 3, 16, 20), 7.0)
    boxes = torch.tensor([[2, 3, 5, 6, 11], [0, 0, 0, 0, 11], [9, 10, 5, 6, 11]])
    out = random_erase(pixels.clone(), boxes)
    assert torch.equal(out[1], pixels[1])  # height 0: nothing erased
    inside = out[0, :, 2:7, 3:9]
    assert bool((inside != 7).all()) and int((out[0] != 7).sum()) == 3 * 5 * 6  # exactly the box
    assert torch.equal(out[2, :, 9:14, 10:16], inside)  # same seed, same box size: the same noise
    again = random_erase(pixels[:1].clone(), boxes[:1])  # and the same in another batch
    assert torch.equal(again[0], out[0])
    noise = erase_noise(torch.tensor([1, 2]), torch.arange(40000).view(1, 40000).expand(2, -1))
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02
    assert float((noise[0] - noise[1]).abs().mean()) > 0.5  # seeds give different noise


def test_cutmix_swaps_the_box_and_mixup_blends():
    pixels = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    partner, weight = torch.tensor([1, 0]), torch.tensor([0.75, 0.75])
    blended = mix(pixels, partner, weight, torch.tensor([False, False]), torch.zeros(2, 4, dtype=torch.long))
    assert torch.allclose(blended[0], torch.full((3, 8, 8), 0.25))
    assert torch.allclose(blended[1], torch.full((3, 8, 8), 0.75))
    box = torch.tensor([[2, 6, 0, 4]] * 2)
    cut = mix(pixels, partner, weight, torch.tensor([True, True]), box)
    assert bool((cut[0, :, 2:6, :4] == 1).all()) and int(cut[0].sum()) == 3 * 16
    assert bool((cut[1, :, 2:6, :4] == 0).all()) and int(cut[1].sum()) == 3 * 48
    drawn = draw_mix(list(range(200)), seed=3, epoch=0, size=(16, 16))
    cuts = drawn["aug_cutmix"]
    area = ((drawn["aug_box"][:, 1] - drawn["aug_box"][:, 0]) * (drawn["aug_box"][:, 3] - drawn["aug_box"][:, 2]))
    assert 0.3 < float(cuts.float().mean()) < 0.7  # cutmix half the time
    assert torch.allclose(drawn["mix_weight"][cuts], 1 - area[cuts] / 256.0)  # weight = the share left uncut


# ----------------------------------------------------------------------------- the batch

@pytest.fixture(scope="module")
def processor():
    return make_processor("vit", SIZE)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    return [{"image": Image.fromarray(rng.integers(0, 256, (36 + i % 5, 44, 3), dtype=np.uint8)), "label": i % 3,
             "index": 10 + i} for i in range(12)]


def _train(processor, samples, seed=0, epoch=0):
    collate = ImageClassificationCollator(processor, augment="deit", seed=seed)
    collate.set_epoch(epoch)
    return collate(samples)


def test_batches_are_deterministic_per_seed_and_process_invariant(processor, samples):
    whole = augment_batch(_train(processor, samples))["pixel_values"]
    assert whole.dtype == torch.float32 and whole.shape == (12, 3, SIZE, SIZE)
    assert torch.equal(augment_batch(_train(processor, samples))["pixel_values"], whole)
    for other in (dict(seed=1), dict(epoch=1)):
        changed = augment_batch(_train(processor, samples, **other))["pixel_values"]
        assert bool((changed != whole).flatten(1).any(1).all())  # every sample differs
    parts = [augment_batch(_train(processor, samples[i:i + 4]))["pixel_values"] for i in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), whole)  # 3 processes x 4 samples == one process x 12


def test_training_batches_change_and_evaluation_batches_do_not(processor, samples):
    collate = ImageClassificationCollator(processor, augment="deit", seed=0)
    plain = ImageClassificationCollator(processor, augment="none")(samples)["pixel_values"]
    trained = augment_batch(collate(samples))["pixel_values"]
    assert bool((trained - plain).abs().flatten(1).amax(1).gt(0.1).all())
    evaluation = collate.collate_eval(samples)
    collate.set_epoch(3)
    assert torch.equal(collate.collate_eval(samples)["pixel_values"], evaluation["pixel_values"])
    assert set(evaluation) == {"pixel_values", "labels", "index"} and evaluation["pixel_values"].dtype == torch.float32
    assert augment_batch(evaluation) is evaluation  # nothing to augment


def test_the_op_groups_do_what_the_draws_say(processor, samples):
    batch = _train(processor, samples[:4])
    # no RandAugment, flip, erasing or mixing: only the normalisation of the crops is left
    quiet = {**batch, "aug_op": torch.full((4, 2), -1), "aug_flip": torch.zeros(4, dtype=torch.bool),
             "aug_erase": torch.zeros(4, 5, dtype=torch.long), "mix_partner": torch.arange(4),
             "mix_weight": torch.ones(4),
             "aug_cutmix": torch.zeros(4, dtype=torch.bool)}
    crops = batch["pixel_values"].float()
    assert torch.allclose(augment_batch(dict(quiet))["pixel_values"], (crops - 127.5) / 127.5)
    flipped = {**quiet, "aug_flip": torch.tensor([True, False, True, False])}
    out = augment_batch(dict(flipped))["pixel_values"]
    assert torch.allclose(out[0], (crops[0].flip(-1) - 127.5) / 127.5)
    assert torch.allclose(out[1], (crops[1] - 127.5) / 127.5)
    inverted = {**quiet, "aug_op": torch.tensor([[2, -1], [-1, 2], [2, 2], [-1, -1]]), "aug_arg": torch.zeros(4, 2)}
    out = augment_batch(dict(inverted))["pixel_values"] * 127.5 + 127.5
    assert torch.allclose(out[:2], 255 - crops[:2], atol=1e-4) and torch.allclose(out[2:], crops[2:], atol=1e-4)


def test_it_runs_on_the_batch_device_and_in_float32(processor, samples):
    batch = _train(processor, samples[:4])
    params = {k: batch[k] for k in (*AUG_KEYS, "mix_partner", "mix_weight")}
    out = deit_batch(batch["pixel_values"], params, batch["aug_mean"], batch["aug_std"], batch["aug_fill"])
    assert out.device == batch["pixel_values"].device and out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(augment_batch(dict(batch))["pixel_values"], out)
    if torch.cuda.is_available():
        cuda = augment_batch({k: v.cuda() for k, v in batch.items()})["pixel_values"]
        assert cuda.is_cuda and torch.allclose(cuda.cpu(), out, atol=0.05)


def test_the_loss_augments_once_for_student_and_teacher(processor, samples):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=SIZE, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    batch = _train(processor, samples[:4])
    expected = augment_batch(dict(batch))["pixel_values"]
    task = ClassificationTask()
    first = task.loss(model, batch)
    assert torch.equal(batch["pixel_values"], expected) and not any(k in batch for k in AUG_KEYS)
    assert torch.isfinite(first) and task.loss(model, batch).item() == first.item()  # the teacher's pass: same images


def test_params_are_drawn_from_the_samples_generators(processor, samples):
    one = deit_params([samples[5]["image"]], [samples[5]["index"]], processor, seed=4, epoch=2)
    rng = sample_rng(4, 2, samples[5]["index"])
    assert one["pixel_values"].dtype == torch.uint8 and one["pixel_values"].shape == (1, 3, SIZE, SIZE)
    crop = padded_random_crop(samples[5]["image"], (SIZE, SIZE), rng)
    assert np.array_equal(one["pixel_values"][0].permute(1, 2, 0).numpy(), np.asarray(crop))
    assert bool(one["aug_flip"][0]) == (rng.random() < 0.5)
    assert one["aug_op"][0].tolist() == draw_rand_augment(rng)[0]


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_normalisation_matches_the_processor(family, samples):
    proc = make_processor(family, SIZE)
    image = samples[0]["image"].crop((0, 0, SIZE, SIZE))
    mean, std = norm_constants(proc)
    x = _tensor([image])[0]
    ours = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(ours, normalize(proc, [image])[0], atol=1e-5)


def test_a_runs_batch_is_augmented_without_waiting_for_the_device(processor, samples):
    """The draws that choose the work (the ops' groups, the erased boxes) are read from the
    collated batch: no device-to-host sync, and the same images as from a plain dict."""
    from upop.measure.host_sync import DeviceBatch, count_syncs

    collated = _train(processor, samples)
    assert bool((collated["aug_erase"][:, 2] > 0).any()) and bool(collated["aug_flip"].any())  # all the work runs
    expected = augment_batch(dict(collated))["pixel_values"]
    on_device = DeviceBatch({k: v.clone() for k, v in collated.items()}, collated)
    out, counter = count_syncs(augment_batch, on_device)
    assert counter.count == 0, dict(counter.sites)
    assert torch.equal(out["pixel_values"], expected)
    _, counter = count_syncs(augment_batch, {k: v.clone() for k, v in collated.items()})  # no collated copy
    assert counter.count == 2  # ops and boxes read back once each
