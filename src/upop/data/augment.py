"""Training augmentation of the vision tasks, a pure function of (seed, epoch, sample indices).

Classification follows DeiT's recipe (facebookresearch/deit ``main.py`` defaults, ``datasets.py``
``build_transform`` -> timm ``create_transform``), written here with Pillow, NumPy and torch:

* :func:`random_resized_crop`: scale (0.08, 1), aspect ratio (3/4, 4/3), bicubic, to the model's
  input size (for inputs of 32 pixels or less, DeiT's :func:`padded_random_crop` instead: a
  random crop of the image padded by 4); then a horizontal flip with probability 0.5;
* :func:`rand_augment`: timm's ``rand-m9-mstd0.5-inc1``: 2 ops drawn with replacement from the 15
  "increasing" ops, each applied with probability 0.5 at magnitude ~ N(9, 0.5) clipped to [0, 10];
  geometric ops resample bicubically and fill with the processor's mean colour;
* the processor's rescale and normalisation (no resize), then :func:`random_erase`: probability
  0.25, one box of 2%-33% of the area, aspect ratio (0.3, 1/0.3), filled with N(0, 1) noise;
* :func:`mix_pairs`: mixup (alpha 0.8) or, with probability 0.5, cutmix (alpha 1.0, box-corrected
  weight). timm mixes a batch with its reverse under one weight per batch; upop mixes the
  samples of each consecutive pair (0-1, 2-3, ...) under one weight per pair, so a batch is the
  same whether one process collates 2B samples or two processes B each (B even). The loss takes
  the mixed targets with label smoothing 0.1 (:func:`soft_targets`).

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
from PIL import Image, ImageEnhance, ImageOps

from ..errors import ConfigError, show

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


def _affine(img: Image.Image, matrix, fill) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=BICUBIC, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int) -> Image.Image:
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(kind):
    return lambda img, level, sign, fill: kind(img).enhance(max(0.1, 1.0 + sign * level * 0.9))


# name -> op(img, level in [0, 1], sign in {-1, 1}, fill); timm's "increasing" RandAugment ops
RAND_OPS = {
    "AutoContrast": lambda img, level, sign, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, sign, fill: ImageOps.equalize(img),
    "Invert": lambda img, level, sign, fill: ImageOps.invert(img),
    "Rotate": lambda img, level, sign, fill: img.rotate(sign * level * 30.0, resample=BICUBIC, fillcolor=fill),
    "PosterizeIncreasing": lambda img, level, sign, fill: ImageOps.posterize(img, max(1, 4 - int(level * 4))),
    "SolarizeIncreasing": lambda img, level, sign, fill: ImageOps.solarize(img, 256 - min(256, int(level * 256))),
    "SolarizeAdd": lambda img, level, sign, fill: _solarize_add(img, min(128, int(level * 110))),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, level, sign, fill: _affine(img, (1, sign * level * 0.3, 0, 0, 1, 0), fill),
    "ShearY": lambda img, level, sign, fill: _affine(img, (1, 0, 0, sign * level * 0.3, 1, 0), fill),
    "TranslateXRel": lambda img, level, sign, fill: _affine(img, (1, 0, sign * level * 0.45 * img.width, 0, 1, 0),
                                                            fill),
    "TranslateYRel": lambda img, level, sign, fill: _affine(img, (1, 0, 0, 0, 1, sign * level * 0.45 * img.height),
                                                            fill),
}
_OP_NAMES = tuple(RAND_OPS)


def rand_augment(img: Image.Image, rng: np.random.Generator, fill=(128, 128, 128)) -> Image.Image:
    """timm's ``rand-m9-mstd0.5-inc1`` on an RGB image (see the module docstring)."""
    for pick in rng.integers(0, len(_OP_NAMES), RA_LAYERS):
        if rng.random() > RA_PROB:
            continue
        magnitude = min(max(rng.normal(RA_MAGNITUDE, RA_MAGNITUDE_STD), 0.0), RA_MAX)
        sign = -1.0 if rng.random() > 0.5 else 1.0
        img = RAND_OPS[_OP_NAMES[pick]](img, magnitude / RA_MAX, sign, fill)
    return img


def random_erase(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``pixels`` (3, H, W), normalised, with one random box replaced by N(0, 1) noise (probability 0.25)."""
    if rng.random() >= ERASE_PROB:
        return pixels
    _, height, width = pixels.shape
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(10):
        target = rng.uniform(*ERASE_AREA) * height * width
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            pixels = pixels.clone()
            noise = rng.standard_normal((pixels.shape[0], h, w)).astype(np.float32)
            pixels[:, top:top + h, left:left + w] = torch.from_numpy(noise).to(pixels.dtype)
            return pixels
    return pixels


def deit_train_image(img: Image.Image, image_processor, size: tuple[int, int],
                     rng: np.random.Generator) -> torch.Tensor:
    """One training image through DeiT's per-sample pipeline: (3, H, W) normalised pixels."""
    crop = padded_random_crop if max(size) <= SMALL_INPUT else random_resized_crop
    img = crop(img, size, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = rand_augment(img, rng, fill_colour(image_processor))
    return random_erase(normalize(image_processor, [img])[0], rng)


def mix_pairs(pixels: torch.Tensor, indices: Sequence[int], seed: int, epoch: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup / cutmix of consecutive pairs: ``(mixed pixels, partner (B,), weight (B,))``.

    Sample ``2k`` and ``2k + 1`` are mixed with each other under one weight ``lam`` (of its own
    image; drawn from ``(seed, epoch, both indices)``): mixup (Beta(0.8, 0.8)) or, half the time,
    cutmix (Beta(1, 1), then ``lam`` = the share of the image left uncut). An odd batch's last
    sample is its own partner with weight 1.
    """
    out = pixels.clone()
    n, (_, height, width) = pixels.shape[0], pixels.shape[1:]
    partner, weight = torch.arange(n), torch.ones(n)
    for a in range(0, n - 1, 2):
        b = a + 1
        rng = sample_rng(seed, epoch, "mix", indices[a], indices[b])
        if rng.random() < SWITCH_PROB:
            lam = rng.beta(CUTMIX_ALPHA, CUTMIX_ALPHA)
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(height * cut), int(width * cut)
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
            out[a, :, y0:y1, x0:x1] = pixels[b, :, y0:y1, x0:x1]
            out[b, :, y0:y1, x0:x1] = pixels[a, :, y0:y1, x0:x1]
            lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)
        else:
            lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
            out[a] = lam * pixels[a] + (1 - lam) * pixels[b]
            out[b] = lam * pixels[b] + (1 - lam) * pixels[a]
        partner[a], partner[b] = b, a
        weight[a] = weight[b] = lam
    return out, partner, weight


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


__all__ = ["AUGMENT_CHOICES", "LABEL_SMOOTHING", "RAND_OPS", "center_crop_eval", "check_augment",
           "deit_train_image", "fill_colour", "input_size", "mix_pairs", "normalize", "padded_random_crop",
           "rand_augment", "random_erase", "random_resized_crop", "sample_rng", "soft_targets"]
