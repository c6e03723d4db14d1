"""The one image loader: every Pillow mode users' files come in decodes to the right RGB, EXIF
orientation is applied, annotation maps keep their ids, and bad files (bombs, truncated, not an
image, odd paths) are refused with one escaped line naming the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import upop.data.images as images
from upop.data.images import load_label_map, load_rgb_image, probe_image
from upop.errors import DataError, show

RAMP = np.arange(256)  # 8-bit levels a 16-bit ramp v * 257 must come back as


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _sixteen_bit(tmp: Path) -> Path:
    values = np.tile((RAMP * 257).astype(np.uint16), (4, 1))  # 0 .. 65535 across 256 columns
    return _save(Image.fromarray(values), tmp / "ramp16.png")


def _int32(tmp: Path) -> Path:
    return _save(Image.fromarray(np.tile((RAMP * 257).astype(np.int32), (4, 1))), tmp / "ramp32.tif")


def _palette(tmp: Path) -> Path:
    img = Image.new("P", (4, 2))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 1)
    return _save(img, tmp / "palette.png")


def _palette_transparent(tmp: Path) -> Path:
    img = Image.new("P", (4, 2), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    return _save(img, tmp / "palette_t.png", transparency=0)


def _cmyk(tmp: Path) -> Path:
    return _save(Image.new("CMYK", (4, 2), (0, 255, 255, 0)), tmp / "cmyk.tif")


def _rgba(tmp: Path) -> Path:
    img = Image.new("RGBA", (4, 2), (0, 0, 255, 255))
    img.putpixel((0, 0), (255, 0, 0, 0))    # fully transparent red -> white
    img.putpixel((1, 0), (0, 0, 0, 128))    # half transparent black -> mid grey
    return _save(img, tmp / "rgba.png")


def _la(tmp: Path) -> Path:
    img = Image.new("LA", (4, 2), (100, 255))
    img.putpixel((0, 0), (0, 0))
    return _save(img, tmp / "la.png")


def _grey(tmp: Path) -> Path:
    return _save(Image.new("L", (4, 2), 77), tmp / "grey.png")


def _one_bit(tmp: Path) -> Path:
    img = Image.new("1", (4, 2), 1)
    img.putpixel((0, 0), 0)
    return _save(img, tmp / "bits.png")


# case -> (writer, expected (width, height), {(x, y): RGB} pixels to check)
MODES = {
    "16-bit grey PNG keeps its gradient": (_sixteen_bit, (256, 4), {(x, 0): (x, x, x) for x in (0, 1, 128, 254, 255)}),
    "32-bit int holding 16-bit values": (_int32, (256, 4), {(x, 0): (x, x, x) for x in (0, 77, 255)}),
    "palette": (_palette, (4, 2), {(0, 0): (10, 200, 30), (1, 0): (0, 0, 0)}),
    "palette with a transparent index": (_palette_transparent, (4, 2), {(0, 0): (255, 255, 255),
                                                                        (1, 0): (10, 200, 30)}),
    "CMYK": (_cmyk, (4, 2), {(0, 0): (255, 0, 0)}),
    "RGBA composited on white": (_rgba, (4, 2), {(0, 0): (255, 255, 255), (1, 0): (127, 127, 127),
                                                 (2, 0): (0, 0, 255)}),
    "LA composited on white": (_la, (4, 2), {(0, 0): (255, 255, 255), (1, 0): (100, 100, 100)}),
    "grey": (_grey, (4, 2), {(3, 1): (77, 77, 77)}),
    "1-bit": (_one_bit, (4, 2), {(0, 0): (0, 0, 0), (1, 0): (255, 255, 255)}),
}


@pytest.mark.parametrize("case", sorted(MODES))
def test_each_mode_decodes_to_the_right_rgb(case, tmp_path):
    write, size, pixels = MODES[case]
    path = write(tmp_path)
    img = load_rgb_image(path)
    assert img.mode == "RGB" and img.size == size == probe_image(path)
    for xy, rgb in pixels.items():
        assert img.getpixel(xy) == pytest.approx(rgb, abs=1), (xy, img.getpixel(xy))


def test_sixteen_bit_gradient_is_scaled_not_clipped(tmp_path):
    red = np.asarray(load_rgb_image(_sixteen_bit(tmp_path)))[0, :, 0]
    assert np.array_equal(red, RAMP)  # all 256 levels, in order: not all white, not clipped at 255


def _oriented(tmp: Path, suffix: str) -> Path:
    """A 40x20 image with a red top-left corner, stored with EXIF orientation 6 (display: 90 deg clockwise)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, tmp / f"rotated{suffix}", exif=exif.tobytes())


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_rotation_gives_the_displayed_image(suffix, tmp_path):
    path = _oriented(tmp_path, suffix)
    img = load_rgb_image(path)
    assert img.size == (20, 40) == probe_image(path)
    red, blue = img.getpixel((17, 2)), img.getpixel((2, 37))  # stored top-left is displayed top-right
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]


def _label_map(mode: str, tmp: Path) -> Path:
    wide = mode == "I;16"
    values = np.array([[0, 1, 2], [3, 300 if wide else 7, 1]], dtype=np.uint16 if wide else np.uint8)
    img = Image.fromarray(values) if wide else Image.fromarray(values, mode="L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette([255, 0, 0, 0, 255, 0] * 128)  # colours must not matter: the index is the id
    return _save(img, tmp / f"mask_{mode.replace(';', '')}.png")


@pytest.mark.parametrize("mode, top_right", [("L", 2), ("P", 2), ("I;16", 2)])
def test_label_maps_keep_their_ids(mode, top_right, tmp_path):
    values = load_label_map(_label_map(mode, tmp_path))
    assert values.shape == (2, 3) and values[0, 2] == top_right and values[0, 0] == 0
    assert values[1, 1] == (300 if mode == "I;16" else 7)


def _png_with_size(tmp: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width x height`` (the shape of a decompression bomb)."""
    raw = bytearray(_save(Image.new("L", (8, 8)), tmp / "bomb.png").read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    (tmp / "bomb.png").write_bytes(bytes(raw))
    return tmp / "bomb.png"


def _bomb(tmp: Path, monkeypatch) -> tuple[Path, str]:
    return _png_with_size(tmp, 100_000, 100_000), "decompression bomb"


def _over_our_limit(tmp: Path, monkeypatch) -> tuple[Path, str]:
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    return _save(Image.new("RGB", (20, 20)), tmp / "big.png"), "400 pixels"


def _truncated(tmp: Path, monkeypatch) -> tuple[Path, str]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    raw = _save(Image.fromarray(noise), tmp / "full.png").read_bytes()
    (tmp / "cut.png").write_bytes(raw[: len(raw) // 2])
    return tmp / "cut.png", "truncated"


def _not_an_image(tmp: Path, monkeypatch) -> tuple[Path, str]:
    (tmp / "notes.png").write_text("hello")
    return tmp / "notes.png", "not an image"


def _newline_name(tmp: Path, monkeypatch) -> tuple[Path, str]:
    path = tmp / "two\nlines\x1b[31m.png"
    path.write_bytes(b"garbage")
    return path, "two\\nlines\\x1b[31m.png"


def _nul_in_path(tmp: Path, monkeypatch) -> tuple[Path, str]:
    return tmp / "nul\x00name.png", "nul\\x00name.png"


def _missing(tmp: Path, monkeypatch) -> tuple[Path, str]:
    return tmp / "gone.png", "does not exist"


def _unsupported_mode(tmp: Path, monkeypatch) -> tuple[Path, str]:
    return _save(Image.new("F", (4, 4), 0.5), tmp / "float.tif"), "mode 'F'"


BAD = {"decompression bomb": _bomb, "over upop's pixel limit": _over_our_limit, "truncated PNG": _truncated,
       "text file": _not_an_image, "newline and escape in the name": _newline_name, "NUL in the path": _nul_in_path,
       "missing file": _missing, "float image": _unsupported_mode}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("read", [probe_image, load_rgb_image])
def test_bad_files_are_one_escaped_line_naming_the_file(case, read, tmp_path, monkeypatch):
    path, needle = BAD[case](tmp_path, monkeypatch)
    with pytest.raises(DataError) as info:
        read(path)
    message = str(info.value)
    assert show(path) in message and needle in message, message
    assert message.isprintable(), message  # no raw newline, NUL or terminal escape


def test_colour_annotation_is_refused(tmp_path):
    path = _save(Image.new("RGB", (4, 4), (120, 0, 0)), tmp_path / "colour_mask.png")
    for read in (load_label_map, lambda p: probe_image(p, "annotation", labels=True)):
        with pytest.raises(DataError, match="colour"):
            read(path)


@pytest.mark.parametrize("value, expected", [
    (Path("a\nb"), "'a\\nb'"), ("x\x00y", "'x\\x00y'"), ("tab\there", "'tab\\there'"),
    ("\u2028", "'\\u2028'"), (3, "3"), ("z" * 300, "'" + "z" * 199 + "..."),
])
def test_show_escapes_user_values(value, expected):
    assert show(value) == expected
