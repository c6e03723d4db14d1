"""Shapes world scenes: the vocabulary, objects, their placement and relations, and rendering.

Part of :mod:`upop.data.shapes` (which re-exports every name here); scenes are drawn from a
given ``random.Random``, never the global RNG.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from upop.errors import ConfigError, show

VERSION = 1
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS: dict[str, str] = {k: (k + "es" if k.endswith("s") else k + "s") for k in KINDS}
COLOURS: dict[str, tuple[int, int, int]] = {"red": (215, 35, 35), "green": (35, 155, 55), "blue": (35, 75, 215),
                                            "yellow": (225, 190, 15), "purple": (135, 55, 175),
                                            "orange": (240, 125, 20)}
SIZES: tuple[str, ...] = ("small", "large")
RADIUS: dict[str, float] = {"small": 0.085, "large": 0.16}
"""Object radius as a fraction of the image side, per size."""
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512
REL_MARGIN = 0.08
"""Smallest centre offset (image fraction) along an axis for a relation to be stated."""
_REGION_DEAD_ZONE = 0.03
_NUMBERS = {1: "one", 2: "two", 3: "three"}
_TEMPLATE_WORDS = (
    "a an the is and one two three single just there picture image of that to left right above "
    "below with its it in on at top bottom middle next shapes objects between including"
).split()
# words of VQA questions and answers and of NLVR2 statements (upop.data.shapes_vl)
_QUESTION_WORDS = "what colour shape how many are or both images yes no".split()
VOCABULARY: list[str] = sorted(set(_TEMPLATE_WORDS) | set(_QUESTION_WORDS) | set(KINDS) | set(PLURALS.values())
                               | set(COLOURS) | set(SIZES))
"""Every word any Shapes text (caption, question, answer, statement) can contain, sorted."""


@dataclass
class ShapeObject:
    """One shape: ``x``, ``y`` are its centre in [0, 1] image coordinates (y grows downwards)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float


@dataclass
class Scene:
    """A list of non-overlapping objects drawn in order over a plain RGB background."""

    objects: list[ShapeObject]
    background: tuple[int, int, int] = (235, 235, 235)


# ----------------------------------------------------------------------------- scenes


def make_scene(rng: random.Random) -> Scene:
    """Draw a random scene of 1-3 non-overlapping objects (more often 2 or 3) from ``rng``."""
    n = rng.choices((1, 2, 3), weights=(0.2, 0.45, 0.35))[0]
    grey = rng.randint(205, 248)
    background = tuple(min(255, max(0, grey + rng.randint(-4, 4))) for _ in range(3))
    while True:  # restart the layout if an object finds no free spot
        objects: list[ShapeObject] = []
        while len(objects) < n and (obj := _place(rng, rng.choice(SIZES), objects)) is not None:
            objects.append(obj)
        if len(objects) == n:
            return Scene(objects=objects, background=background)  # type: ignore[arg-type]


def _place(rng: random.Random, size: str, others: list[ShapeObject]) -> ShapeObject | None:
    """Try to place one object of ``size`` clear of ``others``; None after 100 misses."""
    r = RADIUS[size]
    for _ in range(100):
        x, y = rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03)
        if all(((x - o.x) ** 2 + (y - o.y) ** 2) ** 0.5 >= r + RADIUS[o.size] + 0.03 for o in others):
            return ShapeObject(rng.choice(KINDS), rng.choice(list(COLOURS)), size, round(x, 4), round(y, 4))
    return None


def spatial_relations(a: ShapeObject, b: ShapeObject) -> list[str]:
    """Relations that clearly hold for ``a`` relative to ``b``: 'left', 'right', 'above', 'below'.

    An axis relation is stated only when the centre offset on that axis is at least
    :data:`REL_MARGIN` and at least half the offset on the other axis.
    """
    dx, dy = b.x - a.x, b.y - a.y
    out = []
    if abs(dx) >= max(REL_MARGIN, 0.5 * abs(dy)):
        out.append("left" if dx > 0 else "right")
    if abs(dy) >= max(REL_MARGIN, 0.5 * abs(dx)):
        out.append("above" if dy > 0 else "below")
    return out


def region(obj: ShapeObject) -> str | None:
    """Region phrase ('in the top left', 'at the bottom', 'in the middle', ...) or None near a border."""
    def band(v: float, names: tuple[str, str, str]) -> str | None:
        lo, hi, d = 1 / 3, 2 / 3, _REGION_DEAD_ZONE
        if v < lo - d:
            return names[0]
        if lo + d < v < hi - d:
            return names[1]
        return names[2] if v > hi + d else None

    h, v = band(obj.x, ("left", "center", "right")), band(obj.y, ("top", "middle", "bottom"))
    if h is None or v is None:
        return None
    if v == "middle":
        return "in the middle" if h == "center" else f"on the {h}"
    return f"at the {v}" if h == "center" else f"in the {v} {h}"


# ----------------------------------------------------------------------------- rendering


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape in pixels; None for a circle (drawn as an ellipse)."""
    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(start + 2 * math.pi * k / n),
                 cy + radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    if kind == "circle":
        return None
    if kind == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(px, py + 0.15 * r) for px, py in ring(3, 1.1 * r, -math.pi / 2)]
    if kind == "star":
        outer, inner = ring(5, 1.1 * r, -math.pi / 2), ring(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "cross":
        w = 0.32 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ConfigError(f"shape kind {kind!r} is unknown (allowed: {', '.join(KINDS)})")


def check_int(where: str, name: str, value, lo: int, hi: int | None = None) -> int:
    """Return ``value`` if it is an int in [lo, hi], else raise a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(f"{where}: {name}={show(value)} is not allowed (need {allowed})")
    return value


def _check_scene(scene: Scene, image_size: int) -> None:
    check_int("render", "image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    for i, o in enumerate(scene.objects):
        if o.kind not in KINDS or o.colour not in COLOURS or o.size not in SIZES:
            raise ConfigError(f"scene object {i} has kind={o.kind!r} colour={o.colour!r} size={o.size!r} "
                              f"(allowed kinds {list(KINDS)}, colours {list(COLOURS)}, sizes {list(SIZES)})")
        if not (0.0 <= o.x <= 1.0 and 0.0 <= o.y <= 1.0):
            raise ConfigError(f"scene object {i} has centre ({o.x}, {o.y}) (need x and y in [0, 1])")


def render_with_mask(scene: Scene, image_size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """Render ``scene`` and return ``(RGB image, mask)``.

    ``mask`` is a ``uint8`` array of shape ``(image_size, image_size)``: 0 is background and
    ``i + 1`` is ``scene.objects[i]``. The image is drawn supersampled and downscaled for smooth
    edges; the mask is downscaled from the same drawing with nearest-neighbour sampling.
    """
    _check_scene(scene, image_size)
    scale = max(1, min(4, 1024 // image_size))
    side = image_size * scale
    img = Image.new("RGB", (side, side), tuple(scene.background))
    mask = Image.new("L", (side, side), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for i, obj in enumerate(scene.objects):
        cx, cy, r = obj.x * side, obj.y * side, RADIUS[obj.size] * side
        pts = _shape_points(obj.kind, cx, cy, r)
        for d, fill in ((draw, COLOURS[obj.colour]), (mdraw, i + 1)):
            if pts is None:
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                d.polygon(pts, fill=fill)
    if scale > 1:
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        mask = mask.resize((image_size, image_size), Image.Resampling.NEAREST)
    return img, np.asarray(mask, dtype=np.uint8).copy()


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Render ``scene`` as an ``image_size`` x ``image_size`` RGB image."""
    return render_with_mask(scene, image_size)[0]


# ----------------------------------------------------------------------------- captions
