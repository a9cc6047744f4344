"""Image inputs shared by every task: list the images of a folder / list file, read them robustly.

``list_images`` turns a folder, a ``.txt`` / ``.lst`` list file or a list of paths into a sorted list of
paths; ``ImageDataset`` reads them with PIL and never raises on a bad file — it returns ``None`` plus the
error, and :func:`collate_images` drops such items from the batch while keeping their errors.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS: tuple[str, ...] = (".txt", ".lst")

ImagesLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def is_image_file(path: str) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _read_list_file(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = os.path.expanduser(line)
            out.append(line if os.path.isabs(line) else os.path.join(base, line))
    return out


def list_images(source: ImagesLike) -> list[str]:
    """Image paths of a folder (recursive, sorted), a ``.txt`` / ``.lst`` list file, or a list of paths.

    In a list file, one path per line; relative paths resolve against the file's folder; blank lines and
    ``#`` comments are skipped. Listed paths are not checked here: a missing or unreadable file becomes a
    per-image error when it is read (see :class:`ImageDataset`). A missing folder / list file raises
    ``FileNotFoundError`` naming it.
    """
    if isinstance(source, (list, tuple)):
        return [os.fspath(p) for p in source]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"images must be a folder, a list file or a list of paths, got {type(source).__name__}")
    src = os.path.expanduser(os.fspath(source))
    if os.path.isdir(src):
        found = []
        for root, dirs, files in os.walk(src, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(os.path.join(root, f) for f in files if is_image_file(f) and not f.startswith("."))
        return sorted(found)
    if os.path.isfile(src):
        if src.lower().endswith(LIST_EXTENSIONS):
            return _read_list_file(src)
        if is_image_file(src):
            return [src]
        raise ValueError(f"{src}: not a folder, a list file ({'/'.join(LIST_EXTENSIONS)}) or an image")
    raise FileNotFoundError(f"{src}: no such folder or list file")


def load_image(path: str):
    """Open an image fully (decoding errors surface here, not later) as RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


class ImageDataset(Dataset):
    """``paths`` read with PIL and passed through ``transform``.

    Item ``i`` is ``(tensor, i, None)``, or ``(None, i, 'ErrorType: message')`` when the file is missing,
    not an image, or corrupt. Use :func:`collate_images` (also ``ImageDataset.collate``) as ``collate_fn``.
    """

    def __init__(self, paths: Sequence[str], transform: Optional[Callable] = None) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Optional[torch.Tensor], int, Optional[str]]:
        try:
            img = load_image(self.paths[i])
            x = self.transform(img) if self.transform is not None else img
        except Exception as e:  # noqa: BLE001 - any bad file is reported, never fatal
            return None, i, _error_text(e)
        return x, i, None

    @staticmethod
    def collate(batch):
        return collate_images(batch)


class IndexedDataset(Dataset):
    """Adapts any dataset whose items are a tensor or ``(tensor, ...)`` to the ``(tensor, i, error)`` items."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.paths = [os.fspath(p) for p in getattr(dataset, "paths", None) or []] or [
            f"{type(dataset).__name__}[{i}]" for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            item: Any = self.dataset[i]
        except Exception as e:  # noqa: BLE001 - a failing item is reported, never fatal
            return None, i, _error_text(e)
        x = item[0] if isinstance(item, (tuple, list)) else item
        if x is None:
            return None, i, (item[2] if isinstance(item, (tuple, list)) and len(item) > 2 else "no data")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"dataset item {i} is a {type(x).__name__}, expected a tensor (or (tensor, ...))")
        return x, i, None


def collate_images(batch):
    """``(pixel_values or None, ids, errors)``: failed items dropped, errors kept as ``[(id, message)]``."""
    ok = [(x, i) for x, i, err in batch if x is not None]
    errors = [(i, err) for x, i, err in batch if x is None]
    pixels = torch.stack([x for x, _ in ok]) if ok else None
    return pixels, [i for _, i in ok], errors
