"""Preprocessing presets shared by every task (feature extraction, zero-shot, retrieval, probes)."""
from __future__ import annotations

from typing import Optional, Sequence

from torchvision import transforms as T

from .config import IMAGENET_MEAN, IMAGENET_STD, InternViTConfig, InternVLConfig
from .tiling import dynamic_tiles, tile_grid  # noqa: F401 - public here (issue 13)

_MODES = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
          "nearest": T.InterpolationMode.NEAREST}


def preprocess_config(config=None, *, image_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None, interpolation: Optional[str] = None,
                      resize_mode: str = "crop") -> dict:
    """The preprocessing of a model (from its config), with any field overridden. Plain data, JSON-ready."""
    vc = config.vision_config if isinstance(config, InternVLConfig) else config
    if vc is not None and not isinstance(vc, InternViTConfig):
        raise TypeError(f"expected a model config, got {type(config).__name__}")
    out = dict(
        image_size=int(image_size or (vc.image_size if vc else 224)),
        mean=list(mean or (vc.image_mean if vc else IMAGENET_MEAN)),
        std=list(std or (vc.image_std if vc else IMAGENET_STD)),
        interpolation=interpolation or (vc.interpolation if vc else "bicubic"),
        resize_mode=resize_mode,
    )
    if out["interpolation"] not in _MODES:
        raise ValueError(f"interpolation must be one of {sorted(_MODES)}, got {out['interpolation']!r}")
    if resize_mode not in ("crop", "squash"):
        raise ValueError(f"resize_mode must be 'crop' (short side + centre crop) or 'squash', got {resize_mode!r}")
    return out


def build_transform(config=None, *, train: bool = False, **overrides) -> T.Compose:
    """PIL image → normalised tensor.

    Eval ``resize_mode='crop'``: resize the short side to S (bicubic) and centre-crop S×S (classification,
    HF image processors). ``'squash'``: resize to S×S (retrieval protocol). Train: RandomResizedCrop + flip.
    ``config`` may be a model config or a dict made by :func:`preprocess_config`.
    """
    p = dict(config) if isinstance(config, dict) else preprocess_config(config, **overrides)
    if isinstance(config, dict) and overrides:
        p.update({k: v for k, v in overrides.items() if v is not None})
    size, mode = p["image_size"], _MODES[p["interpolation"]]
    norm = [T.ToTensor(), T.Normalize(p["mean"], p["std"])]
    rgb = T.Lambda(_to_rgb)
    if train:
        return T.Compose([rgb, T.RandomResizedCrop(size, interpolation=mode), T.RandomHorizontalFlip(), *norm])
    if p.get("resize_mode", "crop") == "squash":
        return T.Compose([rgb, T.Resize((size, size), interpolation=mode), *norm])
    return T.Compose([rgb, T.Resize(size, interpolation=mode), T.CenterCrop(size), *norm])


def _to_rgb(img):
    from .data import to_rgb  # one conversion rule for files and in-memory images (16-bit, alpha, ...)

    return to_rgb(img)
