"""Odd inputs with a bounded cost: very thin images (resize work), hard links and non-UTF-8 file names."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from internvit import tiling
from internvit.data import ImageDataset, list_images
from internvit.transforms import ResizeCenterCrop, build_transform, preprocess_config

MODES = [T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR, T.InterpolationMode.NEAREST]


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def bounded_pil(monkeypatch):
    """Image.resize that fails (instead of allocating) when asked for an output of more than ``budget``
    pixels."""
    real = Image.Image.resize
    state = {"budget": None}

    def guarded(self, size, resample=None, box=None, reducing_gap=None):
        if state["budget"] is not None and size[0] * size[1] > state["budget"]:
            raise MemoryError(f"resize {self.size} -> {tuple(size)}: {size[0] * size[1]} pixels")
        return real(self, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", guarded)
    return state


# -- thin images: work bounded by the output, not the aspect ratio ---------------------------------------------
@pytest.mark.parametrize("size", [(1, 2000), (2000, 1), (1, 20000), (3, 50000), (50000, 2)])
@pytest.mark.parametrize("mode", ["crop", "squash"])
def test_thin_image_work_is_bounded(bounded_pil, size, mode):
    """The report: a 1×2000 PNG at 448 px resized its short side first: a 448 × 896 000 image (1.6 GB)."""
    s = 448
    bounded_pil["budget"] = s * s
    x = build_transform(preprocess_config(None, image_size=s, resize_mode=mode))(_noise(*size))
    assert x.shape == (3, s, s) and torch.isfinite(x).all()


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (2, 30000)])
def test_thin_image_tiles_are_bounded(bounded_pil, size):
    s = 448
    bounded_pil["budget"] = 12 * s * s  # the canvas of at most max_num tiles
    tiles = tiling.dynamic_tiles(_noise(*size), max_num=12)
    assert len(tiles) == 13 and all(t.size == (s, s) for t in tiles)


def _thin_sizes():
    rng = np.random.default_rng(7)
    out = [(1, 200), (200, 1), (5, 21), (21, 5), (3, 13), (40, 161), (161, 40), (17, 920), (640, 24), (92, 1400)]
    for _ in range(30):
        short = int(rng.integers(1, 90))
        long = int(rng.integers(4 * short + 1, 40 * short + 10))
        out.append((short, long) if rng.random() < 0.5 else (long, short))
    return out


@pytest.mark.parametrize("interp", MODES, ids=lambda m: m.value)
def test_thin_images_match_resize_then_crop(interp):
    """Beyond an aspect ratio of 4 only the crop window is resampled (a source box). On pixel noise, the worst
    case, Pillow's intermediate rounding (its pass order) differs from the full resize's: bilinear stays within
    1 level, bicubic (whose overshoot is clipped) moves a few percent of the pixels by more; a smooth image is
    the same to 1 level. (Before: the full 448 × 896 000 resize of a 1×2000 strip.)"""
    far = []
    for w, h in _thin_sizes():
        for s in (7, 16, 32):
            img = _noise(w, h, seed=w * 7 + h)
            ref = np.asarray(T.CenterCrop(s)(T.Resize(s, interpolation=interp)(img)), dtype=np.int16)
            ours = np.asarray(ResizeCenterCrop(s, interp)(img), dtype=np.int16)
            assert ours.shape == ref.shape == (s, s, 3)
            d = np.abs(ours - ref)
            if interp == T.InterpolationMode.BILINEAR:
                assert d.max() <= 1, (w, h, s)
            far.append(float((d > 1).mean()))
    assert np.mean(far) < (0.02 if interp == T.InterpolationMode.BICUBIC else 0.1), np.mean(far)
    ramp = Image.fromarray((np.linspace(0, 255, 3000)[:, None, None] * np.ones((1, 5, 3))).astype(np.uint8))
    ref = np.asarray(T.CenterCrop(224)(T.Resize(224, interpolation=interp)(ramp)), dtype=np.int16)
    assert np.abs(np.asarray(ResizeCenterCrop(224, interp)(ramp), dtype=np.int16) - ref).max() <= 1


def test_normal_images_are_bit_identical_to_torchvision():
    """Aspect ratios up to 4 take torchvision's own Resize + CenterCrop."""
    for w, h in [(64, 64), (130, 90), (90, 130), (256, 64), (64, 256), (300, 76), (17, 31), (500, 375)]:
        img = _noise(w, h, seed=w + h)
        for interp in MODES:
            crop = T.Compose([T.Resize(56, interpolation=interp), T.CenterCrop(56)])(img)
            assert np.array_equal(np.asarray(ResizeCenterCrop(56, interp)(img)), np.asarray(crop))


# -- file names that are not UTF-8 -----------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX byte file names")
def test_non_utf8_file_name_is_listed_and_read(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"bad\xff.png")
    try:
        _noise(8, 6).save(raw, format="PNG")
    except OSError:
        pytest.skip("the file system refuses non-UTF-8 names")
    name = os.fsdecode(raw)  # 'bad\udcff.png', as os.listdir gives it
    assert list_images(str(tmp_path)) == [name]
    x, i, err = ImageDataset([name], build_transform(None, image_size=14))[0]
    assert err is None and x.shape == (3, 14, 14)
    item, _, err = tiling.TileDataset([name], max_num=2, image_size=14)[0]
    assert err is None and item["pixel_values"].shape[1:] == (3, 14, 14)
    assert tiling.tile_counts([name], max_num=2, image_size=14) == [item["pixel_values"].shape[0]]
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"bad\xff.png\n")  # a list file holding the raw bytes: same path as the folder listing
    assert list_images(str(lst)) == [name]
