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


#: the environment variable that carries :func:`set_max_image_pixels`'s limit to processes started by ``spawn`` or
#: ``forkserver`` (DataLoader workers on macOS / Windows, or with ``multiprocessing_context='spawn'``): they import
#: this module afresh, with Pillow's default limit, and apply the variable on import
MAX_IMAGE_PIXELS_ENV = "INTERNVIT_MAX_IMAGE_PIXELS"
_PIL_DEFAULT_MAX_PIXELS: Optional[float] = None  # Pillow's own MAX_IMAGE_PIXELS, kept at the first change


def set_max_image_pixels(limit: Optional[int]) -> None:
    """The decompression-bomb limit of every image this project reads (:func:`load_image`, the tiles, their
    counts): an image of more than ``limit`` pixels is refused from the size in its file header, before any
    pixel is decoded (``PIL.Image.DecompressionBombError`` naming the size and the limit; the extractors list it
    in ``errors.jsonl``), and one over ``limit / 2`` gets a warning line naming the file. ``0``: no limit;
    ``None``: Pillow's default (refused over 178,956,970 pixels; the variable is then ``pillow``).

    The one place the limit is set (``tools/extract_features.py --max-image-pixels N`` calls it). It sets
    ``PIL.Image.MAX_IMAGE_PIXELS`` to ``limit / 2`` (Pillow refuses over twice its value) and the environment
    variable :data:`MAX_IMAGE_PIXELS_ENV`, so DataLoader workers see it however they are started: forked ones
    inherit Pillow's setting, spawned ones apply the variable when they import this module. Pillow's own
    ``DecompressionBombWarning`` (which names no file) is silenced in favour of that warning line.
    """
    import warnings

    from PIL import Image

    global _PIL_DEFAULT_MAX_PIXELS
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"max_image_pixels must be an int >= 0 (0: no limit) or None, got {limit!r}")
    if _PIL_DEFAULT_MAX_PIXELS is None:
        _PIL_DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
    if limit is None:
        os.environ[MAX_IMAGE_PIXELS_ENV] = "pillow"  # spawned workers silence Pillow's warning too
        Image.MAX_IMAGE_PIXELS = _PIL_DEFAULT_MAX_PIXELS
    else:
        os.environ[MAX_IMAGE_PIXELS_ENV] = str(int(limit))
        Image.MAX_IMAGE_PIXELS = None if limit == 0 else limit / 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _limit_from_env() -> None:
    """Apply :data:`MAX_IMAGE_PIXELS_ENV` in a process that imports this module (a spawned DataLoader worker)."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if value is None:
        return
    if value == "pillow":
        set_max_image_pixels(None)
        return
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{MAX_IMAGE_PIXELS_ENV}={value!r}: not a number of pixels (an int >= 0)") from None
    set_max_image_pixels(limit)


class DataError(ValueError):
    """The input data is bad (an image that cannot be read, a label the dataset does not know): found while a
    job runs, it is reported like a bad argument, as one ``error:`` line naming the file (exit status 2)."""


def is_image_file(path: str) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _read_list_file(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # a BOM (Notepad) is not a path
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = os.path.expanduser(line)
            out.append(line if os.path.isabs(line) else os.path.join(base, line))
    return out


def _walk_images(top: str) -> list[str]:
    """Image files under ``top``: every file path once, on any symlink layout.

    Symlinked folders and files are followed. Each *folder* is entered once per ``(st_dev, st_ino)``, so
    ``self -> .`` or ``sub/up -> ..`` loops end; real (non-link) folders are entered before symlinked ones,
    so a folder inside ``top`` is listed under its own path and under a link's path only when it is reached
    through links alone. *Files* are not de-duplicated: every path is its own row, so hard links and file
    symlinks to one inode are each listed (as img2dataset / clip-retrieval list them). Hidden names
    (``.x``) are skipped; broken links are listed like any other path (they become per-image read errors
    when read). Names that are not valid UTF-8 come as ``os.scandir`` gives them (surrogate escapes).
    """
    found: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    real_dirs, linked_dirs = [top], []
    while real_dirs or linked_dirs:
        folder = real_dirs.pop() if real_dirs else linked_dirs.pop(0)
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_link, is_dir = e.is_symlink(), e.is_dir()  # is_dir follows links
            except OSError:
                is_link, is_dir = True, False
            if is_dir:
                (linked_dirs if is_link else subdirs).append(e.path)
            elif is_image_file(e.name):
                found.append(e.path)
        real_dirs.extend(reversed(subdirs))  # depth first, in name order
    return found


def list_images(source: ImagesLike) -> list[str]:
    """Image paths of a folder (recursive, sorted), a ``.txt`` / ``.lst`` list file, or a list of paths.

    A folder is walked recursively following symlinks, entering each real folder once (by device and
    inode), so any symlink layout terminates; every file path found is listed (hard links and symlinks to
    one file are separate rows). In a list file (UTF-8; bytes that are not UTF-8 are kept as surrogate
    escapes, as ``os.listdir`` gives such names), one path per line; relative paths resolve against the
    file's folder; blank lines and ``#`` comments are skipped. Listed paths are not checked here: a missing
    or unreadable file becomes a per-image error when it is read (see :class:`ImageDataset`). A missing
    folder / list file raises ``FileNotFoundError`` naming it; anything that is not a path or list of paths
    raises ``TypeError``.
    """
    if isinstance(source, (list, tuple)):
        # the index, not the item: a None item was taken for "none found" and reached os.fspath
        bad = next((i for i, p in enumerate(source) if not isinstance(p, (str, os.PathLike))), None)
        if bad is not None:
            raise TypeError(f"image paths must be str or os.PathLike, got {type(source[bad]).__name__} "
                            f"{source[bad]!r:.60} at position {bad}")
        return [os.fspath(p) for p in source]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"images must be a folder, a list file or a list of paths, got {type(source).__name__}")
    src = os.path.expanduser(os.fspath(source))
    if os.path.isdir(src):
        return sorted(_walk_images(src))
    if os.path.isfile(src):
        if src.lower().endswith(LIST_EXTENSIONS):
            return _read_list_file(src)
        if is_image_file(src):
            return [src]
        raise ValueError(f"{src}: not a folder, a list file ({'/'.join(LIST_EXTENSIONS)}) or an image")
    _refuse_broken_link(src)
    raise FileNotFoundError(f"{src}: no such folder or list file")


_EXIF_ORIENTATION = 0x0112

#: the colour transparent pixels are composited onto (white, as browsers and image viewers show them)
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


def _scale_to_uint8(a, *, integer: bool):
    """Map a high-bit-depth single-channel array to uint8.

    Integers: the 16-bit range ``0..65535`` maps linearly onto ``0..255`` (``round(v / 257)``); integer data
    outside that range (32-bit) is min-max scaled. Floats: ``[0, 1]`` maps onto ``0..255``; float data
    outside ``[0, 1]`` is min-max scaled; NaN becomes 0.
    """
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    full = 65535.0 if integer else 1.0
    if lo < 0 or hi > full:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    else:
        a = a / full
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def to_rgb(img):
    """Any PIL image → 8-bit ``RGB``, with the same rules everywhere (``load_image``, the transforms).

    * 16-bit and 32-bit integer modes (``I;16``, ``I;16B``, ``I;16L``, ``I``) and float ``F``: scaled to
      8 bits by :func:`_scale_to_uint8` (``65535`` → ``255``; float ``1.0`` → ``255``), not clipped at 255.
    * Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette or ``L``/``RGB`` images
      with a ``transparency`` colour): composited onto :data:`ALPHA_BACKGROUND` (white), so transparent
      pixels look as a viewer shows them, whatever colour they store.
    * Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``): PIL's
      ``convert('RGB')``.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        grey = Image.fromarray(_scale_to_uint8(img, integer=mode != "F"), mode="L")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")  # PIL has no La -> RGBA
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path):
    """Open an image fully (decoding errors surface here, not later) as an 8-bit ``RGB`` PIL image.

    ``path`` is a path or a binary file object. The EXIF orientation tag is applied (a phone photo stored
    sideways with orientation 6 comes out upright), animated images give their first frame, and every PIL
    mode is converted by :func:`to_rgb` (16-bit / float scaled to 8 bits, transparency composited onto
    white). Raises what PIL raises for a missing, truncated or non-image file (``OSError``,
    ``PIL.UnidentifiedImageError``, ``ValueError``). With ``INTERNVIT_JPEG=torchvision``, plain colour /
    greyscale JPEGs are decoded by torchvision's libjpeg-turbo when it gives PIL's pixels exactly
    (:mod:`internvit.jpeg`); otherwise PIL decodes.
    """
    from PIL import Image, ImageOps

    from .jpeg import load_jpeg_rgb

    _refuse_broken_link(path)
    fast = load_jpeg_rgb(path)
    if fast is not None:
        _warn_if_large(path, fast.size)
        return fast
    try:
        with Image.open(path) as img:
            img.load()
            _warn_if_large(path, img.size)
            if img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise Image.DecompressionBombError(_bomb_text(e)) from None


def _refuse_broken_link(path) -> None:
    """``FileNotFoundError`` naming ``path`` as a broken symbolic link and its missing target (a bare
    'No such file or directory' left the user looking for a file that the folder listing shows)."""
    if isinstance(path, (str, os.PathLike)) and os.path.islink(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{os.fspath(path)}: a broken symbolic link (to {os.readlink(path)}, which does "
                                f"not exist)")


def _bomb_text(e: BaseException) -> str:
    """Pillow's refusal of a large image (its size read from the header, nothing decoded) in the project's words:
    the pixels, the limit and how to change it."""
    import re

    from PIL import Image

    m = re.search(r"\((\d+) pixels\)", str(e))
    limit = Image.MAX_IMAGE_PIXELS
    if not m or not limit:
        return f"{e} (the limit is 2 x PIL.Image.MAX_IMAGE_PIXELS; --max-image-pixels N raises it)"
    return (f"{int(m.group(1)):,} pixels, over the limit of {int(2 * limit):,} (a decompression-bomb guard, "
            f"checked from the file header before decoding; tools/extract_features.py --max-image-pixels N or "
            f"internvit.data.set_max_image_pixels(N) changes it)")


def _warn_if_large(path, size) -> None:
    """One ``internvit`` log warning naming the file, for an image over Pillow's decompression-bomb warning
    threshold (``PIL.Image.MAX_IMAGE_PIXELS``; twice that is refused). Pillow's own
    ``DecompressionBombWarning`` does not name the file (the tools silence it and keep this line)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    pixels = int(size[0]) * int(size[1])
    if limit is None or pixels <= limit:
        return
    import logging

    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "an image")
    logging.getLogger("internvit").warning(
        "%s: %s pixels, over the decompression-bomb warning threshold of %s (PIL.Image.MAX_IMAGE_PIXELS); "
        "images over %s pixels are refused", name, f"{pixels:,}", f"{int(limit):,}", f"{int(2 * limit):,}")


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


def join_pixels(tensors: Sequence[torch.Tensor], ids: Sequence[int], *, cat: bool = False) -> torch.Tensor:
    """Stack (``cat=False``) or concatenate (``cat=True``) the pixel tensors of input rows ``ids`` into one
    batch. Tensors of different sizes (a transform or dataset that keeps each image's own size) raise one
    ``ValueError`` naming the first two rows and their shapes (torch's ``stack expects each tensor to be equal
    size`` named neither)."""
    lead = 1 if cat else 0  # concatenated tensors may differ in their first (tile count) dimension
    _check_one_size([x.shape[lead:] for x in tensors], [tuple(x.shape) for x in tensors], ids)
    return torch.cat(list(tensors)) if cat else torch.stack(list(tensors))


def _check_one_size(sizes: Sequence[tuple], shown: Sequence[tuple], ids: Sequence[int]) -> None:
    for size, show, i in zip(sizes, shown, ids):
        if tuple(size) != tuple(sizes[0]):
            raise ValueError(f"input rows {ids[0]} and {i} give pixels of shapes {shown[0]} and {show}: one batch "
                             f"needs one size; make the transform (or dataset) output one size, e.g. resize + "
                             f"centre crop, or use batch_size=1")


def collate_images(batch):
    """``(pixel_values or None, ids, errors)``: failed items dropped, errors kept as ``[(id, message)]``.
    Items of different sizes are a ``ValueError`` naming them (:func:`join_pixels`)."""
    ok = [(x, i) for x, i, err in batch if x is not None]
    errors = [(i, err) for x, i, err in batch if x is None]
    pixels = join_pixels([x for x, _ in ok], [i for _, i in ok]) if ok else None
    return pixels, [i for _, i in ok], errors


#: the fewest images a loader worker reads as one unit when a batch is split across workers
MIN_WORKER_UNIT = 8


def worker_units(batches: Sequence[Sequence[int]], num_workers: int) -> tuple[list[list[int]], list[int]]:
    """Split each batch into consecutive units for the loader workers: ``(units, units_per_batch)``.

    A ``DataLoader`` worker reads a whole ``batch_sampler`` entry, so with batches of ``B`` images the first
    batch is ready only after one worker decoded all ``B`` (64 JPEGs: ~2 s on a GPU host's CPU, while the model
    waits) and a batch never uses more than one worker. Split into units of
    ``max(MIN_WORKER_UNIT, ceil(B / num_workers))`` images, the workers read a batch together; joined in order
    (:func:`join_units`) the model sees the same batches. ``num_workers <= 1``: the batches themselves.
    """
    if num_workers <= 1:
        return [list(b) for b in batches], [1] * len(batches)
    units, counts = [], []
    for b in batches:
        size = max(MIN_WORKER_UNIT, -(-len(b) // num_workers))
        parts = [list(b[j:j + size]) for j in range(0, len(b), size)] or [[]]
        units.extend(parts)
        counts.append(len(parts))
    return units, counts


def join_units(units: Sequence[tuple], device: Optional[torch.device] = None) -> tuple:
    """One batch ``(pixel_values or None, ids, errors)`` from the collated units of :func:`worker_units`, in
    order; pixels are moved to ``device`` unit by unit (pinned memory copies asynchronously) and joined there.
    Units of different pixel sizes raise :func:`join_pixels`'s ``ValueError`` (naming a row of each)."""
    if len(units) == 1:
        return units[0]
    ok = [(x, ids) for x, ids, _ in units if x is not None]
    ids = [i for _, unit_ids in ok for i in unit_ids]
    errors = sorted(e for _, _, errs in units for e in errs)
    if not ok:
        return None, [], errors
    # each unit's images share one size (its collate stacked them): compare the units' first images
    _check_one_size([x.shape[1:] for x, _ in ok], [tuple(x.shape[1:]) for x, _ in ok], [u[0] for _, u in ok])
    moved = [x.to(device, non_blocking=True) if device is not None else x for x, _ in ok]
    return torch.cat(moved), ids, errors


_limit_from_env()
