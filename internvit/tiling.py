"""Dynamic high-resolution tiling (the InternVL-Chat 1.5 / 2 / 2.5 preprocessing), for feature extraction.

An image of ``W × H`` pixels is resized to the allowed grid of ``S × S`` tiles (``S`` = ``image_size``, 448 for
the 448-px InternViT releases) whose aspect ratio ``cols / rows`` is closest to ``W / H``, cut into ``cols·rows``
tiles in row-major order, and, when the grid has more than one tile and ``use_thumbnail`` is on, followed by a
thumbnail: the whole image squashed to ``S × S`` (reference-spec-2 §1.2–1.4).

Pieces, each usable alone:

* :func:`tile_grid` / :func:`candidate_grids` — the grid selection rule, bit-for-bit the upstream one;
* :func:`dynamic_tiles` — PIL image → list of PIL tiles in upstream order; :func:`tile_layout` — the same
  plan as numbers (grid, canvas, boxes) without touching pixels;
* :class:`TileDataset` — one item per image: its tiles as one tensor plus per-tile metadata (image id,
  tile index, grid cols/rows, thumbnail flag); unreadable images become per-image errors;
* :func:`pack_batches` — batches of image ids whose tiles fill up to ``max_tiles`` (tiles of several
  images share one forward pass); :func:`collate_tiles` — the matching ``collate_fn``;
* :func:`pool_tiles` — per-image pooling of per-tile features (``'mean'`` over all tiles, ``'thumbnail'``);
* :func:`pixel_shuffle` — the MLLM projector's input form (``downsample_ratio`` 0.5: ``(N, 1024, C)`` patch
  tokens → ``(N, 256, 4C)``), as InternVL-Chat's ``extract_feature`` with ``ps_version='v2'``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["TILE_POOLS", "TileLayout", "TileDataset", "candidate_grids", "collate_tiles", "dynamic_tiles",
           "pack_batches", "pixel_shuffle", "pool_tiles", "tile_counts", "tile_grid", "tile_layout",
           "validate_tile_args"]

#: per-image pooling of tile features: one row per tile (``None``), the mean over every tile of an image
#: (grid tiles and thumbnail), or the whole-image view alone (the thumbnail; the single tile of a 1×1 grid)
TILE_POOLS = (None, "mean", "thumbnail")


# ---------------------------------------------------------------------------------------------------
# Grid rule
# ---------------------------------------------------------------------------------------------------
def validate_tile_args(min_num: int = 1, max_num: int = 12, image_size: int = 448) -> None:
    """Raise ``ValueError`` naming the argument unless ``1 <= min_num <= max_num`` and ``image_size > 0``."""
    for name, v in (("min_num", min_num), ("max_num", max_num), ("image_size", image_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if min_num < 1:
        raise ValueError(f"min_num must be >= 1, got {min_num}")
    if max_num < min_num:
        raise ValueError(f"max_num must be >= min_num ({min_num}), got {max_num}")
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")


def candidate_grids(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """Every ``(cols, rows)`` with ``min_num <= cols·rows <= max_num``, in upstream's order.

    Upstream collects the pairs in a Python ``set`` and stable-sorts them by tile count, so within one tile
    count the order is the set's iteration order (reference-spec-2 §1.2). That order decides exact ties
    between grids of one tile count, which do occur once ``min_num > 1`` (500×200 with ``min_num = max_num
    = 4``: ``(2, 2)`` and ``(4, 1)`` are equally close; upstream keeps ``(4, 1)``). It is reproduced by
    building the same set: pairs added shell by shell (first those with both sides ``<= min_num``, then
    those whose larger side is ``min_num + 1``, ``+ 2``, ...; within a shell by cols, then rows) — CPython's
    set order for these small-int tuples depends only on that insertion sequence. Raises ``ValueError`` for
    bad arguments.
    """
    validate_tile_args(min_num, max_num, 1)
    pairs = [(c, r) for c in range(1, max_num + 1) for r in range(1, max_num // c + 1) if min_num <= c * r]
    grids = set()
    for g in sorted(pairs, key=lambda g: (max(g[0], g[1], min_num), g)):
        grids.add(g)
    return sorted(grids, key=lambda g: g[0] * g[1])  # stable: keeps the set order within one tile count


def tile_grid(width: int, height: int, *, min_num: int = 1, max_num: int = 12,
              image_size: int = 448) -> tuple[int, int]:
    """The tile grid ``(cols, rows)`` InternVL-Chat picks for a ``width × height`` image.

    Rule (reference-spec-2 §1.3): walk :func:`candidate_grids` in upstream's order, keep the grid whose
    ratio ``cols/rows`` is closest (float64 ``|W/H − cols/rows|``) to the image's; on an exactly equal
    distance, a later grid replaces the kept one only if the image has more than half the grid canvas'
    pixels (``W·H > 0.5·S²·cols·rows``; the kept distance is unchanged). Sizes are in pixels, ``S`` is
    ``image_size``. Raises ``ValueError`` for a non-positive size or bad arguments.
    """
    validate_tile_args(min_num, max_num, image_size)
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in candidate_grids(min_num, max_num):
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * c * r:
            best = (c, r)
    return best


@dataclass(frozen=True)
class TileLayout:
    """How one image is tiled: the grid, the canvas it is resized to and every tile's box.

    ``boxes[k]`` is tile ``k``'s ``(left, top, right, bottom)`` on the canvas (pixels); ``source_boxes[k]`` the
    same box in the original image's pixels (floats). The thumbnail, when present, is image index
    ``num_tiles`` (the last) and covers the whole image.
    """

    width: int
    height: int
    cols: int
    rows: int
    image_size: int
    has_thumbnail: bool

    @property
    def num_tiles(self) -> int:
        """Grid tiles, without the thumbnail."""
        return self.cols * self.rows

    @property
    def num_images(self) -> int:
        """Images :func:`dynamic_tiles` returns: the grid tiles plus the thumbnail if any."""
        return self.num_tiles + int(self.has_thumbnail)

    @property
    def canvas_size(self) -> tuple[int, int]:
        """``(width, height)`` of the resized image the tiles are cut from."""
        return self.cols * self.image_size, self.rows * self.image_size

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        s = self.image_size
        return [((k % self.cols) * s, (k // self.cols) * s, (k % self.cols + 1) * s, (k // self.cols + 1) * s)
                for k in range(self.num_tiles)]

    @property
    def source_boxes(self) -> list[tuple[float, float, float, float]]:
        cw, ch = self.canvas_size
        sx, sy = self.width / cw, self.height / ch
        return [(a * sx, b * sy, c * sx, d * sy) for a, b, c, d in self.boxes]


def tile_layout(width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                use_thumbnail: bool = True) -> TileLayout:
    """The :class:`TileLayout` of a ``width × height`` image (no pixels touched)."""
    cols, rows = tile_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    return TileLayout(int(width), int(height), cols, rows, int(image_size),
                      bool(use_thumbnail) and cols * rows > 1)


def dynamic_tiles(image, *, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                  use_thumbnail: bool = True) -> list:
    """Cut a PIL image into InternVL-Chat's dynamic-resolution tiles, in upstream order.

    The image is resized (PIL's default filter: bicubic for RGB/L, as upstream) to the canvas of
    :func:`tile_grid`'s grid and cut into ``cols·rows`` ``image_size``-square tiles, row-major (left to
    right, rows top to bottom); when the grid has more than one tile and ``use_thumbnail`` is on, the
    original image squashed to ``image_size × image_size`` follows as the last item. Returns a list of PIL
    images of ``image_size × image_size`` pixels (mode as given; upstream converts to RGB first). Every resize
    outputs at most the canvas (``max_num`` tiles). Raises ``ValueError`` for bad arguments.
    """
    layout = tile_layout(image.width, image.height, min_num=min_num, max_num=max_num, image_size=image_size,
                         use_thumbnail=use_thumbnail)
    canvas = image.resize(layout.canvas_size)
    tiles = [canvas.crop(box) for box in layout.boxes]
    if layout.has_thumbnail:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


# ---------------------------------------------------------------------------------------------------
# Dataset, packing, collate
# ---------------------------------------------------------------------------------------------------
def _image_size(path: str) -> Optional[tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
            # EXIF orientations 5-8 rotate by 90 degrees: load_image returns the image upright
            return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read, not here
        return None


def tile_counts(paths: Sequence[str], *, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                use_thumbnail: bool = True) -> list[int]:
    """Tiles per image (thumbnail included) from the image headers (no decoding); 1 for an unreadable file."""
    out = []
    for p in paths:
        size = _image_size(p)
        out.append(1 if size is None else tile_layout(*size, min_num=min_num, max_num=max_num,
                                                      image_size=image_size,
                                                      use_thumbnail=use_thumbnail).num_images)
    return out


class TileDataset(Dataset):
    """Images expanded into their dynamic-resolution tiles; one item per image.

    Item ``i`` is ``(tiles, i, None)`` with ``tiles`` a dict: ``pixel_values`` ``(T, 3, S, S)`` (every tile
    through ``transform``, a PIL → tensor callable; default ``ToTensor``), ``tile_index`` ``(T,)``,
    ``is_thumbnail`` ``(T,)`` bool, ``cols``, ``rows``, ``width``, ``height`` (ints). A missing, non-image or
    corrupt file gives ``(None, i, 'ErrorType: message')``. ``num_tiles`` lists the tile counts from the
    image headers (computed lazily, for :func:`pack_batches`).
    """

    def __init__(self, paths: Sequence[str], transform: Optional[Callable] = None, *, min_num: int = 1,
                 max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True) -> None:
        validate_tile_args(min_num, max_num, image_size)
        self.paths = [os.fspath(p) for p in paths]
        self.transform = transform
        self.min_num, self.max_num, self.image_size = min_num, max_num, image_size
        self.use_thumbnail = bool(use_thumbnail)
        self._counts: dict[int, int] = {}

    def params(self) -> dict:
        """The tiling parameters (JSON-ready), e.g. for a manifest."""
        return {"min_num": self.min_num, "max_num": self.max_num, "image_size": self.image_size,
                "use_thumbnail": self.use_thumbnail}

    def tile_count(self, i: int) -> int:
        """Tiles of image ``i`` (thumbnail included) from its header; 1 for an unreadable file. Cached."""
        if i not in self._counts:
            self._counts[i] = tile_counts([self.paths[i]], min_num=self.min_num, max_num=self.max_num,
                                          image_size=self.image_size, use_thumbnail=self.use_thumbnail)[0]
        return self._counts[i]

    @property
    def num_tiles(self) -> list[int]:
        """:meth:`tile_count` of every image (reads every header once)."""
        return [self.tile_count(i) for i in range(len(self.paths))]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .data import _error_text, load_image

        try:
            img = load_image(self.paths[i])
            layout = tile_layout(img.width, img.height, min_num=self.min_num, max_num=self.max_num,
                                 image_size=self.image_size, use_thumbnail=self.use_thumbnail)
            tiles = dynamic_tiles(img, min_num=self.min_num, max_num=self.max_num, image_size=self.image_size,
                                  use_thumbnail=self.use_thumbnail)
            tf = self.transform or _to_tensor
            pixels = torch.stack([tf(t) for t in tiles])
        except Exception as e:  # noqa: BLE001 - any bad file is reported, never fatal
            return None, i, _error_text(e)
        n = len(tiles)
        return {"pixel_values": pixels, "tile_index": torch.arange(n),
                "is_thumbnail": torch.arange(n) >= layout.num_tiles, "cols": layout.cols, "rows": layout.rows,
                "width": layout.width, "height": layout.height}, i, None

    @staticmethod
    def collate(batch):
        return collate_tiles(batch)


def _to_tensor(img):
    from torchvision.transforms.functional import to_tensor

    return to_tensor(img.convert("RGB") if img.mode != "RGB" else img)


def pack_batches(num_tiles: Sequence[int], max_tiles: int, *, start: int = 0,
                 end: Optional[int] = None) -> list[list[int]]:
    """Batches of consecutive image ids in ``[start, end)`` holding at most ``max_tiles`` tiles each.

    Images are never split across batches and keep their order; an image with more tiles than
    ``max_tiles`` gets a batch of its own. Use as a DataLoader ``batch_sampler``.
    """
    if int(max_tiles) < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    end = len(num_tiles) if end is None else end
    batches, cur, used = [], [], 0
    for i in range(start, end):
        n = max(1, int(num_tiles[i]))
        if cur and used + n > max_tiles:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


def collate_tiles(batch):
    """``(pixel_values (T, 3, S, S) or None, ids, errors, tile_meta)`` for a batch of :class:`TileDataset` items.

    ``tile_meta`` holds one entry per tile row: ``image_id``, ``tile_index``, ``cols``, ``rows`` (int64
    tensors) and ``is_thumbnail`` (bool); ``ids`` the images that could be read, ``errors`` ``[(id, message)]``.
    """
    from .data import join_pixels

    ok = [(x, i) for x, i, err in batch if x is not None]
    errors = [(i, err) for x, i, err in batch if x is None]
    if not ok:
        return None, [], errors, None
    counts = [x["pixel_values"].shape[0] for x, _ in ok]
    meta = {
        "image_id": torch.repeat_interleave(torch.tensor([i for _, i in ok]), torch.tensor(counts)),
        "tile_index": torch.cat([x["tile_index"] for x, _ in ok]),
        "is_thumbnail": torch.cat([x["is_thumbnail"] for x, _ in ok]),
        "cols": torch.repeat_interleave(torch.tensor([x["cols"] for x, _ in ok]), torch.tensor(counts)),
        "rows": torch.repeat_interleave(torch.tensor([x["rows"] for x, _ in ok]), torch.tensor(counts)),
    }
    ids = [i for _, i in ok]
    return join_pixels([x["pixel_values"] for x, _ in ok], ids, cat=True), ids, errors, meta


# ---------------------------------------------------------------------------------------------------
# Per-image pooling, pixel shuffle
# ---------------------------------------------------------------------------------------------------
def pool_tiles(features: torch.Tensor, image_id: torch.Tensor, is_thumbnail: torch.Tensor,
               how: Optional[str]) -> tuple[torch.Tensor, list[int]]:
    """Per-image features from per-tile features (rows of one image must be contiguous).

    ``how``: ``None`` returns the rows unchanged (one per tile); ``'mean'`` the mean over every tile of an
    image, thumbnail included; ``'thumbnail'`` the whole-image view: the thumbnail row, or the single tile of
    a 1×1 grid (which is the whole image squashed to ``S × S``, i.e. what the thumbnail would be). Raises
    ``ValueError`` for ``'thumbnail'`` when a multi-tile image has no thumbnail row. Returns
    ``(features (N_out, ...), image ids of the rows)``; features keep their dtype (means in float32).
    """
    if how not in TILE_POOLS:
        raise ValueError(f"tile_pool must be one of {TILE_POOLS}, got {how!r}")
    ids = image_id.tolist()
    if how is None:
        return features, ids
    # contiguous runs of one image id
    starts = [k for k in range(len(ids)) if k == 0 or ids[k] != ids[k - 1]]
    bounds = list(zip(starts, starts[1:] + [len(ids)]))
    if len({ids[a] for a, _ in bounds}) != len(bounds):
        raise ValueError("pool_tiles: the tiles of one image must be contiguous")
    out = []
    for a, b in bounds:
        if how == "mean":
            out.append(features[a:b].float().mean(0))
            continue
        thumb = [k for k in range(a, b) if bool(is_thumbnail[k])]
        if thumb:
            out.append(features[thumb[-1]])
        elif b - a == 1:
            out.append(features[a])
        else:
            raise ValueError(f"tile_pool='thumbnail' but image {ids[a]} has {b - a} tiles and no thumbnail "
                             f"(use_thumbnail=False)")
    return torch.stack(out), [ids[a] for a, _ in bounds]


def pixel_shuffle(tokens: torch.Tensor, downsample_ratio: float = 0.5) -> torch.Tensor:
    """Patch tokens → the MLLM projector's input form (InternVL-Chat ``pixel_shuffle``, ``ps_version='v2'``).

    ``tokens``: ``(N, L, C)`` patch tokens without the class token, ``L = G²`` on a square ``G × G`` grid
    (row-major), or ``(N, G, G, C)``. With ``f = 1 / downsample_ratio`` (2 for the upstream 0.5), output
    token ``(i, j)`` is the concatenation of the input tokens ``x[f·i + m, f·j + k]`` for ``m`` (row offset,
    outer) and ``k`` (column offset, inner) in ``0…f−1``; tokens are flattened row-major. Returns
    ``(N, (G/f)², f²·C)``: ``(N, 256, 4C)`` for a 448-px tile. Raises ``ValueError`` if the grid is not
    square or not divisible by ``f``.
    """
    if not 0 < downsample_ratio <= 1:
        raise ValueError(f"downsample_ratio must be in (0, 1], got {downsample_ratio}")
    f = round(1 / downsample_ratio)
    if abs(f * downsample_ratio - 1) > 1e-9:
        raise ValueError(f"1 / downsample_ratio must be an integer, got downsample_ratio={downsample_ratio}")
    if tokens.ndim == 3:
        n, length, c = tokens.shape
        g = int(round(length ** 0.5))
        if g * g != length:
            raise ValueError(f"pixel_shuffle needs a square token grid (no class token), got {length} tokens")
        x = tokens.reshape(n, g, g, c)
    elif tokens.ndim == 4:
        x = tokens
        n, g, g2, c = x.shape
        if g != g2:
            raise ValueError(f"pixel_shuffle needs a square grid, got {g}x{g2}")
    else:
        raise ValueError(f"tokens must be (N, L, C) or (N, G, G, C), got shape {tuple(tokens.shape)}")
    if g % f:
        raise ValueError(f"grid side {g} is not divisible by 1/downsample_ratio = {f}")
    h = g // f
    x = x.reshape(n, h, f, h, f, c).permute(0, 1, 3, 2, 4, 5)  # (n, i, j, m, k, c)
    return x.reshape(n, h * h, f * f * c)



# ---------------------------------------------------------------------------------------------------
# Feature extraction over tiles (used by FeatureExtractor(tiles=...))
# ---------------------------------------------------------------------------------------------------
#: per-row metadata columns of tile features: one row per tile, or one per image when pooled
TILE_COLUMNS = ("tile_index", "cols", "rows", "is_thumbnail")
POOLED_COLUMNS = ("cols", "rows", "num_tiles")


def projector_encoder(backbone, *, layer: int = -1, downsample_ratio: float = 0.5) -> Callable:
    """``pixels (T, 3, S, S) → (T, (G·r)², C/r²)`` float32: block ``layer``'s patch tokens (class token
    dropped) through :func:`pixel_shuffle` — the input of InternVL-Chat's ``mlp1`` projector (``(T, 256, 4C)``
    at 448 px with ``downsample_ratio`` 0.5; ``select_layer=-1`` upstream = the last block)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        (patches,) = backbone.forward_intermediates(pixels, indices=[layer], output_fmt="NLC",
                                                    intermediates_only=True, stop_early=True)
        return pixel_shuffle(patches, downsample_ratio).float()

    return encode


def encode_tile_batch(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, meta: dict,
                      tile_pool: Optional[str]) -> tuple[torch.Tensor, list[int], dict]:
    """Features of one packed batch (:func:`collate_tiles` output) and their per-row metadata.

    Returns ``(features, image id per row, columns)``. Without pooling a row is a tile and ``columns`` holds
    :data:`TILE_COLUMNS` (lists, one value per row); with ``tile_pool`` a row is an image and ``columns`` holds
    :data:`POOLED_COLUMNS`.
    """
    feats = encode(pixels)
    out, ids = pool_tiles(feats, meta["image_id"], meta["is_thumbnail"], tile_pool)
    if tile_pool is None:
        cols = {k: meta[k].tolist() for k in TILE_COLUMNS}
    else:
        image_ids = meta["image_id"].tolist()
        first = {}
        for k, i in enumerate(image_ids):
            first.setdefault(i, k)
        cols = {"cols": [int(meta["cols"][first[i]]) for i in ids], "rows": [int(meta["rows"][first[i]]) for i in ids],
                "num_tiles": [image_ids.count(i) for i in ids]}
    return out, ids, cols


@dataclass(frozen=True)
class TileSettings:
    """Tiling settings of a :class:`~internvit.features.FeatureExtractor` (``tiles=`` etc.); see docs/features.md.

    ``image_size`` is the tile side (the extractor's preprocessing size). :meth:`params` is what the manifest
    records (and a resumed run must match).
    """

    max_num: int
    min_num: int = 1
    image_size: int = 448
    use_thumbnail: bool = True
    tile_pool: Optional[str] = None
    projector_input: bool = False
    downsample_ratio: float = 0.5

    def __post_init__(self) -> None:
        validate_tile_args(self.min_num, self.max_num, self.image_size)
        if self.tile_pool not in TILE_POOLS:
            raise ValueError(f"tile_pool must be None, 'mean' or 'thumbnail', got {self.tile_pool!r}")
        if self.tile_pool == "thumbnail" and not self.use_thumbnail and self.max_num > 1:
            raise ValueError("tile_pool='thumbnail' needs use_thumbnail=True (multi-tile images have no other "
                             "whole-image view)")
        r = self.downsample_ratio
        if not 0 < r <= 1 or abs(round(1 / r) * r - 1) > 1e-9:
            raise ValueError(f"downsample_ratio must be 1/k for an integer k >= 1, got {self.downsample_ratio}")

    def params(self) -> dict:
        # min_num > 1: exact ties between grids follow upstream's candidate order since 2026-12-02 (another job)
        rule = "InternVL-Chat dynamic_preprocess" + (" (upstream tie order)" if self.min_num > 1 else "")
        return {"rule": rule, "max_num": self.max_num, "min_num": self.min_num,
                "image_size": self.image_size, "use_thumbnail": self.use_thumbnail, "tile_pool": self.tile_pool,
                "projector_input": self.projector_input,
                "downsample_ratio": self.downsample_ratio if self.projector_input else None}

    def dataset(self, images, transform: Callable) -> "TileDataset":
        """A :class:`TileDataset` over a folder / list file / list of paths / ``ImageDataset``."""
        from torch.utils.data import Dataset as _Dataset

        from .data import ImageDataset, list_images

        if isinstance(images, ImageDataset):
            paths = images.paths
        elif isinstance(images, _Dataset):
            raise ValueError("tiles need image files (a folder, a list file or paths), not a Dataset")
        else:
            paths = list_images(images)
        return TileDataset(paths, transform, min_num=self.min_num, max_num=self.max_num,
                           image_size=self.image_size, use_thumbnail=self.use_thumbnail)

    def batches(self, dataset: "TileDataset", start: int, end: int, max_tiles: int) -> list[list[int]]:
        """Packed batches of images ``[start, end)`` (only those headers are read: a resumed run reads the
        headers of the pending shards only)."""
        counts = _LazyCounts(dataset)
        return pack_batches(counts, max_tiles, start=start, end=end)

    def encoder(self, fx) -> Callable[[torch.Tensor], torch.Tensor]:
        """``tiles (T, 3, S, S) -> one row per tile`` for a FeatureExtractor ``fx``: ``fx.encode``, or with
        ``projector_input`` the MLLM projector's input of ``fx``'s block."""
        if not self.projector_input:
            return fx.encode
        proj = projector_encoder(fx.backbone, layer=(fx.layers or [-1])[0], downsample_ratio=self.downsample_ratio)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                x = pixels.to(fx.device, non_blocking=True).to(fx.dtype)
                return proj(x)

        return encode

    def run(self, fx, dataset: "TileDataset", batches: list[list[int]], total: int):
        """Yield ``(ids, features, errors, columns)`` per packed batch for a FeatureExtractor ``fx``.

        ``ids`` holds the input row (image) of every output row; ``columns`` the per-row metadata (see
        :func:`encode_tile_batch`). An image with any non-finite tile feature is dropped whole and listed in
        ``errors``. ``fx.last_stats`` counts images.
        """
        import time

        import numpy as np
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        encode = self.encoder(fx)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=fx.num_workers, collate_fn=collate_tiles,
                            pin_memory=fx.device.type == "cuda")
        start, done, nonfinite, skipped = time.perf_counter(), 0, 0, 0
        with tqdm(total=total, unit="img", desc="tile features", disable=not fx.progress, smoothing=0.1) as bar:
            for pixels, images, errors, meta in loader:
                ids, feats, columns = [], None, {}
                if pixels is not None:
                    out, ids, columns = encode_tile_batch(encode, pixels, meta, self.tile_pool)
                    if fx.normalize and len(out):  # each output row, after the tiles of an image were pooled
                        from .features import l2_normalize

                        out = l2_normalize(out.float(), dim=1)
                    feats = out.float().cpu().numpy()
                    finite = np.isfinite(feats.reshape(len(feats), -1)).all(axis=1)
                    bad = sorted({ids[j] for j in np.flatnonzero(~finite)})
                    if bad:  # an image is kept whole or not at all
                        keep = [j for j, i in enumerate(ids) if i not in set(bad)]
                        errors = sorted(list(errors) + [(i, f"non-finite features (NaN or infinity in dtype "
                                                            f"{str(fx.dtype).replace('torch.', '')}; try bf16 or fp32)")
                                                        for i in bad])
                        ids, feats = [ids[j] for j in keep], feats[keep]
                        columns = {k: [v[j] for j in keep] for k, v in columns.items()}
                        nonfinite += len(bad)
                n_images = len(set(images) | {i for i, _ in errors})
                done += n_images
                bar.update(n_images)
                if errors:  # the run's total so far
                    skipped += len(errors)
                    bar.set_postfix(skipped=skipped, refresh=False)
                yield ids, feats, errors, columns
        seconds = time.perf_counter() - start
        fx.last_stats = {"seconds": round(seconds, 3), "images": done, "nonfinite": nonfinite, "skipped": skipped,
                         "images_per_s": round(done / seconds, 2) if seconds > 0 else None}



class _LazyCounts:
    """``dataset.tile_count`` as a sequence (headers read on access)."""

    def __init__(self, dataset: "TileDataset") -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> int:
        return self.dataset.tile_count(i)


def tile_settings(fx, tiles: Optional[int], *, min_tiles: int = 1, use_thumbnail: bool = True,
                  tile_pool: Optional[str] = None, projector_input: bool = False,
                  downsample_ratio: float = 0.5) -> TileSettings:
    """Validated :class:`TileSettings` for a FeatureExtractor ``fx`` (tile side = its preprocessing size)."""
    if tiles is None:
        raise ValueError("projector_input needs tiles=MAX_NUM (tiles=1: one squashed tile per image, as upstream "
                         "without dynamic tiling)")
    size = fx.preprocessing.get("image_size") if isinstance(fx.preprocessing, dict) else None
    if size is None:
        size = getattr(getattr(fx.model, "config", None), "image_size", None)
    if size is None:
        raise ValueError("tiles: the tile size is unknown (pass preprocess as a dict with image_size)")
    if projector_input:
        if fx.backbone is None:
            raise ValueError("projector_input needs an InternViT (not embed_fn): it reshapes the patch tokens")
        if fx.layers is not None and len(fx.layers) != 1:
            raise ValueError(f"projector_input takes one block (InternVL-Chat's select_layer), got layers={fx.layers}")
        if fx.normalize:
            raise ValueError("projector_input with normalize=True: the projector takes the raw tokens")
    return TileSettings(max_num=tiles, min_num=min_tiles, image_size=int(size), use_thumbnail=use_thumbnail,
                        tile_pool=tile_pool, projector_input=projector_input, downsample_ratio=downsample_ratio)


def row_columns(settings: TileSettings) -> tuple[str, ...]:
    """Metadata columns a tile feature folder adds to ``id`` and ``path``."""
    return TILE_COLUMNS if settings.tile_pool is None else POOLED_COLUMNS
