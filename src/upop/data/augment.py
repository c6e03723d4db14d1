"""Training augmentation of the vision tasks, a pure function of (seed, epoch, sample indices).

Classification follows DeiT's recipe (facebookresearch/deit ``main.py`` defaults, ``datasets.py``
``build_transform`` -> timm ``create_transform``), split in two:

* per image, in the collator (:func:`deit_params`, DataLoader workers): :func:`random_resized_crop`
  (scale (0.08, 1), aspect ratio (3/4, 4/3), bicubic) to the model's input size, or for inputs of
  32 pixels or less DeiT's :func:`padded_random_crop` (a random crop of the image padded by 4),
  kept as 8-bit values; and every random choice of the rest of the recipe, drawn from the sample's
  generator and shipped in the batch as small tensors (:data:`AUG_KEYS`, ``mix_partner``,
  ``mix_weight``);
* per batch, on the batch's device (:mod:`upop.data.augment_batch`, called by the task's loss):
  a horizontal flip with probability 0.5; timm's RandAugment ``rand-m9-mstd0.5-inc1`` (2 ops drawn
  with replacement from the 15 "increasing" ops :data:`RA_OPS`, each applied with probability
  0.5 at magnitude ~ N(9, 0.5) clipped to [0, 10], mapped to the op's argument as timm does,
  :func:`op_argument`; geometric ops fill with the processor's mean colour); the processor's
  rescale and normalisation; random erasing (probability 0.25, one box of 2%-33% of the area,
  aspect ratio (0.3, 1/0.3), N(0, 1) noise); mixup (alpha 0.8) or, with probability 0.5, cutmix
  (alpha 1.0, box-corrected weight). timm mixes a batch with its reverse under one weight per
  batch; upop mixes the samples of each consecutive pair (0-1, 2-3, ...) under one weight per
  pair, so a batch is the same whether one process collates 2B samples or two processes B each
  (B even). The loss takes the mixed targets with label smoothing 0.1 (:func:`soft_targets`).

Evaluation (:func:`center_crop_eval`): the shorter side resized to ``input / 0.875`` (256 for 224,
bicubic) and the centre ``input`` square kept, when the image's shorter side is larger than the
input; other images go through the processor as before.

Every random draw comes from a NumPy generator seeded by :func:`sample_rng` from the run's seed,
the epoch and the sample's dataset index (a pair's indices for mixing): the augmentation of a
sample does not depend on the batch it is in, the process that collates it or a resume.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from upop.errors import ConfigError, show

AUGMENT_CHOICES = ("deit", "none")
"""Values of the ``augment`` setting: the papers' training augmentation, or none (resize only)."""



def check_augment(value) -> str:
    """``value`` if it is one of :data:`AUGMENT_CHOICES`, else a ConfigError."""
    if value not in AUGMENT_CHOICES:
        raise ConfigError(f"augment={show(value)} is not allowed; choose one of: {', '.join(AUGMENT_CHOICES)}")
    return value


BICUBIC = Image.Resampling.BICUBIC
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
RA_LAYERS, RA_PROB, RA_MAGNITUDE, RA_MAGNITUDE_STD, RA_MAX = 2, 0.5, 9.0, 0.5, 10.0
ERASE_PROB, ERASE_AREA, ERASE_RATIO = 0.25, (0.02, 1 / 3), (0.3, 1 / 0.3)
MIXUP_ALPHA, CUTMIX_ALPHA, SWITCH_PROB = 0.8, 1.0, 0.5
LABEL_SMOOTHING = 0.1
SMALL_INPUT, SMALL_PAD = 32, 4  # DeiT: inputs <= 32 px get a padded random crop instead
EVAL_CROP = 0.875  # DeiT's eval: resize to int(224 / 0.875) = 256, centre crop 224


def sample_rng(seed: int, epoch: int, *keys) -> np.random.Generator:
    """A generator seeded from ``(seed, epoch, *keys)`` (a hash: independent streams per key)."""
    text = ":".join(str(int(k)) if not isinstance(k, str) else k for k in (seed, epoch, *keys))
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))


def input_size(image_processor) -> tuple[int, int]:
    """``(height, width)`` of the model input the processor makes (its crop size when it crops)."""
    size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = size or getattr(image_processor, "size", None)
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    if get("shortest_edge"):
        return int(get("shortest_edge")), int(get("shortest_edge"))
    raise ValueError(f"cannot tell the input size of {type(image_processor).__name__} (size={size!r})")


def normalize(image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """``(B, 3, H, W)`` pixel values of same-size images: the processor's rescale and normalisation, no resize."""
    return image_processor(images=list(images), do_resize=False, do_center_crop=False,
                           return_tensors="pt")["pixel_values"]


def fill_colour(image_processor) -> tuple[int, int, int]:
    """The processor's mean as an 8-bit RGB colour (timm's ``img_mean`` fill)."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    mean = list(mean) * 3 if len(mean) == 1 else list(mean)
    return tuple(int(round(255 * float(m))) for m in mean[:3])


def random_resized_crop(img: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random area/aspect crop of ``img`` resized to ``size`` (h, w); 10 tries, then the centre crop."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            break
    else:  # the whole image, cut to the allowed aspect range, centred
        ratio = width / height
        w, h = ((width, int(round(width / CROP_RATIO[0]))) if ratio < CROP_RATIO[0]
                else (int(round(height * CROP_RATIO[1])), height) if ratio > CROP_RATIO[1] else (width, height))
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size[1], size[0]), BICUBIC, box=(left, top, left + w, top + h))


def padded_random_crop(img: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """DeiT's crop for inputs of 32 pixels or less: a random ``size`` crop of the image padded by 4
    black pixels (an image smaller than ``size`` is first resized to it)."""
    if img.width < size[1] or img.height < size[0]:
        img = img.resize((size[1], size[0]), BICUBIC)
    padded = Image.new("RGB", (img.width + 2 * SMALL_PAD, img.height + 2 * SMALL_PAD))
    padded.paste(img, (SMALL_PAD, SMALL_PAD))
    top = int(rng.integers(0, padded.height - size[0] + 1))
    left = int(rng.integers(0, padded.width - size[1] + 1))
    return padded.crop((left, top, left + size[1], top + size[0]))


RA_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
          "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
          "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
"""timm's "increasing" RandAugment ops (``_RAND_INCREASING_TRANSFORMS``); a batch names them by position."""
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
AUG_KEYS = ("aug_flip", "aug_op", "aug_arg", "aug_erase", "aug_cutmix", "aug_box", "aug_mean", "aug_std", "aug_fill")
"""The batch entries of :func:`deit_params` that only the batched augmentation reads."""


def op_argument(name: str, magnitude: float, negate: bool) -> float:
    """timm's argument of RandAugment op ``name`` at ``magnitude`` (0..10; ``negate``: the random sign).

    Rotate: degrees ``+-30 m/10``; ShearX/Y: ``+-0.3 m/10``; TranslateX/YRel: a share ``+-0.45 m/10``
    of the width/height; PosterizeIncreasing: bits kept ``4 - int(4 m/10)``; SolarizeIncreasing:
    threshold ``256 - int(256 m/10)``; SolarizeAdd: ``int(110 m/10)`` added below 128;
    Color/Contrast/Brightness/SharpnessIncreasing: factor ``max(0.1, 1 +- 0.9 m/10)``;
    AutoContrast, Equalize, Invert: none (0).
    """
    level, sign = magnitude / RA_MAX, (-1.0 if negate else 1.0)
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * 0.45
    if name == "PosterizeIncreasing":
        return float(4 - int(level * 4))
    if name == "SolarizeIncreasing":
        return float(256 - int(level * 256))
    if name == "SolarizeAdd":
        return float(int(level * 110))
    if name.endswith("Increasing"):
        return max(0.1, 1.0 + sign * level * 0.9)
    return 0.0


def draw_rand_augment(rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """``(ops, args)`` of the RandAugment layers: an index into :data:`RA_OPS` (-1: skipped) and its argument."""
    ops, args = [], []
    for _ in range(RA_LAYERS):
        pick = int(rng.integers(0, len(RA_OPS)))
        if rng.random() > RA_PROB:
            ops.append(-1)
            args.append(0.0)
            continue
        magnitude = min(max(float(rng.normal(RA_MAGNITUDE, RA_MAGNITUDE_STD)), 0.0), RA_MAX)
        ops.append(pick)
        args.append(op_argument(RA_OPS[pick], magnitude, rng.random() > 0.5))
    return ops, args


def draw_erase(size: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """``[top, left, height, width, noise seed]`` of timm's random erasing (probability 0.25, 10
    tries at a box of 2%-33% of the area); height 0 when nothing is erased."""
    seed = int(rng.integers(0, 2 ** 31))
    if rng.random() >= ERASE_PROB:
        return [0, 0, 0, 0, seed]
    height, width = size
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(10):
        target = rng.uniform(*ERASE_AREA) * height * width
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
            return [int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w, seed]
    return [0, 0, 0, 0, seed]


def draw_mix(indices: Sequence[int], seed: int, epoch: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Mixup / cutmix of consecutive pairs: ``mix_partner`` (B,), ``mix_weight`` (B,), ``aug_cutmix``
    (B,) and ``aug_box`` (B, 4: y0, y1, x0, x1).

    Sample ``2k`` and ``2k + 1`` are mixed with each other under one weight ``lam`` (of its own
    image; drawn from ``(seed, epoch, both indices)``): mixup (Beta(0.8, 0.8)) or, half the time,
    cutmix (Beta(1, 1), a box of side ``sqrt(1 - lam)`` around a random centre, clipped to the
    image, then ``lam`` = the share of the image left uncut). An odd batch's last sample is its
    own partner with weight 1.
    """
    height, width = size
    n = len(indices)
    partner, weight = torch.arange(n), torch.ones(n, dtype=torch.float32)
    cutmix, box = torch.zeros(n, dtype=torch.bool), torch.zeros(n, 4, dtype=torch.long)
    for a in range(0, n - 1, 2):
        b = a + 1
        rng = sample_rng(seed, epoch, "mix", indices[a], indices[b])
        if rng.random() < SWITCH_PROB:
            cut = math.sqrt(1.0 - rng.beta(CUTMIX_ALPHA, CUTMIX_ALPHA))
            cut_h, cut_w = int(height * cut), int(width * cut)
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
            lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)
            cutmix[a] = cutmix[b] = True
            box[a] = box[b] = torch.tensor([int(y0), int(y1), int(x0), int(x1)])
        else:
            lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
        partner[a], partner[b] = b, a
        weight[a] = weight[b] = lam
    return {"mix_partner": partner, "mix_weight": weight, "aug_cutmix": cutmix, "aug_box": box}


def norm_constants(image_processor) -> tuple[list[float], list[float]]:
    """``(mean, std)`` of the processor's rescale and normalisation in 8-bit units: normalised
    pixels are ``(x - mean) / std`` for 8-bit values ``x``."""
    scale = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True) is not False else 1.0
    if getattr(image_processor, "do_normalize", True) is False:
        return [0.0] * 3, [1.0 / scale] * 3
    three = lambda v: [float(x) for x in (list(v) * 3 if len(v) == 1 else list(v))[:3]]  # noqa: E731
    mean, std = three(image_processor.image_mean), three(image_processor.image_std)
    return [m / scale for m in mean], [s / scale for s in std]


def deit_params(images: Sequence[Image.Image], indices: Sequence[int], image_processor, seed: int,
                epoch: int) -> dict[str, torch.Tensor]:
    """The collated half of DeiT's recipe: ``pixel_values`` (B, 3, H, W) uint8 crops at the input
    size and the random choices of the batched half (:mod:`upop.data.augment_batch`), each entry
    with the batch as its first dimension. Sample ``i`` draws from ``sample_rng(seed, epoch,
    indices[i])`` in this order: crop, flip, RandAugment layers, erasing."""
    size = input_size(image_processor)
    crop = padded_random_crop if max(size) <= SMALL_INPUT else random_resized_crop
    pixels, flips, ops, args, erase = [], [], [], [], []
    for img, index in zip(images, indices):
        rng = sample_rng(seed, epoch, index)
        img = img if img.mode == "RGB" else img.convert("RGB")
        pixels.append(np.asarray(crop(img, size, rng), dtype=np.uint8).transpose(2, 0, 1))
        flips.append(bool(rng.random() < 0.5))
        o, a = draw_rand_augment(rng)
        ops.append(o)
        args.append(a)
        erase.append(draw_erase(size, rng))
    n = len(pixels)
    mean, std = norm_constants(image_processor)
    return {"pixel_values": torch.from_numpy(np.stack(pixels)), "aug_flip": torch.tensor(flips, dtype=torch.bool),
            "aug_op": torch.tensor(ops, dtype=torch.long).view(n, RA_LAYERS),
            "aug_arg": torch.tensor(args, dtype=torch.float32).view(n, RA_LAYERS),
            "aug_erase": torch.tensor(erase, dtype=torch.long).view(n, 5),
            **draw_mix(indices, seed, epoch, size),
            "aug_mean": torch.tensor([mean] * n), "aug_std": torch.tensor([std] * n),
            "aug_fill": torch.tensor([list(fill_colour(image_processor))] * n, dtype=torch.float32)}


def soft_targets(labels: torch.Tensor, partner: torch.Tensor, weight: torch.Tensor, num_classes: int,
                 smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """``(B, num_classes)`` targets: ``w * smooth(y) + (1 - w) * smooth(y[partner])``; rows sum to 1.

    ``smooth`` puts ``1 - smoothing + smoothing / num_classes`` on the class and ``smoothing /
    num_classes`` elsewhere (timm's mixup targets).
    """
    off = smoothing / num_classes
    one_hot = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    one_hot.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
    w = weight.to(one_hot).view(-1, 1)
    return w * one_hot + (1 - w) * one_hot[partner.to(labels.device)]


def center_crop_eval(img: Image.Image, size: tuple[int, int]) -> Image.Image | None:
    """DeiT's evaluation view of ``img`` at input ``size`` (h, w), or None when the image's shorter
    side is not larger than the input's (then the processor's own resize applies)."""
    if min(img.size) <= min(size):
        return None
    short = int(min(size) / EVAL_CROP)
    width, height = img.size
    new = (short, max(short, int(short * height / width))) if width <= height else \
        (max(short, int(short * width / height)), short)
    img = img.resize(new, BICUBIC)
    left, top = int(round((new[0] - size[1]) / 2.0)), int(round((new[1] - size[0]) / 2.0))
    return img.crop((left, top, left + size[1], top + size[0]))


__all__ = ["AUGMENT_CHOICES", "AUG_KEYS", "GEOMETRIC_OPS", "LABEL_SMOOTHING", "RA_OPS", "center_crop_eval",
           "check_augment", "deit_params", "draw_erase", "draw_mix", "draw_rand_augment", "fill_colour", "input_size",
           "norm_constants", "normalize", "op_argument", "padded_random_crop", "random_resized_crop", "sample_rng",
           "soft_targets"]
