"""The one place that opens users' image files: photos as RGB, annotation maps as label ids.

Every reader (retrieval, VQA, NLVR2, ImageFolder, ADE20K) and ``upop data check`` go through
these functions, so an image means the same thing everywhere:

* EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`): a photo is seen the way a
  viewer shows it, and its size is the displayed size.
* Modes become RGB deliberately: ``RGB``; ``L``, ``1``, ``P`` (palette), ``CMYK``, ``YCbCr``
  through Pillow's converters; 16-bit grayscale (``I;16*``, and ``I`` holding 0..65535) scaled
  to 8 bits (``v / 257``, so 65535 is white; values are not clipped); images with transparency
  (``RGBA``, ``LA``, ``PA``, premultiplied ``La``/``RGBa``, or a ``transparency`` key) are
  composited on white. Other modes (``F``, ``LAB``, ``HSV``, ...) are refused.
* Images larger than :data:`MAX_IMAGE_PIXELS` are refused as possible decompression bombs,
  and so is anything Pillow itself flags as one.
* Annotation maps (:func:`load_label_map`) are read as the stored integers, never colour
  converted: ``L``, ``P`` (the palette index is the id), ``1`` and 16-bit ``I``/``I;16*``.
  RGB (colour-coded) maps are refused.

Every failure is a one-line :class:`~upop.errors.DataError` naming the file (escaped with
:func:`~upop.errors.show`) and what is wrong, also when a file changes on disk after
``upop data check`` passed.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from upop.errors import DataError, show
from upop.data._files import kind_of, not_a_file

MAX_IMAGE_PIXELS = 89_478_485
"""Largest ``width * height`` upop decodes (Pillow's default bomb-warning threshold, ~9459^2)."""

_TO_RGB = ("RGB", "1", "L", "P", "CMYK", "YCbCr")
_WITH_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")
IMAGE_MODES: tuple[str, ...] = _TO_RGB + _WITH_ALPHA + _SIXTEEN_BIT
"""Pillow modes :func:`load_rgb_image` turns into RGB."""
LABEL_MODES: tuple[str, ...] = ("L", "P", "1") + _SIXTEEN_BIT
"""Pillow modes :func:`load_label_map` reads as class ids."""

_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError,
                Image.DecompressionBombWarning)
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees


def _read_error(path, what: str, exc: BaseException) -> DataError:
    """The one-line DataError for an exception met while opening or decoding ``path``."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{what} {show(path)} does not exist")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{what} {show(path)} is a directory (need an image file)")
    if isinstance(exc, UnidentifiedImageError):
        return DataError(f"{what} {show(path)} is not an image Pillow can read (need PNG, JPEG, ...)")
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return DataError(f"{what} {show(path)} is refused as a possible decompression bomb ({show(str(exc))}); "
                         f"upop decodes images of at most {MAX_IMAGE_PIXELS:,} pixels")
    if isinstance(exc, PermissionError):
        return DataError(f"{what} {show(path)} cannot be opened: permission denied")
    return DataError(f"{what} {show(path)} cannot be read ({type(exc).__name__}: {show(str(exc))}); "
                     "the file is damaged or truncated")


def _check_header(img: Image.Image, path, what: str, modes: tuple[str, ...]) -> None:
    if img.mode not in modes:
        if modes == LABEL_MODES and img.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
            raise DataError(f"{what} {show(path)} is a colour ({img.mode}) image; need a single-channel map of "
                            f"class ids (mode L, P or I;16), not colour-coded classes")
        raise DataError(f"{what} {show(path)} has Pillow mode {show(img.mode)}, which upop does not read "
                        f"(supported: {', '.join(modes)})")
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{what} {show(path)} is {width}x{height} = {width * height:,} pixels, more than upop's "
                        f"limit of {MAX_IMAGE_PIXELS:,}; refused as a possible decompression bomb")


def _open_regular(path, what: str):
    """``path`` opened for binary reading if it is a regular file; a folder, FIFO, device or
    symbolic link loop is a one-line DataError saying what it is (a FIFO is never opened for
    reading: it would block; ``/dev/zero`` would never end)."""
    problem = not_a_file(path)
    if problem:
        raise DataError(f"{what} {show(path)} {problem}" + ("" if problem.startswith("does not") else
                                                           " (need an image file)"))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced since the check above
        os.close(fd)
        raise DataError(f"{what} {show(path)} {kind_of(mode)}, not a regular file (need an image file)")
    return os.fdopen(fd, "rb")


@contextmanager
def _opened(path, what: str, modes: tuple[str, ...]) -> Iterator[Image.Image]:
    """``path`` opened (header parsed and checked); any failure inside becomes a DataError."""
    if "\x00" in os.fspath(path):
        raise DataError(f"{what} {show(path)} has a NUL character in its path, which no file name can hold")
    try:
        with _open_regular(path, what) as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                _check_header(img, path, what, modes)
                yield img
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise _read_error(path, what, exc) from None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image, 1 when it has none or it cannot be parsed."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # Pillow would decode the whole PNG to look for a late eXIf chunk
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _READ_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(img: Image.Image) -> Image.Image:
    """A loaded image with its EXIF orientation applied (itself when upright or the EXIF is
    unreadable); callers turn it into a new image or array before the file is closed."""
    if _orientation(img) == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except _READ_ERRORS:
        return img


def probe_image(path, what: str = "image file", labels: bool = False) -> tuple[int, int]:
    """``(width, height)`` as upop will see the image, from its header only (fast).

    Checks that the file opens, has a supported mode (:data:`IMAGE_MODES`, or :data:`LABEL_MODES`
    for ``labels=True``) and is within :data:`MAX_IMAGE_PIXELS`, and lets Pillow verify what it
    can without decoding (PNG chunk checksums and a complete chunk sequence; a JPEG's pixel data
    is only checked by a full decode, :func:`load_rgb_image`).
    """
    with _opened(path, what, LABEL_MODES if labels else IMAGE_MODES) as img:
        width, height = img.size
        swap = _orientation(img) in _SWAPS_SIDES
        img.verify()
    return (height, width) if swap else (width, height)


def _sixteen_bit_to_l(img: Image.Image, path, what: str) -> Image.Image:
    """A 16-bit grayscale image scaled to 8 bits: ``round(v / 257)``, 0 -> 0 and 65535 -> 255."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"{what} {show(path)} has 32-bit integer pixels in [{values.min()}, {values.max()}]; "
                        "upop reads integer grayscale images as 16-bit (0..65535)")
    return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, path, what: str) -> Image.Image:
    """A loaded image of any :data:`IMAGE_MODES` mode as RGB (see the module docstring)."""
    if img.mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_l(img, path, what).convert("RGB")
    if img.mode in _WITH_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb_image(path, what: str = "image file") -> Image.Image:
    """Decode ``path`` fully (truncation is detected), upright, as an RGB image; else a DataError."""
    with _opened(path, what, IMAGE_MODES) as img:
        img.load()
        return _to_rgb(_upright(img), path, what)


def load_label_map(path, what: str = "annotation") -> np.ndarray:
    """Decode a single-channel annotation map into an ``int64`` array of its stored values."""
    with _opened(path, what, LABEL_MODES) as img:
        img.load()
        return np.asarray(_upright(img)).astype(np.int64)


__all__ = ["IMAGE_MODES", "LABEL_MODES", "MAX_IMAGE_PIXELS", "load_label_map", "load_rgb_image", "probe_image"]
