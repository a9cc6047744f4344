"""Preprocessing presets shared by every task (feature extraction, zero-shot, retrieval, probes)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from .config import IMAGENET_MEAN, IMAGENET_STD, InternViTConfig, InternVLConfig, check_mean_std
from .tiling import dynamic_tiles, tile_grid  # noqa: F401 - public here (issue 13)

_MODES = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
          "nearest": T.InterpolationMode.NEAREST}


def preprocess_config(config=None, *, image_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None, interpolation: Optional[str] = None,
                      resize_mode: str = "crop") -> dict:
    """The preprocessing of a model (from its config), with any field overridden. Plain data, JSON-ready.

    ``None`` keeps the config's value (224 px, ImageNet mean/std, bicubic without a config); any value given
    is used as it is and checked by :func:`check_preprocess` (``image_size=0`` is an error, not the default).
    """
    vc = config.vision_config if isinstance(config, InternVLConfig) else config
    if vc is not None and not isinstance(vc, InternViTConfig):
        raise TypeError(f"expected a model config, got {type(config).__name__}")
    out = dict(
        image_size=image_size if image_size is not None else (vc.image_size if vc else 224),
        mean=mean if mean is not None else (vc.image_mean if vc else IMAGENET_MEAN),
        std=std if std is not None else (vc.image_std if vc else IMAGENET_STD),
        interpolation=interpolation if interpolation is not None else (vc.interpolation if vc else "bicubic"),
        resize_mode=resize_mode,
    )
    return check_preprocess(out)


def check_preprocess(p: dict) -> dict:
    """Validate (and normalise to plain ints / float lists) a preprocessing dict; returns it.

    Raises ``ValueError`` naming the field: ``image_size`` an integer >= 1, ``mean`` three finite numbers,
    ``std`` three finite numbers > 0, ``interpolation`` one of bicubic/bilinear/nearest, ``resize_mode``
    crop/squash.
    """
    p = dict(p)
    size = p.get("image_size")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {size!r}")
    p["image_size"] = int(size)
    for key in ("mean", "std"):
        v = p.get(key)
        check_mean_std(key, v)
        p[key] = [float(x) for x in v]
    if p.get("interpolation") not in _MODES:
        raise ValueError(f"interpolation must be one of {sorted(_MODES)}, got {p.get('interpolation')!r}")
    if p.get("resize_mode", "crop") not in ("crop", "squash"):
        raise ValueError(f"resize_mode must be 'crop' (short side + centre crop) or 'squash', "
                         f"got {p.get('resize_mode')!r}")
    return p


def build_transform(config=None, *, train: bool = False, output_dtype: torch.dtype = torch.float32,
                    **overrides) -> T.Compose:
    """PIL image → normalised tensor (or, with ``output_dtype=torch.uint8``, its 8-bit pixels).

    Eval ``resize_mode='crop'``: resize the short side to S (bicubic) and centre-crop S×S (classification,
    HF image processors; :class:`ResizeCenterCrop`). ``'squash'``: resize to S×S (retrieval protocol).
    Train: RandomResizedCrop + flip. ``config`` may be a model config or a dict made by
    :func:`preprocess_config`. The returned callable maps a PIL image to a ``(3, S, S)`` float32 tensor;
    memory and time per image are ``O(source pixels + S²)`` whatever the aspect ratio (a 1×20000 PNG does not
    make a 448 × 8 960 000 intermediate). ``output_dtype=torch.uint8``: the same resized pixels as a ``(3, S, S)``
    uint8 tensor, not normalised (:func:`normalize_pixels` gives the float32 values, bit for bit; loaders that
    normalise on the accelerator move 4x fewer bytes). Raises ``ValueError`` for another ``output_dtype``.
    """
    if output_dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"output_dtype must be torch.float32 (normalised) or torch.uint8 (pixels), got {output_dtype}")
    p = dict(config) if isinstance(config, dict) else preprocess_config(config, **overrides)
    if isinstance(config, dict):
        p = check_preprocess({**p, **{k: v for k, v in overrides.items() if v is not None}})
    size, mode = p["image_size"], _MODES[p["interpolation"]]
    norm = [ToNormalizedTensor(p["mean"], p["std"]) if output_dtype == torch.float32 else ToUInt8Tensor()]
    rgb = T.Lambda(_to_rgb)
    if train:
        return T.Compose([rgb, T.RandomResizedCrop(size, interpolation=mode), T.RandomHorizontalFlip(), *norm])
    if p.get("resize_mode", "crop") == "squash":
        return T.Compose([rgb, T.Resize((size, size), interpolation=mode), *norm])
    return T.Compose([rgb, ResizeCenterCrop(size, mode), *norm])


# ---------------------------------------------------------------------------------------------------
# Resizing with bounded work
# ---------------------------------------------------------------------------------------------------
#: short-side resize + centre crop runs as torchvision's Resize + CenterCrop (the reference pixels) while the
#: long side is at most this many times the short one; beyond, only the crop window is resampled
WORK_FACTOR = 4
_PIL_RESAMPLE = {T.InterpolationMode.BICUBIC: 3, T.InterpolationMode.BILINEAR: 2, T.InterpolationMode.NEAREST: 0}


class ResizeCenterCrop:
    """Resize the short side to ``size`` and centre-crop ``size × size``; PIL image in, PIL image out.

    Up to an aspect ratio of :data:`WORK_FACTOR` this is ``T.Compose([T.Resize(size, interpolation),
    T.CenterCrop(size)])`` itself. A thinner image would be resized to ``size × size·aspect`` first (a 1×20000
    PNG at 448 px: a 448 × 8 960 000 image, 12 GB); instead Pillow resamples only the crop window, given as a
    source box (``Image.resize(..., box=)``: the same resized long side ``int(size·long/short)`` and crop
    offset ``round((resized − size) / 2)``; its filter still reads the source pixels around the box), so work
    is ``O(source + size²)`` and pixels are within a few levels of the full resize (Pillow takes the box in
    float32). ``interpolation``: a ``torchvision`` ``InterpolationMode`` (bicubic, bilinear, nearest).
    """

    def __init__(self, size: int, interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC) -> None:
        self.size, self.interpolation = int(size), interpolation

    def __call__(self, img):
        s = self.size
        w, h = img.size
        if min(w, h) == 0 or max(w, h) <= WORK_FACTOR * min(w, h):
            return F.center_crop(F.resize(img, [s], self.interpolation), [s, s])
        long = max(w, h)
        rw, rh = (s, int(s * long / w)) if w <= h else (int(s * long / h), s)
        left, top = int(round((rw - s) / 2.0)), int(round((rh - s) / 2.0))
        sx, sy = w / rw, h / rh
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        return img.resize((s, s), _PIL_RESAMPLE[self.interpolation], box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


def _chw_uint8(img) -> torch.Tensor:
    """8-bit RGB PIL image → its ``(3, H, W)`` uint8 view (``ValueError`` for any other mode)."""
    if getattr(img, "mode", None) != "RGB":
        raise ValueError(f"expected an 8-bit RGB image, got mode {getattr(img, 'mode', type(img).__name__)!r}")
    w, h = img.size
    if w * h == 0:
        return torch.empty((3, h, w), dtype=torch.uint8)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


_NORM_CONSTANTS: dict = {}


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(pixels / 255 - mean) / std`` as a new contiguous float32 tensor on ``pixels``' device.

    ``pixels``: uint8 ``(3, H, W)`` or ``(B, 3, H, W)``. The torchvision ``ToTensor`` + ``Normalize`` formula
    and operation order, each step a correctly rounded float32 division / subtraction by a tensor (not a
    multiplication by a reciprocal, which CUDA's scalar path does), so the values are the same bits on every
    device. Raises ``ValueError`` for a dtype other than uint8 or a channel dimension other than 3.
    """
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"pixels must be a torch.Tensor, got {type(pixels).__module__}.{type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    for name, v in (("mean", mean), ("std", std)):
        if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 3:
            raise ValueError(f"{name} must be three numbers (one per channel), got {v!r}")
    if any(not float(x) > 0 for x in std):  # 0 (or NaN) gave inf / NaN pixels silently
        raise ValueError(f"std must be three numbers > 0, got {list(std)!r}")
    if pixels.ndim not in (3, 4) or pixels.shape[-3] != 3:
        raise ValueError(f"pixels must be (3, H, W) or (B, 3, H, W), got {tuple(pixels.shape)}")
    key = (pixels.device, tuple(float(x) for x in mean), tuple(float(x) for x in std))
    consts = _NORM_CONSTANTS.get(key)
    if consts is None:
        consts = _NORM_CONSTANTS[key] = tuple(
            torch.tensor(v, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
            for v in ([255.0], key[1], key[2]))
    scale, m, s = consts
    x = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device).copy_(pixels)
    return x.div_(scale).sub_(m).div_(s)


class ToUInt8Tensor:
    """8-bit RGB PIL image → ``(3, H, W)`` uint8 tensor, contiguous: the pixels :class:`ToNormalizedTensor`
    normalises, for a loader that normalises on the accelerator (:func:`normalize_pixels`). Raises
    ``ValueError`` for an image that is not 8-bit RGB."""

    def __call__(self, img) -> torch.Tensor:
        return _chw_uint8(img).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToNormalizedTensor:
    """8-bit RGB PIL image → ``(3, H, W)`` float32 tensor ``(x / 255 - mean) / std``, contiguous.

    The same values, bit for bit, as ``T.Compose([T.ToTensor(), T.Normalize(mean, std)])`` (the same three
    float32 operations in the same order, :func:`normalize_pixels`), in one uint8 → float32 pass and in-place
    arithmetic instead of torchvision's copies: 3.3x faster at 56 px, 1.6x at 224 px (measured on the 2-core
    CPU; the search service prepares each query image alone, so this is on its per-query path). Raises
    ``ValueError`` for an image that is not 8-bit RGB (the transforms convert with
    :func:`internvit.data.to_rgb` first).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = [float(x) for x in mean]
        self.std = [float(x) for x in std]

    def __call__(self, img) -> torch.Tensor:
        return normalize_pixels(_chw_uint8(img), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _to_rgb(img):
    from .data import to_rgb  # one conversion rule for files and in-memory images (16-bit, alpha, ...)

    return to_rgb(img)
