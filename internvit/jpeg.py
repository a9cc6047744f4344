"""Fast JPEG decoding through ``torchvision.io.decode_jpeg`` (libjpeg-turbo), pixel-identical to PIL's.

:func:`load_jpeg_rgb` is the fast path of :func:`internvit.data.load_image`: it decodes only plain JPEGs whose
result is known to equal PIL's — colour (``RGB``, i.e. YCbCr) or greyscale (``L``), no Adobe marker, no EXIF
rotation — and returns ``None`` for everything else (CMYK, Adobe-marked files, other formats, rotated photos,
any decoding error), which PIL then reads exactly as before. Whether torchvision and PIL decode alike on this
installation (both use the default integer IDCT and fancy upsampling of libjpeg-turbo, but each bundles its
own copy) is checked once per process on generated baseline and progressive, 4:4:4 / 4:2:2 / 4:2:0 and
greyscale JPEGs; if any pixel differs, or torchvision's image extension is missing, the fast path stays off.

It is **off unless** ``INTERNVIT_JPEG=torchvision`` is set: on the development machine (2-core AVX-512 CPU)
torchvision's decoder took the same time as PIL's (both libjpeg-turbo, ~13 ms for a 640x480 photo under load)
and the extra copy into a PIL image made ``load_image`` slower, so PIL stays the default.
``bench/bench_extract.py`` prints both costs so the choice can be re-made on another machine.
"""
from __future__ import annotations

import io
import os
import threading
from typing import Optional

__all__ = ["load_jpeg_rgb", "fast_jpeg_available"]

_EXIF_ORIENTATION = 0x0112
_SOI = b"\xff\xd8\xff"
_lock = threading.Lock()
_available: Optional[bool] = None


def _decode(data: bytes):
    """``(H, W, 3)`` uint8 NumPy array of a JPEG through torchvision (raises on any decoding error)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return t.permute(1, 2, 0).contiguous().numpy()


def _self_check() -> bool:
    """Whether torchvision decodes like PIL here: a few generated JPEGs, every pixel compared."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:53].astype(np.float32)
    img = np.stack([127 + 90 * np.sin(xx * 0.2 * (c + 1) + yy * 0.13) for c in range(3)], -1)
    img = Image.fromarray((img + rng.normal(0, 20, img.shape)).clip(0, 255).astype(np.uint8))
    cases = [(img, dict(subsampling=s, progressive=p)) for s in (0, 1, 2) for p in (False, True)]
    cases += [(img.convert("L"), dict(progressive=p)) for p in (False, True)]
    for im, kw in cases:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85, **kw)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as ref:
            want = np.asarray(ref.convert("RGB"))
        got = _decode(data)
        if got.shape != want.shape or not np.array_equal(got, want):
            return False
    return True


def fast_jpeg_available() -> bool:
    """Whether :func:`load_jpeg_rgb` decodes: ``INTERNVIT_JPEG=torchvision`` set, torchvision present and
    pixel-identical to PIL here (checked once per process)."""
    global _available
    if _available is None:
        with _lock:
            if _available is None:
                if os.environ.get("INTERNVIT_JPEG", "pil").lower() != "torchvision":
                    _available = False
                else:
                    try:
                        _available = _self_check()
                    except Exception:  # noqa: BLE001 - no torchvision image extension, ...: PIL only
                        _available = False
    return _available


def load_jpeg_rgb(path) -> Optional["PIL.Image.Image"]:  # noqa: F821
    """An 8-bit ``RGB`` PIL image of the JPEG at ``path`` decoded by torchvision, or ``None``.

    ``None`` (read it with PIL instead) unless the file is a JPEG of mode ``RGB`` or ``L`` without an Adobe
    marker or an EXIF orientation other than 1, and torchvision decodes it without error; the pixels are those
    PIL gives for the same file (``Image.open(path).convert('RGB')``). Never raises for a bad file: ``None``.
    """
    if not isinstance(path, (str, os.PathLike)) or not fast_jpeg_available():
        return None
    try:
        from PIL import Image

        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(_SOI):
            return None
        with Image.open(io.BytesIO(data)) as head:  # header only: format, mode, EXIF
            if head.format != "JPEG" or head.mode not in ("RGB", "L") or "transparency" in head.info:
                return None
            if "adobe" in head.info:  # an Adobe colour transform marker (e.g. RGB stored without YCbCr)
                return None
            if head.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
                return None
            size = head.size
        arr = _decode(data)
        if (arr.shape[1], arr.shape[0]) != size:
            return None
        return Image.fromarray(arr)  # (H, W, 3) uint8: mode RGB
    except Exception:  # noqa: BLE001 - PIL reads it (and raises what it raises for a bad file)
        return None

