"""load_image's opt-in torchvision JPEG path gives PIL's pixels exactly; everything else still goes through PIL."""
import numpy as np
import pytest
from PIL import Image, ImageOps

from internvit import jpeg
from internvit.data import load_image, to_rgb
from internvit.transforms import build_transform


def _photo(h=97, w=131, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(xx * 0.05 * (c + 1) + yy * 0.03) for c in range(3)], -1)
    return Image.fromarray((img + rng.normal(0, 15, img.shape)).clip(0, 255).astype(np.uint8))


@pytest.fixture
def fast(monkeypatch):
    """The torchvision path switched on (it is opt-in); skips where it is unavailable here."""
    monkeypatch.setenv("INTERNVIT_JPEG", "torchvision")
    monkeypatch.setattr(jpeg, "_available", None)
    if not jpeg.fast_jpeg_available():
        pytest.skip("torchvision's JPEG decoder is unavailable or differs from PIL here (PIL is used)")


def _pil_reference(path):
    """What load_image gave before the fast path: PIL decode, EXIF rotation, to_rgb."""
    with Image.open(path) as img:
        img.load()
        if img.getexif().get(0x0112, 1) not in (1, None):
            img = ImageOps.exif_transpose(img)
        return np.asarray(to_rgb(img))


FAST = {  # name -> save(path): JPEGs the fast path decodes
    "baseline_420": lambda p: _photo().save(p, "JPEG", quality=90),
    "baseline_444": lambda p: _photo().save(p, "JPEG", quality=95, subsampling=0),
    "baseline_422": lambda p: _photo().save(p, "JPEG", quality=75, subsampling=1),
    "progressive": lambda p: _photo().save(p, "JPEG", quality=90, progressive=True),
    "progressive_444": lambda p: _photo().save(p, "JPEG", quality=90, progressive=True, subsampling=0),
    "optimized_q30": lambda p: _photo().save(p, "JPEG", quality=30, optimize=True),
    "grayscale": lambda p: _photo().convert("L").save(p, "JPEG", quality=90),
    "grayscale_progressive": lambda p: _photo().convert("L").save(p, "JPEG", quality=90, progressive=True),
    "odd_size_1px": lambda p: _photo(1, 1).save(p, "JPEG"),
}


def _rotated(p):
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo().save(p, "JPEG", quality=90, exif=exif)


PIL_ONLY = {  # name -> save(path): read by PIL (load_jpeg_rgb returns None)
    "cmyk": lambda p: _photo().convert("CMYK").save(p, "JPEG", quality=90),
    "exif_rotated": _rotated,
    "png_named_jpg": lambda p: _photo().save(p, "PNG"),
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_path_pixels_equal_pil(tmp_path, name, fast):
    path = str(tmp_path / f"{name}.jpg")
    FAST[name](path)
    fast = jpeg.load_jpeg_rgb(path)
    assert fast is not None and fast.mode == "RGB"  # the fast path really decoded it
    ref = _pil_reference(path)
    assert np.array_equal(np.asarray(fast), ref)
    assert np.array_equal(np.asarray(load_image(path)), ref)
    t = build_transform({"image_size": 56, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "interpolation": "bicubic", "resize_mode": "crop"})
    assert (t(load_image(path)) - t(Image.fromarray(ref))).abs().max() == 0


@pytest.mark.parametrize("name", sorted(PIL_ONLY))
def test_other_images_go_through_pil(tmp_path, name, fast):
    path = str(tmp_path / f"{name}.jpg")
    PIL_ONLY[name](path)
    assert jpeg.load_jpeg_rgb(path) is None
    got = np.asarray(load_image(path))
    assert got.shape[2] == 3 and np.array_equal(got, _pil_reference(path))
    if name == "exif_rotated":
        assert got.shape[:2] == (131, 97)  # upright


def test_bad_files_raise_as_before(tmp_path, fast):
    good = tmp_path / "good.jpg"
    _photo().save(good, "JPEG", quality=90)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_image(str(truncated))
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    with pytest.raises(OSError):
        load_image(str(text))
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.jpg"))
    assert jpeg.load_jpeg_rgb(str(truncated)) is None


def test_file_objects_and_default_off(tmp_path, monkeypatch, fast):
    path = tmp_path / "a.jpg"
    _photo().save(path, "JPEG", quality=90)
    with open(path, "rb") as f:  # file objects: PIL, same pixels
        assert np.array_equal(np.asarray(load_image(f)), _pil_reference(str(path)))
    for value in (None, "pil", "PIL", "other"):  # opt-in: anything but 'torchvision' keeps PIL
        if value is None:
            monkeypatch.delenv("INTERNVIT_JPEG")
        else:
            monkeypatch.setenv("INTERNVIT_JPEG", value)
        monkeypatch.setattr(jpeg, "_available", None)
        assert not jpeg.fast_jpeg_available() and jpeg.load_jpeg_rgb(str(path)) is None
        assert np.array_equal(np.asarray(load_image(str(path))), _pil_reference(str(path)))


def test_self_check_is_the_gate(monkeypatch):
    """A decoder that differs from PIL by one value in one pixel turns the fast path off."""
    real = jpeg._decode

    def off_by_one(data):
        a = real(data).copy()
        a[0, 0, 0] ^= 1
        return a

    monkeypatch.setenv("INTERNVIT_JPEG", "torchvision")
    monkeypatch.setattr(jpeg, "_decode", off_by_one)
    monkeypatch.setattr(jpeg, "_available", None)
    assert jpeg.fast_jpeg_available() is False
