"""A small synthetic segmentation dataset (coloured shapes on noisy backgrounds) in the ADE20K folder layout.

Deterministic: the same arguments give byte-identical PNGs. Layout::

    <root>/images/{training,validation}/toy_XXXX.png        RGB
    <root>/annotations/{training,validation}/toy_XXXX.png   uint8 labels 0..3 (0 = background)
    <root>/meta.json                                        classes, palette, sizes, seed

``meta.json`` also marks the folder as this generator's output: rerunning with the same arguments keeps it,
and nothing else (another toy dataset, any other non-empty folder or a file) is replaced without
``overwrite=True``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from PIL import Image

from internvit.fileio import atomic_write

GENERATOR = "internvit toy segmentation"
TOY_CLASSES = ("background", "disc", "square", "triangle")
TOY_PALETTE = ((0, 0, 0), (220, 60, 60), (60, 200, 80), (70, 90, 230))
# each shape class has its own hue family (jittered per shape), so colour and shape both carry the class
_BASE_COLOURS = {1: (210, 70, 60), 2: (70, 190, 80), 3: (70, 90, 220)}


def _shape_mask(kind: int, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 2:
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # upright triangle: apex at top, base at the bottom
    top, bottom = cy - r, cy + r * 0.8
    half = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def render_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 HxWx3, label uint8 HxW)`` pair."""
    base = rng.uniform(70, 180) + rng.uniform(-25, 25, size=3)  # greyish, lightly tinted
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))
    img = base + gy[..., None] * slope[0] + gx[..., None] * slope[1]
    img = img + rng.normal(0, 18, size=(h, w, 3))
    label = np.zeros((h, w), np.uint8)
    side = min(h, w)
    for _ in range(int(rng.integers(2, 5))):
        kind = int(rng.integers(1, 4))
        r = rng.uniform(0.12, 0.25) * side
        cy, cx = rng.uniform(r * 0.6, h - r * 0.6), rng.uniform(r * 0.6, w - r * 0.6)
        mask = _shape_mask(kind, h, w, cy, cx, r)
        colour = np.clip(np.array(_BASE_COLOURS[kind]) + rng.normal(0, 15, size=3), 0, 255)
        img[mask] = colour + rng.normal(0, 12, size=(int(mask.sum()), 3))
        label[mask] = kind
    return np.clip(img, 0, 255).astype(np.uint8), label


def _existing_meta(root: str) -> Optional[dict]:
    """The ``meta.json`` of a toy dataset this module wrote at ``root``, else None."""
    try:
        with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("classes") != list(TOY_CLASSES):
        return None
    if meta.get("generator", GENERATOR) != GENERATOR:
        return None
    return meta


def make_toy_seg_dataset(root: str, *, num_train: int = 96, num_val: int = 16, train_size: tuple = (112, 112),
                         val_size: tuple = (120, 150), seed: int = 0, overwrite: bool = False) -> str:
    """Write the dataset to ``root`` (atomically: built in a temporary folder, then renamed). Returns ``root``.

    ``val_size`` (h, w) is deliberately not a multiple of 14, so evaluation exercises the test-time resize and
    slide inference. If ``root`` already holds the same toy dataset it is kept as it is; a missing or empty
    folder is written; anything else (a toy dataset with other arguments, any other non-empty folder, a
    file) raises ``FileExistsError`` unless ``overwrite=True``, which replaces it.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    sizes = [tuple(int(v) for v in train_size), tuple(int(v) for v in val_size)]
    if any(len(hw) != 2 or min(hw) < 8 for hw in sizes):
        raise ValueError(f"train_size and val_size must be (h, w) with h, w >= 8, got {train_size}, {val_size}")
    params = dict(num_train=num_train, num_val=num_val, train_size=list(train_size), val_size=list(val_size),
                  seed=seed)
    if os.path.lexists(root) and not overwrite:
        meta = _existing_meta(root) if os.path.isdir(root) else None
        if meta is not None and {k: meta.get(k) for k in params} == params:
            return root  # this very dataset, already complete (it was renamed into place whole)
        if meta is not None:
            raise FileExistsError(f"{root}: holds a toy dataset made with other arguments "
                                  f"(pass --overwrite / overwrite=True to replace it)")
        if not os.path.isdir(root) or os.path.islink(root) or os.listdir(root):
            what = "a folder that is not a toy dataset" if os.path.isdir(root) else "not a folder"
            raise FileExistsError(f"{root}: exists and is {what}; refusing to replace it "
                                  f"(pass --overwrite / overwrite=True)")
    with atomic_write(root, is_dir=True) as tmp:
        rng = np.random.default_rng(seed)
        for split, n, (h, w) in (("training", num_train, train_size), ("validation", num_val, val_size)):
            os.makedirs(os.path.join(tmp, "images", split))
            os.makedirs(os.path.join(tmp, "annotations", split))
            for i in range(n):
                img, label = render_sample(rng, h, w)
                Image.fromarray(img).save(os.path.join(tmp, "images", split, f"toy_{i:04d}.png"))
                Image.fromarray(label).save(os.path.join(tmp, "annotations", split, f"toy_{i:04d}.png"))
        meta = dict(generator=GENERATOR, classes=list(TOY_CLASSES), palette=[list(p) for p in TOY_PALETTE],
                    **params)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    return root
