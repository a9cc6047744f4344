"""Image decoding: every PIL mode a camera, scanner or web page produces comes out as the right 8-bit RGB.

Each case writes a real file in its native format (PNG, GIF, JPEG, TIFF) and reads it back through
``load_image`` (the path every task uses), or, for modes no format writes, converts an in-memory image with
``to_rgb`` (the rule the transforms apply to PIL images handed in directly).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from internvit.data import ALPHA_BACKGROUND, load_image, to_rgb
from internvit.transforms import build_transform

WHITE = ALPHA_BACKGROUND


def _rgb(img) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def _saved(tmp_path, img, name, **kw) -> np.ndarray:
    path = tmp_path / name
    img.save(path, **kw)
    return _rgb(load_image(str(path)))


def test_alpha_background_is_white():
    assert WHITE == (255, 255, 255)


def test_mode_1(tmp_path):
    img = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    out = _saved(tmp_path, img, "bw.png")
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_mode_L(tmp_path):
    out = _saved(tmp_path, Image.new("L", (3, 2), 100), "grey.png")
    assert (out == 100).all()


def test_mode_LA_composited_on_white(tmp_path):
    a = np.zeros((1, 3, 2), np.uint8)
    a[0, :, 0] = 0                  # black ...
    a[0, :, 1] = [0, 255, 128]     # ... fully transparent, opaque, half
    out = _saved(tmp_path, Image.fromarray(a, "LA"), "la.png")
    assert out[0, 0].tolist() == [255, 255, 255]   # transparent black shows the background, not black
    assert out[0, 1].tolist() == [0, 0, 0]
    assert abs(int(out[0, 2, 0]) - 127) <= 1      # 0 * 128/255 + 255 * 127/255


def _palette_image() -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    return img


def test_mode_P_without_transparency(tmp_path):
    out = _saved(tmp_path, _palette_image(), "p.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 255]


def test_mode_P_with_transparency(tmp_path):
    out = _saved(tmp_path, _palette_image(), "pt.png", transparency=1)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_mode_RGB(tmp_path):
    a = np.array([[[1, 2, 3], [250, 128, 7]]], np.uint8)
    assert (_saved(tmp_path, Image.fromarray(a), "rgb.png") == a).all()


def test_mode_RGBA_composited_on_white(tmp_path):
    a = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 51]]], np.uint8)
    out = _saved(tmp_path, Image.fromarray(a, "RGBA"), "rgba.png")
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert all(abs(int(v) - 204) <= 1 for v in out[0, 2])   # 20 % black over white


def test_rgb_png_with_transparent_colour(tmp_path):
    a = np.array([[[10, 20, 30], [1, 2, 3]]], np.uint8)
    out = _saved(tmp_path, Image.fromarray(a), "trns.png", transparency=(10, 20, 30))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [1, 2, 3]


def test_mode_CMYK(tmp_path):
    img = Image.new("CMYK", (2, 2), (0, 255, 255, 0))   # red
    out = _saved(tmp_path, img, "cmyk.tif")
    assert (out == [255, 0, 0]).all()


def test_mode_CMYK_jpeg(tmp_path):
    out = _saved(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "cmyk.jpg", quality=95)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 8


def test_mode_YCbCr(tmp_path):
    img = Image.new("RGB", (16, 16), (200, 30, 40)).convert("YCbCr")
    assert img.mode == "YCbCr"
    assert np.abs(_rgb(to_rgb(img)).astype(int) - [200, 30, 40]).max() <= 3
    out = _saved(tmp_path, img, "ycbcr.jpg", quality=95)
    assert np.abs(out.astype(int) - [200, 30, 40]).max() <= 8


@pytest.mark.parametrize("value,expected", [(0, 0), (257, 1), (32768, 128), (65535, 255)])
def test_16bit_grayscale_png(tmp_path, value, expected):
    a = np.full((3, 4), value, np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = _saved(tmp_path, img, "g16.png")
    assert (out == expected).all(), out[0, 0]


def test_16bit_png_is_not_white(tmp_path):
    """The reported case: a typical 16-bit photo-range PNG used to read as an all-white image."""
    a = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out = _saved(tmp_path, Image.fromarray(a), "ramp16.png")
    assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16bit_modes_in_memory(mode):
    a = np.array([[0, 257, 65535]], np.uint16)
    img = Image.frombytes(mode, (3, 1), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert _rgb(to_rgb(img))[0, :, 0].tolist() == [0, 1, 255]


def test_16bit_tiff(tmp_path):
    img = Image.frombytes("I;16B", (2, 1), np.array([[1000, 65535]], ">u2").tobytes())
    out = _saved(tmp_path, img, "g16.tif")
    assert out[0, :, 0].tolist() == [4, 255]   # round(1000 / 257) = 4


def test_mode_I_32bit(tmp_path):
    img = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    assert img.mode == "I"
    assert _rgb(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]
    assert _saved(tmp_path, img, "i32.tif")[0, :, 0].tolist() == [0, 128, 255]
    # data beyond the 16-bit range is min-max scaled, not clipped to white
    wide = Image.fromarray(np.array([[-100, 0, 1_000_000]], np.int32))
    assert _rgb(to_rgb(wide))[0, :, 0].tolist() == [0, 0, 255]


def test_float_tiff(tmp_path):
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert img.mode == "F"
    assert _saved(tmp_path, img, "f.tif")[0, :, 0].tolist() == [0, 128, 255]
    # outside [0, 1]: min-max scaled; NaN counts as 0
    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], np.float32))
    assert _saved(tmp_path, wide, "fw.tif")[0, :, 0].tolist() == [0, 128, 255, 128]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_48bit_rgb_png(tmp_path):
    """16 bits per channel RGB (PIL reads it as 8-bit RGB)."""
    px = np.array([[[65535, 0, 32896], [0, 65535, 0]]], ">u2")  # 32896 = 128 * 257
    raw = b"".join(b"\x00" + row.tobytes() for row in px)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    path = tmp_path / "rgb48.png"
    path.write_bytes(png)
    out = _rgb(load_image(str(path)))
    assert out[0, 0].tolist() == [255, 0, 128] and out[0, 1].tolist() == [0, 255, 0]


def test_gif_palette_and_animated_first_frame(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    assert (_saved(tmp_path, red.convert("P"), "still.gif") == [255, 0, 0]).all()
    path = tmp_path / "anim.gif"
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 2
    assert (_rgb(load_image(str(path))) == [255, 0, 0]).all()


def test_gif_transparency(tmp_path):
    img = _palette_image()
    out = _saved(tmp_path, img, "t.gif", transparency=0)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 255]


def _halves(w: int = 32, h: int = 16) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = [255, 0, 0]
    a[:, w // 2:] = [0, 0, 255]
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation,size,red_at,blue_at", [
    (1, (32, 16), (8, 4), (8, 28)),     # upright: red left, blue right (points are (row, col))
    (6, (16, 32), (4, 8), (28, 8)),     # stored sideways, rotate 90 deg clockwise: red on top
    (8, (16, 32), (28, 8), (4, 8)),     # rotate 90 deg counter-clockwise: red at the bottom
    (3, (32, 16), (8, 28), (8, 4)),     # upside down: red right
])
def test_exif_orientation(tmp_path, orientation, size, red_at, blue_at):
    img = _halves()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(str(path))
    assert out.size == size
    a = _rgb(out).astype(int)
    assert np.abs(a[red_at] - [255, 0, 0]).max() < 40, a[red_at]
    assert np.abs(a[blue_at] - [0, 0, 255]).max() < 40, a[blue_at]


@pytest.mark.parametrize("mode", ["RGBX", "LAB", "HSV", "La", "RGBa", "PA"])
def test_other_modes_convert(mode):
    base = Image.new("RGBA", (2, 2), (10, 200, 30, 255))
    if mode == "La":
        img = base.convert("LA").convert("La")
    elif mode in ("LAB", "HSV"):
        img = base.convert("RGB").convert(mode)
    else:
        img = base.convert(mode)
    assert img.mode == mode
    out = _rgb(to_rgb(img)).astype(int)
    expected = [base.convert("L").getpixel((0, 0))] * 3 if mode in ("La", "PA") else [10, 200, 30]
    if mode == "PA":
        expected = list(base.convert("P").convert("RGB").getpixel((0, 0)))
    tolerance = 10 if mode == "LAB" else 3  # the sRGB <-> LAB round trip through ImageCms is not exact
    assert np.abs(out - expected).max() <= tolerance, (out[0, 0], expected)


def test_transform_uses_same_rule_for_in_memory_images():
    """A 16-bit PIL image given directly to the transform is scaled, not clipped to white."""
    t = build_transform(None, image_size=14, mean=[0, 0, 0], std=[1, 1, 1])
    img = Image.fromarray(np.full((20, 20), 32768, np.uint16))
    x = t(img)
    assert abs(float(x.mean()) - 128 / 255) < 1e-3


@pytest.mark.parametrize("bad", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_bad_files_raise(tmp_path, bad):
    path = tmp_path / "bad.png"
    path.write_bytes(bad)
    with pytest.raises((OSError, ValueError)):
        load_image(str(path))
