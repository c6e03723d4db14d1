"""Segmentation training augmentation: the mmseg ADE20K pipeline Segmenter trains with.

Segmenter (rstrudel/segmenter ``segm/data/config/ade20k.py``) uses mmseg's pipeline at crop
size ``S`` (512; here the model's input size, from the image processor):

1. :func:`random_resize`: a ratio ``r ~ U(0.5, 2)``; the image is rescaled, aspect kept, to fit
   in ``(4 S r, S r)`` (long side, short side): bilinear for the image, nearest for the labels;
2. :func:`random_crop`: an ``S x S`` window (or the whole side when shorter), checked and re-drawn
   up to 10 times until at least two classes are in it and none covers 75% or more of its
   labelled pixels (``cat_max_ratio`` 0.75; after 10 checks the last draw is kept);
3. a horizontal flip with probability 0.5;
4. :func:`photometric_distortion` (mmseg's ``PhotoMetricDistortion``): brightness +-32, contrast
   x U(0.5, 1.5) before or after saturation x U(0.5, 1.5) and hue +-18 (OpenCV units, 2 degrees
   each), each with probability 0.5; HSV is computed in floating point here;
5. the processor's rescale and normalisation, then padding to ``S x S`` on the bottom and right
   with 0 (the image, normalised) and 255 (ignored labels).

Random draws come from :func:`upop.data.augment.sample_rng` seeded by (seed, epoch, sample index).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from upop.data.augment import normalize, sample_rng

IGNORE_INDEX = 255
RESIZE_RATIO, LONG_SIDE_FACTOR = (0.5, 2.0), 4
CAT_MAX_RATIO, CROP_TRIES = 0.75, 10
BRIGHTNESS, CONTRAST, SATURATION, HUE = 32.0, (0.5, 1.5), (0.5, 1.5), 18


def random_resize(image: Image.Image, label: Image.Image, size: int, rng: np.random.Generator):
    """``(image, label)`` rescaled by a random ratio of the ``(4 size, size)`` scale, aspect kept."""
    r = rng.uniform(*RESIZE_RATIO)
    width, height = image.size
    factor = min(LONG_SIDE_FACTOR * size * r / max(width, height), size * r / min(width, height))
    new = (max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5)))
    return image.resize(new, Image.Resampling.BILINEAR), label.resize(new, Image.Resampling.NEAREST)


def random_crop(image: np.ndarray, label: np.ndarray, size: int, rng: np.random.Generator):
    """A ``size x size`` crop (sides shorter than ``size`` kept whole) with ``cat_max_ratio`` 0.75."""
    height, width = label.shape

    def draw():
        top = int(rng.integers(0, max(height - size, 0) + 1))
        left = int(rng.integers(0, max(width - size, 0) + 1))
        return slice(top, top + size), slice(left, left + size)

    box = draw()
    for _ in range(CROP_TRIES):
        values, counts = np.unique(label[box], return_counts=True)
        counts = counts[values != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
        box = draw()
    return image[box], label[box]


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 255] -> HSV with hue in degrees [0, 360), saturation and value in [0, 1]."""
    rgb = rgb / 255.0
    value, low = rgb.max(-1), rgb.min(-1)
    delta = value - low
    sat = np.where(value > 0, delta / np.maximum(value, 1e-12), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-12)
    hue = np.where(value == r, (g - b) / safe % 6, np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(delta > 0, hue * 60.0, 0.0) % 360.0
    return np.stack([hue, sat, value], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_hsv` (RGB in [0, 255])."""
    hue, sat, value = hsv[..., 0] / 60.0, hsv[..., 1], hsv[..., 2]

    def channel(n):
        k = (n + hue) % 6
        return value - value * sat * np.clip(np.minimum(k, 4 - k), 0, 1)

    return np.stack([channel(5), channel(3), channel(1)], -1) * 255.0


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on an (H, W, 3) uint8 RGB array (see the module docstring)."""
    img = image.astype(np.float32)

    def clip(x):
        return np.clip(x, 0, 255)

    if rng.integers(2):
        img = clip(img + rng.uniform(-BRIGHTNESS, BRIGHTNESS))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = clip(img * rng.uniform(*CONTRAST))
    saturate, shift_hue = bool(rng.integers(2)), None
    saturation = rng.uniform(*SATURATION) if saturate else None
    if rng.integers(2):
        shift_hue = int(rng.integers(-HUE, HUE)) * 2.0  # OpenCV hue units are 2 degrees
    if saturate or shift_hue is not None:
        hsv = rgb_to_hsv(img)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
        if shift_hue is not None:
            hsv[..., 0] = (hsv[..., 0] + shift_hue) % 360.0
        img = clip(hsv_to_rgb(hsv))
    if not contrast_first and rng.integers(2):
        img = clip(img * rng.uniform(*CONTRAST))
    return np.rint(img).astype(np.uint8)


def segmentation_train_sample(image: Image.Image, label: Image.Image, image_processor, size: int, seed: int,
                              epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels (3, size, size), labels (size, size) long)`` of one sample through the pipeline."""
    rng = sample_rng(seed, epoch, index)
    image, label = random_resize(image, label, size, rng)
    pixels, labels = random_crop(np.asarray(image), np.asarray(label), size, rng)
    if rng.random() < 0.5:
        pixels, labels = pixels[:, ::-1], labels[:, ::-1]
    pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
    values = normalize(image_processor, [Image.fromarray(pixels, mode="RGB")])[0]
    labels = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
    pad = (0, size - labels.shape[1], 0, size - labels.shape[0])
    return F.pad(values, pad, value=0.0), F.pad(labels, pad, value=IGNORE_INDEX)


__all__ = ["hsv_to_rgb", "photometric_distortion", "random_crop", "random_resize", "rgb_to_hsv",
           "segmentation_train_sample"]
