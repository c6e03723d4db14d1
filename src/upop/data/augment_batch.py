"""DeiT's training augmentation on a whole batch, with torch ops on the batch's device.

The collator (:func:`upop.data.augment.deit_params`) crops each image to the model's input size
and draws every random choice of the recipe from the sample's generator ``(seed, epoch, index)``;
the batch carries the 8-bit crops and those choices as small tensors (the ``aug_*`` entries,
``mix_partner`` and ``mix_weight``, each with the batch as its first dimension). Here the pixel
work runs on the batch at once, on whatever device it is on (:func:`deit_batch`), in this order:

1. horizontal flip;
2. RandAugment: two layers; in each, the samples that drew the same op are processed together
   (the five geometric ops share one bicubic ``grid_sample``). The ops reproduce Pillow's as timm
   calls them, on 8-bit values: the colour ops exactly (AutoContrast, Equalize, Invert,
   Posterize, Solarize, SolarizeAdd, and the Color / Contrast / Brightness / Sharpness blends),
   the geometric ops (Rotate, ShearX/Y, TranslateX/YRel) with Pillow's coordinates and fill
   (points mapped outside the image take the processor's mean colour) but torch's bicubic
   kernel (a = -0.75, Pillow's is -0.5), so they differ from Pillow by a few levels at edges;
3. the processor's rescale and normalisation;
4. random erasing: the drawn box filled with N(0, 1) noise that is a hash of (the sample's noise
   seed, channel, position in the box): the same on every device and in every batch;
5. mixup / cutmix of consecutive pairs with the drawn weights and boxes.

Every sample's result depends only on its own entries (and its partner's, for mixing), so a
batch is the same whether one process augments 2B samples or two processes B each (B even).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from upop.data.augment import AUG_KEYS, GEOMETRIC_OPS, RA_OPS
from upop.measure.host_sync import host_value

_GEOMETRIC = tuple(RA_OPS.index(name) for name in GEOMETRIC_OPS)
_MASK32 = 0xFFFFFFFF
#: the draws that choose which work is done (groups of ops, erased samples and box sizes): read on the host
_READ_ON_HOST = ("aug_op", "aug_erase")


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, img, factor)`` on 8-bit values (clipped, truncated)."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (img - degenerate)).clamp(0, 255).floor()


def _grey(img: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion, (N, 1, H, W), exact on 8-bit values."""
    weighted = img[:, 0:1] * 19595 + img[:, 1:2] * 38470 + img[:, 2:3] * 7471 + 32768
    return torch.floor(weighted / 65536)


def _lookup(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-channel tables ``lut`` (N, 3, 256) applied to 8-bit values ``img`` (N, 3, H, W)."""
    flat = img.flatten(2).long()
    return lut.to(img.dtype).gather(2, flat).view_as(img)


def _histograms(img: torch.Tensor) -> torch.Tensor:
    """(N, 3, 256) int64 counts of each channel's 8-bit values."""
    n = img.shape[0] * 3
    flat = img.reshape(n, -1).long() + 256 * torch.arange(n, device=img.device).view(n, 1)
    return torch.bincount(flat.flatten(), minlength=256 * n).view(img.shape[0], 3, 256)


def auto_contrast(img, arg, fill):
    """Pillow's ``ImageOps.autocontrast``: each channel's range stretched to 0..255."""
    hist = _histograms(img)
    values = torch.arange(256, device=img.device)
    present = hist > 0
    lo = torch.where(present, values, 256).amin(-1, keepdim=True).double()
    hi = torch.where(present, values, -1).amax(-1, keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp_min(1)
    lut = torch.trunc(values.double() * scale - lo * scale).clamp(0, 255)  # ix * scale + offset, as Pillow
    return _lookup(img, torch.where(hi > lo, lut, values.double()))


def equalize(img, arg, fill):
    """Pillow's ``ImageOps.equalize``, each channel on its own (its integer table exactly)."""
    hist = _histograms(img)
    values = torch.arange(256, device=img.device)
    last = torch.where(hist > 0, values, -1).amax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist
    lut = ((step // 2 + before) // step.clamp_min(1)).clamp(0, 255)
    distinct = (hist > 0).sum(-1, keepdim=True)
    return _lookup(img, torch.where((step > 0) & (distinct > 1), lut, values))


def invert(img, arg, fill):
    return 255 - img


def posterize(img, bits, fill):
    """Keep the ``bits`` high bits of every value (0 bits: black), as Pillow's ``posterize``."""
    quantum = torch.pow(2.0, 8 - bits).view(-1, 1, 1, 1)
    return torch.floor(img / quantum) * quantum


def solarize(img, threshold, fill):
    return torch.where(img >= threshold.view(-1, 1, 1, 1), 255 - img, img)


def solarize_add(img, add, fill):
    return torch.where(img < 128, (img + add.view(-1, 1, 1, 1)).clamp_max(255), img)


def color(img, factor, fill):
    return _blend(_grey(img).expand_as(img), img, factor)


def contrast(img, factor, fill):
    grey = _grey(img)
    mean = torch.floor(grey.flatten(1).long().sum(1).double() / grey[0].numel() + 0.5).to(img.dtype)
    return _blend(mean.view(-1, 1, 1, 1).expand_as(img), img, factor)


def brightness(img, factor, fill):
    return _blend(torch.zeros_like(img), img, factor)


def sharpness(img, factor, fill):
    """Blend with Pillow's SMOOTH filter (3x3, centre 5, others 1, / 13; the border row and
    column unfiltered), as ``ImageEnhance.Sharpness``."""
    h, w = img.shape[-2:]
    total = sum(img[..., dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
    smooth = img.clone()
    smooth[..., 1:-1, 1:-1] = torch.floor((total + 4 * img[..., 1:-1, 1:-1]) / 13 + 0.5).clamp(0, 255)
    return _blend(smooth, img, factor)


COLOUR_OPS = {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
              "PosterizeIncreasing": posterize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
              "ColorIncreasing": color, "ContrastIncreasing": contrast, "BrightnessIncreasing": brightness,
              "SharpnessIncreasing": sharpness}
"""Op name -> ``op(img (N, 3, H, W) 8-bit values as floats, arg (N,), fill (N, 3))``."""


def affine_matrices(ops: torch.Tensor, args: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 2, 3) maps from output to input pixel coordinates (Pillow's ``AFFINE`` data; a pixel's
    centre is at ``i + 0.5``) of the geometric ops ``ops`` (indices into RA_OPS) at ``args``."""
    k, a = ops.to(args.device), args.double()
    kind = lambda name: k == RA_OPS.index(name)  # noqa: E731
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    shift_x = torch.where(kind("TranslateXRel"), a * width, zero)
    shift_y = torch.where(kind("TranslateYRel"), a * height, zero)
    m = torch.stack([torch.stack([one, torch.where(kind("ShearX"), a, zero), shift_x], -1),
                     torch.stack([torch.where(kind("ShearY"), a, zero), one, shift_y], -1)], 1)
    # Pillow's rotate: counter-clockwise by `a` degrees about the image centre
    theta = -a * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = width / 2.0, height / 2.0
    rot = torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], -1),
                       torch.stack([-sin, cos, cy + sin * cx - cos * cy], -1)], 1)
    return torch.where(kind("Rotate").view(-1, 1, 1), rot, m)


def warp(img: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's ``transform(AFFINE, bicubic, fillcolor)`` of 8-bit values with torch's bicubic kernel."""
    n, _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=img.device, dtype=torch.float32) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    source = (points @ matrices.float().transpose(1, 2)).view(n, h, w, 2)  # input (x, y) of each output pixel
    grid = torch.stack([source[..., 0] * 2 / w - 1, source[..., 1] * 2 / h - 1], -1).to(img.dtype)
    sampled = F.grid_sample(img, grid, mode="bicubic", padding_mode="border", align_corners=False)
    inside = ((source[..., 0] >= 0) & (source[..., 0] < w) & (source[..., 1] >= 0) & (source[..., 1] < h))
    return torch.where(inside.unsqueeze(1), sampled.clamp(0, 255).round(), fill.view(n, 3, 1, 1).to(img.dtype))


def rand_augment(img: torch.Tensor, ops: torch.Tensor, args: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The drawn RandAugment layers: ``ops`` (B, L) indices into RA_OPS (-1: skipped), ``args``
    (B, L) the ops' arguments (timm's mapping of the magnitude, :func:`upop.data.augment.op_argument`).
    The samples are grouped by op on the host: ``ops`` there (the collated draws) costs no wait
    for the device; a device ``ops`` is read back once."""
    picks = ops.cpu()
    for layer in range(picks.shape[1]):
        column = picks[:, layer]
        groups = [(k, (column == k).nonzero().flatten()) for k in column.unique().tolist() if k >= 0]
        geometric = torch.cat([idx for k, idx in groups if k in _GEOMETRIC] or [torch.zeros(0, dtype=torch.long)])
        if geometric.numel():
            at = geometric.to(img.device)
            matrices = affine_matrices(column[geometric], args[at, layer], *img.shape[-2:])
            img[at] = warp(img[at], matrices, fill[at])
        for k, idx in groups:
            if k not in _GEOMETRIC:
                at = idx.to(img.device)
                img[at] = COLOUR_OPS[RA_OPS[k]](img[at], args[at, layer].to(img.dtype), fill[at])
    return img


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of int64 values in [0, 2^32) (products stay below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def erase_noise(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """N(0, 1) values of the shape of ``positions`` (N, ...; non-negative int64), each a pure function of
    its row's seed ``seeds`` (N,) and its position (Box-Muller on two hashed uniforms): the same
    on every device and in every batch."""
    key = _hash32(seeds.view(-1, *[1] * (positions.dim() - 1)) & _MASK32)
    u1, u2 = (((_hash32((_hash32((2 * positions + j) & _MASK32) + key) & _MASK32) >> 8).float() + 0.5) / 2 ** 24
              for j in (0, 1))
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def random_erase(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` (B, 5): top, left, height, width, noise seed; a box of height 0 erases nothing.
    The noise at a box pixel depends on its channel and offset in the box, not on where the box lies.
    The erased samples and the largest box are read on the host: ``boxes`` there (the collated
    draws) costs no wait for the device; a device ``boxes`` is read back once. (Noise for the
    whole image of every sample, with no read, costs about eight times the hashing on a CPU.)"""
    host = boxes.cpu()
    chosen = (host[:, 2] > 0).nonzero().flatten()
    if chosen.numel() == 0:
        return pixels
    _, c, h, w = pixels.shape
    dev = pixels.device
    b = host[chosen].view(-1, 5, 1, 1, 1).to(dev)
    dy = torch.arange(h, device=dev).view(1, 1, h, 1) - b[:, 0]
    dx = torch.arange(w, device=dev).view(1, 1, 1, w) - b[:, 1]
    inside = (dy >= 0) & (dy < b[:, 2]) & (dx >= 0) & (dx < b[:, 3])
    # noise for the largest box's rows and columns only, then read at each pixel's offset in its box
    rows, cols = int(host[:, 2].max()), int(host[:, 3].max())
    grid = ((torch.arange(c, device=dev).view(1, c, 1, 1) * h + torch.arange(rows, device=dev).view(1, 1, rows, 1)) * w
            + torch.arange(cols, device=dev).view(1, 1, 1, cols))
    noise = erase_noise(b[:, 4].flatten(), grid.expand(b.shape[0], c, rows, cols)).flatten(2)
    at = (dy.clamp(0, rows - 1) * cols + dx.clamp(0, cols - 1)).expand(-1, c, h, w).flatten(2)
    noise = noise.gather(2, at).view(-1, c, h, w)
    at = chosen.to(dev)
    pixels[at] = torch.where(inside, noise.to(pixels.dtype), pixels[at])
    return pixels


def mix(pixels: torch.Tensor, partner: torch.Tensor, weight: torch.Tensor, cutmix: torch.Tensor,
        boxes: torch.Tensor) -> torch.Tensor:
    """Mixup (``w * own + (1 - w) * partner's``) or, where ``cutmix``, the partner's pixels inside
    ``boxes`` (B, 4: y0, y1, x0, x1); a sample that is its own partner with weight 1 is unchanged."""
    h, w = pixels.shape[-2:]
    ys, xs = torch.arange(h, device=pixels.device).view(1, h, 1), torch.arange(w, device=pixels.device).view(1, 1, w)
    box = ((ys >= boxes[:, 0].view(-1, 1, 1)) & (ys < boxes[:, 1].view(-1, 1, 1)) &
           (xs >= boxes[:, 2].view(-1, 1, 1)) & (xs < boxes[:, 3].view(-1, 1, 1))).unsqueeze(1)
    own = torch.where(cutmix.view(-1, 1, 1, 1), (~box).to(pixels.dtype), weight.to(pixels.dtype).view(-1, 1, 1, 1))
    return torch.lerp(pixels[partner], pixels, own)  # exact at weights 0 and 1


@torch.no_grad()
def deit_batch(pixels: torch.Tensor, params: dict, mean: torch.Tensor, std: torch.Tensor,
               fill: torch.Tensor) -> torch.Tensor:
    """Normalised float32 pixels (B, 3, H, W) of 8-bit crops ``pixels`` under the drawn ``params``
    (the batch's ``aug_*``, ``mix_partner`` and ``mix_weight`` entries); ``mean``, ``std`` (B, 3)
    or (3,) normalise 8-bit values (``(x - mean) / std``), ``fill`` is the geometric ops' colour.
    Runs on ``pixels.device``; every input is moved there, but ``aug_op`` and ``aug_erase``,
    which choose the work, are read on the host: pass the collated (host) ones and nothing waits
    for the device (:func:`augment_batch` does)."""
    device = pixels.device
    p = {k: v if k in _READ_ON_HOST else v.to(device) for k, v in params.items()}
    n = pixels.shape[0]
    as_rows = lambda t: torch.as_tensor(t, dtype=torch.float32, device=device).expand(n, 3)  # noqa: E731
    img = pixels.to(torch.float32, copy=True)
    img = torch.where(p["aug_flip"].view(n, 1, 1, 1), img.flip(-1), img)
    img = rand_augment(img, p["aug_op"], p["aug_arg"], as_rows(fill))
    img = img.sub_(as_rows(mean).view(n, 3, 1, 1)).div_(as_rows(std).view(n, 3, 1, 1))
    img = random_erase(img, p["aug_erase"])
    return mix(img, p["mix_partner"], p["mix_weight"], p["aug_cutmix"], p["aug_box"])


def augment_batch(batch: dict) -> dict:
    """``batch`` with its 8-bit ``pixel_values`` replaced by the augmented ones (:func:`deit_batch`,
    on the batch's device, float32 even under autocast) and the ``aug_*`` entries dropped; a batch
    without them is returned as it is. The draws that choose the work (``aug_op``, ``aug_erase``)
    are taken from the collated batch (:func:`upop.measure.host_sync.host_value`): no wait for the
    device on a run's batch. The dict is updated in place, so a second loss on the same
    batch (the distillation teacher's) sees the same images without redoing the work."""
    if "aug_op" not in batch:
        return batch
    pixels = batch["pixel_values"]
    params = {k: host_value(batch, k) if k in _READ_ON_HOST else batch[k]
              for k in (*AUG_KEYS, "mix_partner", "mix_weight")}
    with torch.autocast(pixels.device.type, enabled=False):
        out = deit_batch(pixels, params, batch["aug_mean"], batch["aug_std"], batch["aug_fill"])
    for key in AUG_KEYS:
        batch.pop(key, None)
    batch["pixel_values"] = out
    return batch


__all__ = ["COLOUR_OPS", "affine_matrices", "augment_batch", "deit_batch", "erase_noise", "mix", "rand_augment",
           "random_erase", "warp"]
