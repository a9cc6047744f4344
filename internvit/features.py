"""Feature extraction: pooled, multi-layer or dense features of an InternViT (or any image encoder).

:class:`FeatureExtractor` reads images through the model's own preprocessing and a ``DataLoader``;
``extract`` returns the features in memory, ``write`` stores them as shards committed through the durable
store (:mod:`internvit.store`: resumed after a kill, byte-identical to an uninterrupted run), with a
``manifest.json`` describing how they were made. :func:`read_features` loads such a folder back,
:func:`open_features` memory-maps it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .cli import DTYPE_NAMES, check_device, check_flag, dtype_arg
from .data import ImageDataset, ImagesLike, IndexedDataset, collate_images, join_units, list_images, worker_units
from .fingerprint import (
    PreprocessingFingerprintWarning,
    dataset_fingerprint,
    preprocessing_fingerprint,
    weights_fingerprint,
)
from .store import PARTS  # where the ranks of a distributed write keep their parts until rank 0 commits
from .store import named_write_errors as _writing
from .transforms import build_transform, normalize_pixels, preprocess_config

__all__ = ["FeatureExtractor", "FeatureResult", "read_features", "open_features", "MappedFeatures", "parse_dtype",
           "weights_fingerprint", "inputs_checksum", "output_text", "canonical_paths", "resolve_input_paths",
           "refuse_foreign_out"]

logger = logging.getLogger("internvit")

POOLS = ("cls", "mean", "cls_mean", "grid")
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
#: the ``error`` of a row whose features hold NaN or infinity (not stored; listed in ``errors.jsonl``)
NONFINITE_ERROR = "non-finite features (NaN or infinity"


def output_text(value: Union[str, bytes, os.PathLike]) -> str:
    """The text written to every output (metadata, ``errors.jsonl``) for a path or other string ``value``.

    A path that is valid UTF-8 is returned unchanged. A file name that is not (Python holds its undecodable
    bytes as lone surrogates, ``os.fsdecode``'s ``surrogateescape``) is written with each undecodable byte as
    ``\\xNN``: ``os.fsencode(p).decode('utf-8', 'backslashreplace')``, so ``b'bad\\xff.png'`` becomes the text
    ``bad\\xff.png``. Other lone surrogates become ``\\uXXXX``. The row keeps its ``id`` (input row), so it
    stays aligned with the inputs, and manifests count such paths (``num_escaped_paths``). Never raises for
    a ``str``/``bytes``/path-like.
    """
    v = os.fspath(value) if isinstance(value, os.PathLike) else value
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        pass
    try:
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return v.encode("utf-8", "backslashreplace").decode("utf-8")


def _output_value(v: Any) -> Any:
    """An extra-column value as written: strings through :func:`output_text`, the rest unchanged."""
    return output_text(v) if isinstance(v, str) else v


def nonfinite_hint(dtype: torch.dtype) -> str:
    """What to try after NaN / inf features or embeddings computed in ``dtype``: in 16 bits an overflow is likely
    (``'try fp32'``); in 32 bits it is not, so the weights or the input are at fault."""
    return {"float16": "try bf16 or fp32", "bfloat16": "try fp32"}.get(
        str(dtype).replace("torch.", ""), "they are not a precision overflow: check the weights and the image")


def _nonfinite_reason(dtype: torch.dtype, normalize: bool = False) -> str:
    """The ``error`` of a row with non-finite features computed in ``dtype`` (what to try depends on it)."""
    name = str(dtype).replace("torch.", "")
    hint = nonfinite_hint(dtype)
    if normalize:
        hint += "; or an all-zero feature, which has no direction to normalise"
    return f"{NONFINITE_ERROR} in dtype {name}; {hint})"


def l2_normalize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` scaled to unit L2 norm along ``dim``, without overflow: each vector is divided by its largest
    magnitude first (``F.normalize`` squares the values, so a finite float32 row of values ~1e20 has an infinite
    norm and came out all zeros, silently). A vector that cannot be normalised — all zeros (no direction) or
    holding NaN/inf — comes out NaN, so it is reported as a non-finite row instead of being stored as zeros."""
    scale = x.abs().amax(dim=dim, keepdim=True)
    y = x / scale  # an all-zero vector: 0 / 0 = NaN
    return y / torch.linalg.vector_norm(y, dim=dim, keepdim=True)


def _patch_size(model: Optional[nn.Module]) -> Optional[int]:
    """The patch size of ``model``'s vision tower (from its config), ``None`` when it has none."""
    for obj in (model, getattr(model, "vision_model", None)):
        config = getattr(obj, "config", None)
        for cfg in (config, getattr(config, "vision_config", None)):
            size = getattr(cfg, "patch_size", None)
            if isinstance(size, int) and size > 0:
                return size
    return None


#: keys of the manifest's ``model`` that describe it without being part of the job identity (the weights
#: fingerprint already identifies the weights)
MODEL_DESCRIPTION_KEYS = ("name", "random_init")


def _random_init(model: nn.Module) -> Optional[bool]:
    """``True`` when ``model`` holds a preset's random weights (``load_model(<preset>)``), ``False`` when it was
    loaded from weight files, ``None`` when that is not known (a model built by the caller)."""
    report = getattr(model, "load_report", None)
    if report is None:
        return None
    return getattr(report, "family", None) == "random-init"


def _check_int(name: str, value: Any, minimum: int) -> None:
    """``value`` must be an int (not a bool or a float, which were truncated) of at least ``minimum``:
    ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_inputs(dataset: Dataset, images: Any) -> None:
    """No inputs at all (``[]``, a folder or list file without images, an empty dataset): ``ValueError`` naming
    ``images``, before any work (the feature dimension of nothing is not known; an output of shape ``(0, 0)``
    was easy to mistake)."""
    if len(dataset) == 0:
        what = f"{os.fspath(images)!r} holds no images" if isinstance(images, (str, os.PathLike)) else "it is empty"
        raise ValueError(f"images: nothing to extract ({what})")


def _check_not_empty(name: str, value: Any) -> None:
    """Raise ``ValueError('NAME: empty path')`` for ``''`` (which would mean the current folder)."""
    if isinstance(value, (str, bytes, os.PathLike)) and not os.fspath(value):
        raise ValueError(f"{name}: empty path")


class _ChunkedSink:
    """A file-like wrapper that makes ``np.save`` write in chunks through ``write`` (whose errors carry the
    ``errno``) rather than ``ndarray.tofile`` (whose short writes carry none)."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        return self.f.write(data)


class _RawEncoder:
    """``fx`` seen by the tile runner: the same settings, but ``encode`` does not normalise (the extractor
    normalises each *output* row, after the tiles of an image were pooled)."""

    def __init__(self, fx: "FeatureExtractor") -> None:
        self.__dict__["_fx"] = fx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fx, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value  # e.g. last_stats: read back by the extractor

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._fx.encode(pixel_values, normalize=False)


@dataclass
class FeatureResult:
    """Features of the images that could be read, in input order.

    ``ids[j]`` is the input row of ``features[j]``; ``errors`` lists the skipped inputs as
    ``{'id', 'path', 'error'}`` (unreadable images and rows with non-finite features).
    """

    features: np.ndarray
    ids: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    tiles: Optional[dict] = None  # tiles=...: per-row tile metadata (internvit.tiling.encode_tile_batch columns)


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.float32`` / ``'fp32'`` / ``'bf16'`` / ``'torch.bfloat16'`` / ... → ``torch.dtype`` (the names in
    :data:`DTYPES`, any case, with or without ``torch.``). Raises ``ValueError`` naming the allowed names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, dtype_arg(dtype))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"dtype {e}") from None


def _stable_repr(obj: Any) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


class FeatureExtractor:
    """Turn images into features with an InternViT (or any ``embed_fn``).

    Args:
        model: an :class:`~internvit.InternViT` (or a model with a ``vision_model``), moved to ``device`` and
            cast to ``dtype``. May be ``None`` when ``embed_fn`` and ``preprocess`` are given.
        preprocess: ``None`` (the model's preset), a dict as made by :func:`internvit.preprocess_config`
            (fields override the preset) or a callable PIL → tensor transform.
        pool: ``'cls'`` (the default), ``'mean'`` (mean of patch tokens), ``'cls_mean'`` (both, concatenated) or
            ``'grid'`` (``(C, h, w)`` patch maps). Not with ``projector_input`` (which outputs tokens).
        layers: block indices (negatives allowed); several are concatenated on the channel axis. ``None`` =
            last block. A block listed twice (``[-1, 2]`` of 3 blocks) is a ``ValueError``.
        embed_fn: ``callable(pixel_values) -> (B, D)``, replaces pooling (e.g. ``InternVL.encode_image``);
            ``pool`` or ``layers`` given with it is a ``ValueError`` (they would not be applied).
        normalize: L2-normalise each output row (for ``'grid'``: each position's channel vector); with
            ``tile_pool`` the pooled row of an image (so it has unit norm).
        tiles, min_tiles, use_thumbnail, tile_pool, projector_input, downsample_ratio: dynamic-resolution tiles
            (InternVL-Chat preprocessing, :mod:`internvit.tiling`): ``tiles=MAX_NUM`` turns them on; rows are
            then tiles (or images with ``tile_pool='mean'``/``'thumbnail'``) and ``batch_size`` counts tiles.
            ``min_tiles`` (default 1), ``use_thumbnail`` (default ``True``) and ``tile_pool`` need ``tiles``;
            ``downsample_ratio`` (default 0.5) needs ``projector_input``. See docs/features.md.

    Raises ``ValueError`` for arguments that do not fit together (naming them), e.g. a preprocessing
    ``image_size`` that is not a multiple of the model's patch size (the patch embedding would drop the border
    pixels; with ``projector_input`` a multiple of ``patch_size / downsample_ratio``), or a tile argument
    without ``tiles``.
    """

    #: what :meth:`write` logs (rank 0, every check passed, with the job's first features) when the model has random
    #: weights (a preset name given to :func:`internvit.load_model`); ``{name}``: the model's name; ``None``: quiet
    random_init_warning: Optional[str] = (
        "model {name} has RANDOM weights (a preset built without a checkpoint), not the released ones: these "
        "features are a dry run and mean nothing; load the release's checkpoint folder (config.json + "
        "safetensors) or a weight file with its config (the manifest records model.random_init: true)")

    #: warnings and log records of setting up the job (:func:`internvit.cli.hold_warnings`), e.g. a
    #: :class:`~internvit.checkpoints.LossyModelCastWarning` the CLI held while loading the model: :meth:`write`
    #: emits them when the accepted job first computes features (see ``_arm_warnings``)
    held_warnings: list = []

    def __init__(
        self,
        model: Optional[nn.Module],
        preprocess: Union[None, Mapping[str, Any], Callable] = None,
        *,
        pool: Optional[str] = None,
        layers: Optional[Sequence[int]] = None,
        batch_size: int = 32,
        num_workers: int = 0,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype] = torch.float32,
        embed_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        normalize: bool = False,
        progress: bool = True,
        model_name: Optional[str] = None,
        tiles: Optional[int] = None,
        min_tiles: Optional[int] = None,
        use_thumbnail: Optional[bool] = None,
        tile_pool: Optional[str] = None,
        projector_input: bool = False,
        downsample_ratio: Optional[float] = None,
    ) -> None:
        if tiles is None:  # flags that only apply with tiles are refused, never silently ignored
            given = [n for n, v in (("min_tiles", min_tiles), ("use_thumbnail", use_thumbnail),
                                    ("tile_pool", tile_pool)) if v is not None]
            if given:
                raise ValueError(f"{given[0]} needs tiles=MAX_NUM (it only applies to dynamic-resolution tiles)")
        if downsample_ratio is not None and not projector_input:
            raise ValueError("downsample_ratio needs projector_input=True (it is the projector input's pixel shuffle)")
        if projector_input and pool is not None:
            raise ValueError(f"pool={pool!r} with projector_input=True: the projector input is the block's patch "
                             f"tokens, not pooled; leave pool unset")
        if embed_fn is not None:  # embed_fn makes the rows itself: a pool or layers given were silently unused
            given = next(((n, v) for n, v in (("pool", pool), ("layers", layers)) if v is not None), None)
            if given is not None:
                raise ValueError(f"{given[0]}={given[1]!r} with embed_fn: embed_fn returns the rows itself, so "
                                 f"{given[0]} would not be applied (and the manifest would record it); leave it "
                                 f"unset, or pool the blocks you want inside embed_fn")
        pool = "cls" if pool is None else pool
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if model is None and embed_fn is None:
            raise ValueError("FeatureExtractor needs a model (or an embed_fn)")
        if model is None and preprocess is None:
            raise ValueError("FeatureExtractor without a model needs preprocess= (a dict or a transform)")
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        check_flag("normalize", normalize)  # "no" is truthy: it would normalise
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
                raise TypeError(f"layers must be a list of block indices (ints) or None, got "
                                f"{type(layers).__name__} {layers!r}")
            bad = next((k for k, i in enumerate(layers)  # the position: a None entry was taken for "none found"
                        if isinstance(i, bool) or not isinstance(i, (int, np.integer))), None)
            if bad is not None:  # 1.5 became block 1, silently
                raise TypeError(f"layers must be block indices (ints), got {type(layers[bad]).__name__} "
                                f"{layers[bad]!r} in {list(layers)!r}")
        self.device = torch.device(check_device(device))  # 'meta' gave features of no values
        self.dtype = parse_dtype(dtype)
        self.pool, self.batch_size, self.num_workers = pool, int(batch_size), int(num_workers)
        self.embed_fn, self.normalize, self.progress = embed_fn, bool(normalize), progress
        if model is not None:
            from .checkpoints import lossy_model_cast, warn_lossy_cast

            warn_lossy_cast(lossy_model_cast(model, self.dtype), self.dtype,
                            f"FeatureExtractor(dtype={str(self.dtype).replace('torch.', '')})")
            model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model = model
        self.backbone = None
        if embed_fn is None:
            self.backbone = model if hasattr(model, "forward_intermediates") else getattr(model, "vision_model", None)
            if self.backbone is None or not hasattr(self.backbone, "forward_intermediates"):
                raise TypeError(f"{type(model).__name__} has no forward_intermediates (nor a vision_model with "
                                f"one); pass embed_fn=")
        self.layers = None
        if layers is not None:
            self.layers = [int(i) for i in layers]
            if not self.layers:
                raise ValueError("layers must list at least one block index (or be None for the last block)")
            if self.backbone is not None:
                resolved = self.backbone.resolve_indices(self.layers)  # raises naming the bad index
                twice = sorted({b for b in resolved if resolved.count(b) > 1})
                if twice:  # concatenated the same block's features twice, silently
                    raise ValueError(f"layers {self.layers}: block(s) {twice} listed twice (negative indices count "
                                     f"from the last of {self.backbone.num_layers} blocks)")
        self.model_name = model_name
        self.transform, self.preprocessing = self._resolve_preprocess(preprocess)
        # on an accelerator the loader carries the 8-bit pixels and encode() normalises them on the device: 4x
        # fewer bytes through the worker queues, pinned memory and the copy, the same float32 values bit for bit
        self._defer_normalize = self._preset_preprocessing and embed_fn is None and self.device.type != "cpu"
        self._loader_transform = (build_transform(self.preprocessing, output_dtype=torch.uint8)
                                  if self._defer_normalize else self.transform)
        self.last_stats: dict = {}
        self.tiling = None  # -- dynamic-resolution tiles (internvit.tiling) --
        if tiles is not None or projector_input:
            from .tiling import tile_settings

            self.tiling = tile_settings(self, tiles, min_tiles=1 if min_tiles is None else min_tiles,
                                        use_thumbnail=True if use_thumbnail is None else use_thumbnail,
                                        tile_pool=tile_pool, projector_input=projector_input,
                                        downsample_ratio=0.5 if downsample_ratio is None else downsample_ratio)
        self.pool = None if projector_input else self.pool  # what the rows are made of (None: projector tokens)
        self.patch_size = None if self.embed_fn is not None else (_patch_size(self.backbone) or _patch_size(model))
        self._check_image_size()

    # -- set-up ----------------------------------------------------------------------------------------
    def _check_image_size(self) -> None:
        """The preprocessing's ``image_size`` must be a whole number of patches (of ``1/downsample_ratio``
        patches with ``projector_input``): else the patch embedding silently drops the border pixels."""
        size = self.preprocessing.get("image_size") if self._preset_preprocessing else None
        patch = self.patch_size
        if size is None or patch is None or self.embed_fn is not None:
            return
        if size % patch:
            raise ValueError(f"image_size {size} is not a multiple of the model's patch size {patch}: the patch "
                             f"embedding would drop the last {size % patch} pixel rows and columns "
                             f"(use e.g. {size - size % patch} or {size - size % patch + patch})")
        if self.tiling is not None and self.tiling.projector_input:
            unit = patch * round(1 / self.tiling.downsample_ratio)
            if size % unit:
                raise ValueError(f"projector_input: image_size {size} must be a multiple of {unit} (patch size "
                                 f"{patch} / downsample_ratio {self.tiling.downsample_ratio}) so that the token "
                                 f"grid can be pixel-shuffled (use e.g. {max(unit, size - size % unit)})")

    def _resolve_preprocess(self, preprocess) -> tuple[Callable, dict]:
        self._preset_preprocessing = not (preprocess is not None and callable(preprocess)
                                          and not isinstance(preprocess, Mapping))
        if not self._preset_preprocessing:
            return preprocess, preprocessing_fingerprint(preprocess)
        config = getattr(self.model, "config", None)
        p = preprocess_config(config)
        if preprocess is not None:
            unknown = set(preprocess) - set(p)
            if unknown:
                raise ValueError(f"preprocess: unknown field(s) {', '.join(sorted(unknown))} "
                                 f"(expected {', '.join(p)})")
            p.update({k: v for k, v in preprocess.items() if v is not None})
            p = preprocess_config(None, **p)  # validates the values
        return build_transform(p), p

    def model_info(self) -> Optional[dict]:
        """What identifies the model in a manifest: name/path, class, config dict and a weights fingerprint."""
        if self.model is None:
            return None
        report = getattr(self.model, "load_report", None)
        files = list(getattr(report, "files", []) or [])
        name = self.model_name or getattr(self.model, "name_or_path", None)
        if name is None and files:
            name = files[0] if len(files) == 1 else os.path.dirname(files[0])
        config = getattr(self.model, "config", None)
        return {
            "name": name,
            "class": type(self.model).__name__,
            "config": config.to_dict() if hasattr(config, "to_dict") else None,
            "weights_fingerprint": weights_fingerprint(self.model),
            "random_init": _random_init(self.model),
        }

    def _dataset(self, images: Union[ImagesLike, Dataset]) -> Dataset:
        _check_not_empty("images", images)
        if self.tiling is not None:
            if isinstance(images, ImageDataset) and images.transform is not None:
                raise ValueError("tiles are read with the extractor's preprocessing, not an ImageDataset's own "
                                 "transform: pass the paths (or an ImageDataset without a transform)")
            return self.tiling.dataset(images, self.transform)
        if isinstance(images, ImageDataset):
            return images if images.transform is not None else ImageDataset(images.paths, self._loader_transform)
        if isinstance(images, Dataset):
            return IndexedDataset(images)
        return ImageDataset(list_images(images), self._loader_transform)

    # -- compute ---------------------------------------------------------------------------------------
    def _pool(self, patches: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        if self.pool == "grid":
            return patches.float()
        cls = prefix[:, 0].float()
        if self.pool == "cls":
            return cls
        mean = patches.float().mean(1)
        return mean if self.pool == "mean" else torch.cat([cls, mean], dim=-1)

    def input_preprocessing(self, images: Union[ImagesLike, Dataset]) -> dict:
        """What made the pixels of ``images`` (recorded in the manifest as ``preprocessing``, part of the job).

        Paths (and an ``ImageDataset`` without a transform) are read with the extractor's preprocessing; an
        ``ImageDataset``'s own transform replaces it; any other ``Dataset`` yields ready tensors and is
        described by its class (and its ``transform`` attribute, if any). Callables whose parameters cannot
        be read are listed under ``unverified_callables`` (see :func:`~internvit.fingerprint.dataset_fingerprint`).
        """
        if self.tiling is None and isinstance(images, ImageDataset):
            return self.preprocessing if images.transform is None else preprocessing_fingerprint(images.transform)
        if self.tiling is None and isinstance(images, Dataset):
            return dataset_fingerprint(images)
        return self.preprocessing

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, *, normalize: Optional[bool] = None) -> torch.Tensor:
        """Features of a preprocessed batch ``(B, 3, H, W)`` as a float32 tensor on ``device``.

        ``pixel_values``: float (normalised, as the extractor's ``transform`` makes them) or, without
        ``embed_fn``, uint8 RGB pixels (``build_transform(..., output_dtype=torch.uint8)``), normalised here on
        the device with the preprocessing's mean / std (:func:`internvit.transforms.normalize_pixels`, the same
        values bit for bit). ``normalize`` (default: the extractor's) L2-normalises each row. Raises
        ``ValueError`` when ``H`` or ``W`` is not a multiple of the model's patch size (the patch embedding
        would drop border pixels), or for uint8 pixels with a ``preprocess`` callable (whose mean / std are
        unknown).
        """
        x = pixel_values.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8 and self.embed_fn is None:
            if not self._preset_preprocessing:
                raise ValueError("uint8 pixel_values are normalised with the extractor's preprocessing mean / std, "
                                 "but this extractor has a preprocess callable: pass its normalised float pixels")
            x = normalize_pixels(x, self.preprocessing["mean"], self.preprocessing["std"])
        if self.embed_fn is None and self.patch_size and x.ndim == 4 and (
                x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size):
            raise ValueError(f"pixel_values of {x.shape[-2]}x{x.shape[-1]} px: not a multiple of the patch size "
                             f"{self.patch_size} (the patch embedding would drop the border pixels); make the "
                             f"preprocessing output a multiple")
        if x.is_floating_point():
            x = x.to(self.dtype)
        if self.embed_fn is not None:
            out = self.embed_fn(x)
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"embed_fn must return a (B, D) tensor for B={x.shape[0]} images, got {got}")
            out = out.float()
        else:
            fmt = "NCHW" if self.pool == "grid" else "NLC"
            inter = self.backbone.forward_intermediates(x, indices=self.layers, output_fmt=fmt,
                                                        intermediates_only=True, return_prefix_tokens=True,
                                                        stop_early=True)
            parts = [self._pool(patches, prefix) for patches, prefix in inter]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.normalize if normalize is None else normalize:
            out = l2_normalize(out, dim=1)
        return out

    def _run_tiles(self, dataset: Dataset, batches: list[list[int]], total: int) -> Iterator[tuple]:
        """The tile runner's batches, each output row normalised *after* the tiles of an image were pooled (by
        the runner, before its non-finite check)."""
        raw = _RawEncoder(self)
        try:
            for ids, feats, errors, columns in self.tiling.run(raw, dataset, batches, total):
                errors = [(i, _nonfinite_reason(self.dtype, self.normalize) if e.startswith(NONFINITE_ERROR) else e)
                          for i, e in errors]
                yield ids, feats, errors, columns
        finally:
            self.last_stats = dict(raw.__dict__.get("last_stats") or {})

    def _run(self, dataset: Dataset, batches: list[list[int]], total: int
             ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        """Yield ``(ids, features, errors)`` per batch; batches are lists of dataset indices."""
        if self.tiling is not None:  # yields (ids, features, errors, per-row tile columns)
            yield from self._run_tiles(dataset, batches, total)
            return
        from tqdm.auto import tqdm

        # several workers read each batch together (the first one is ready as soon as its units are)
        units, units_per_batch = worker_units(batches, self.num_workers)
        loader = DataLoader(dataset, batch_sampler=units, num_workers=self.num_workers,
                            collate_fn=collate_images, pin_memory=self.device.type == "cuda")
        start, done, nonfinite, waited, skipped = time.perf_counter(), 0, 0, 0.0, 0
        # without workers, a thread reads the next batches while the model runs (decoding and PIL's resize
        # release the GIL); with workers, the DataLoader's own prefetching does this
        source = iter(loader) if self.num_workers > 0 else prefetch(loader, depth=2)
        with tqdm(total=total, unit="img", desc="features", disable=not self.progress, smoothing=0.1) as bar:
            for n_units in units_per_batch:
                t0 = time.perf_counter()
                parts = [next(source) for _ in range(n_units)]
                waited += time.perf_counter() - t0
                pixels, ids, errors = join_units(parts, self.device if n_units > 1 else None)
                feats = self.encode(pixels).cpu().numpy() if pixels is not None else None
                if feats is not None:
                    finite = np.isfinite(feats.reshape(len(feats), -1)).all(axis=1)
                    if not finite.all():  # e.g. fp16 overflow: never stored as features, listed as errors
                        reason = _nonfinite_reason(self.dtype, self.normalize)
                        errors = sorted(list(errors) + [(ids[j], reason) for j in np.flatnonzero(~finite)])
                        ids = [ids[j] for j in np.flatnonzero(finite)]
                        feats = feats[finite]
                        nonfinite += int((~finite).sum())
                done += len(ids) + len(errors)
                bar.update(len(ids) + len(errors))
                if errors:  # the run's total so far (it showed the last batch's count)
                    skipped += len(errors)
                    bar.set_postfix(skipped=skipped, refresh=False)
                yield ids, feats, errors
            next(source, None)  # the end: the loader stops its workers (the prefetch thread ends)
        seconds = time.perf_counter() - start
        if nonfinite:
            logger.warning("%d of %d images gave non-finite features in %s (not stored, listed as errors)",
                           nonfinite, done, self.dtype)
        self.last_stats = {"seconds": round(seconds, 3), "images": done, "nonfinite": nonfinite, "skipped": skipped,
                           "images_per_s": round(done / seconds, 2) if seconds > 0 else None,
                           "input_wait_seconds": round(waited, 3)}

    def _batches(self, start: int, end: int, dataset: Optional[Dataset] = None) -> list[list[int]]:
        if self.tiling is not None:  # tiles of several images packed up to batch_size tiles
            return self.tiling.batches(dataset, start, end, self.batch_size)
        return [list(range(s, min(s + self.batch_size, end))) for s in range(start, end, self.batch_size)]

    def extract(self, images: Union[ImagesLike, Dataset]) -> FeatureResult:
        """Features of a folder / list file / list of paths / ``Dataset``, in memory (unreadable images skipped)."""
        ds = self._dataset(images)
        _check_inputs(ds, images)
        paths = ds.paths
        feats, ids, errors, tiles = [], [], [], {}
        for b_ids, b_feats, b_errors, *b_tiles in self._run(ds, self._batches(0, len(ds), ds), len(ds)):
            if b_feats is not None:
                feats.append(b_feats)
                ids.extend(b_ids)
            for k, v in (b_tiles[0] if b_tiles else {}).items():
                tiles.setdefault(k, []).extend(v)
            errors.extend({"id": i, "path": paths[i], "error": e} for i, e in b_errors)
        # no readable image: (0, D) with the model's D, as a run with readable images has (not (0, 0))
        features = np.concatenate(feats) if feats else np.zeros((0, *(self._blank_output_shape() or (0,))),
                                                                np.float32)
        return FeatureResult(features.astype(np.float32, copy=False), ids, [paths[i] for i in ids], errors,
                             tiles if self.tiling is not None else None)

    # -- write -----------------------------------------------------------------------------------------
    def signature(self, paths: Sequence[str], extra_columns: Optional[Mapping[str, Sequence]], *,
                  shard_size: int, features_pattern: str, metadata_pattern: str, metadata_format: str,
                  manifest_extra: Optional[Mapping[str, Any]] = None, model_info: Optional[dict] = None,
                  preprocessing: Optional[Mapping[str, Any]] = None, preprocess_id: Optional[str] = None) -> dict:
        """The job identity of :meth:`write` (JSON-normalised): everything that decides the output's bytes.

        The model is identified by class, config and :func:`~internvit.fingerprint.weights_fingerprint` (all
        weight bytes), not by its name or path; the inputs by a streamed SHA-256 of every path and extra value.
        ``preprocessing`` is what made the pixels (:meth:`input_preprocessing`; default: the extractor's own),
        with ``preprocess_id`` added when given. ``dtype`` comes before ``model``: the model is cast to the
        dtype before its weights are fingerprinted, so a dtype change is named as such.
        """
        model = model_info if model_info is not None else self.model_info()
        if model is not None:
            model = {k: v for k, v in model.items() if k not in MODEL_DESCRIPTION_KEYS}
        pre = dict(self.preprocessing if preprocessing is None else preprocessing)
        if preprocess_id is not None:
            pre["preprocess_id"] = str(preprocess_id)
        sig = {
            "dtype": str(self.dtype).replace("torch.", ""),
            "model": model,
            "embed_fn": None if self.embed_fn is None else getattr(self.embed_fn, "__qualname__",
                                                                  _stable_repr(self.embed_fn)),
            "preprocessing": pre,
            "pool": "embed_fn" if self.embed_fn is not None else self.pool,
            "layers": self.layers,
            "normalize": self.normalize,
            "shard_size": int(shard_size),
            "num_inputs": len(paths),
            "inputs_checksum": inputs_checksum(paths, extra_columns),
            "features_pattern": features_pattern,
            "metadata_pattern": metadata_pattern,
            "metadata_format": metadata_format,
            "extra": dict(manifest_extra or {}),
        }
        if self.tiling is not None:  # only with tiles, so whole-image job ids are unchanged
            sig["tiling"] = self.tiling.params()
            if self.normalize and sig["tiling"].get("tile_pool") == "mean":
                # rows are normalised after pooling the tiles (before 2026-12-02: each tile, then the mean, not
                # a unit vector): a folder begun the old way is another job, never resumed into
                sig["normalize_after"] = "tile_pool"
        return json.loads(json.dumps(sig, default=str))

    def write(
        self,
        images: Union[ImagesLike, Dataset],
        out_dir: Union[str, os.PathLike],
        *,
        shard_size: int = 1000,
        features_pattern: str = "features/part-{shard:05d}.npy",
        metadata_pattern: str = "metadata/part-{shard:05d}.parquet",
        metadata_format: str = "parquet",
        extra_columns: Optional[Mapping[str, Sequence]] = None,
        manifest_extra: Optional[Mapping[str, Any]] = None,
        overwrite: bool = False,
        discard_pending: bool = False,
        preprocess_id: Optional[str] = None,
    ) -> dict:
        """Write features as shards of ``shard_size`` input rows through the durable store; returns the manifest.

        Shard ``k`` covers input rows ``[k*shard_size, (k+1)*shard_size)``: a float32 ``.npy`` of the kept rows
        ``(count, *feature_shape)`` and a metadata table (``id`` = input row (int64), ``path``, and every
        ``extra_columns`` entry). Rows that could not be read, or whose features are not finite (e.g. fp16
        overflow), are not stored: they are listed in ``errors.jsonl`` (``{'id', 'path', 'error'}``).
        Everything commits through :class:`internvit.store.Store`: shards and ``errors.jsonl`` are data files,
        ``manifest.json`` is the commit point, and readers (:func:`read_features`) only ever see a committed
        state. After a kill, rerunning the same call keeps the finished shards and computes the rest; the
        folder ends byte-identical to an uninterrupted run. The returned dict is the committed manifest plus a
        ``timing`` entry that is *not* stored (timings would make reruns differ).

        The manifest's ``preprocessing`` is what made the pixels (:meth:`input_preprocessing`): the
        extractor's, or the transform of an ``ImageDataset`` / the class of another ``Dataset`` passed as
        ``images``. When it includes a callable whose parameters cannot be read (``unverified_callables``),
        a finished or interrupted folder of the same job is *not* reused or resumed (``ValueError``): pass
        ``preprocess_id='...'``, a name you change whenever that preprocessing changes, to make it part of the
        job identity (and allow resume), or use a new folder. Paths that are not valid UTF-8 are written
        escaped (:func:`output_text`; counted in ``num_escaped_paths``).

        Raises ``ValueError`` for an empty ``out_dir`` and when the folder holds committed features of another
        job (naming the first field that differs; ``overwrite=True`` replaces them with a new generation),
        ``FileExistsError`` when ``out_dir`` is a folder of files no feature extraction wrote
        (:func:`refuse_foreign_out`, also with ``overwrite=True``: only features this project wrote are replaced),
        :class:`~internvit.store.PendingJobError` when an interrupted *different* job is pending
        (``discard_pending=True``, ``--discard-pending`` in the CLI, drops it),
        :class:`~internvit.store.StoreBusyError` when another process writes the folder, and ``OSError``
        naming the file and the ``errno`` (e.g. ``ENOSPC``) when a file cannot be written.
        """
        from .store import PendingJobError, Store, read_manifest
        from .tiling import row_columns

        _check_not_empty("out_dir", out_dir)
        out_dir = os.fspath(out_dir)
        _check_int("shard_size", shard_size, 1)
        shard_size = int(shard_size)
        manifest_extra = check_manifest_extra(manifest_extra)
        if metadata_format not in ("parquet", "jsonl"):
            raise ValueError(f"metadata_format must be 'parquet' or 'jsonl', got {metadata_format!r}")
        for name, pattern in (("features_pattern", features_pattern), ("metadata_pattern", metadata_pattern)):
            try:
                a, b = pattern.format(shard=0), pattern.format(shard=1)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{name} {pattern!r}: must use only the field {{shard}} ({e})") from None
            if a == b or os.path.isabs(a) or ".." in a.split("/") or a.split("/")[0] in (".store", ERRORS):
                raise ValueError(f"{name} {pattern!r}: must be a relative path containing {{shard}}")
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ValueError(f"{out_dir}: exists and is not a folder")
        refuse_foreign_out(out_dir)  # a user's folder is never filled, not even with overwrite=True

        given = images
        reserved = ("id", "path") + (tuple(row_columns(self.tiling)) if self.tiling is not None else ())
        if isinstance(images, (str, os.PathLike)):  # a folder or list file: recorded with absolute paths
            _check_not_empty("images", images)
            listed = list_images(images)
            images = resolve_input_paths(listed, out_dir, _extra_columns(extra_columns, len(listed), reserved))
        ds = self._dataset(images)
        _check_inputs(ds, given)
        paths, n = ds.paths, len(ds)
        columns = _extra_columns(extra_columns, n, reserved)
        arrow_columns = _arrow_columns(columns) if metadata_format == "parquet" else None  # refused before work
        if metadata_format == "jsonl":
            _check_json_columns(columns)
        t0 = time.perf_counter()
        info = self.model_info()  # hashes every weight byte once per model (cached while the weights are unchanged)
        fingerprint_s = {"fingerprint_seconds": round(time.perf_counter() - t0, 3)}
        with warnings.catch_warnings():
            if preprocess_id is not None:  # the warning asks for it: given, the callables are identified
                warnings.simplefilter("ignore", PreprocessingFingerprintWarning)
            preprocessing = self.input_preprocessing(images)
        job = self.signature(paths, columns, shard_size=shard_size, features_pattern=features_pattern,
                             metadata_pattern=metadata_pattern, metadata_format=metadata_format,
                             manifest_extra=manifest_extra, model_info=info,
                             preprocessing=preprocessing, preprocess_id=preprocess_id)
        old = read_manifest(out_dir) if os.path.isdir(out_dir) else None
        leftover_parts = os.path.isdir(os.path.join(out_dir, PARTS))
        if old is not None:
            refuse_not_features(out_dir, old)  # also with overwrite: an index folder is not replaced by features
        if old is not None and not overwrite and not _same_job(old, job):
            _refuse_other(out_dir, old, job, paths)
        _refuse_unverified_reuse(out_dir, old, job)
        if leftover_parts and not discard_pending:
            _refuse_other_parts(out_dir, job)
        if old is not None and _same_job(old, job) and not leftover_parts:
            return dict(old, timing=dict(DONE_STATS, **fingerprint_s))  # finished: nothing is rewritten
        plan = dict(out_dir=out_dir, ds=ds, paths=paths, columns=columns, arrow_columns=arrow_columns, info=info,
                    job=job, shard_size=shard_size,
                    features_pattern=features_pattern, metadata_pattern=metadata_pattern,
                    metadata_format=metadata_format, overwrite=overwrite, discard_pending=discard_pending)
        rank, world = _dist_rank_world()
        try:
            if world > 1:
                from .distributed_features import write_distributed

                return write_distributed(self, plan, rank, world)

            with Store(out_dir, job=job, discard_pending=discard_pending, description="feature folder") as st:
                if st.manifest is not None and _same_job(st.manifest, job):
                    _remove_parts(out_dir)
                    return dict(st.manifest, timing=dict(DONE_STATS, **fingerprint_s))  # finished meanwhile
                if st.manifest is not None:
                    refuse_not_features(out_dir, st.manifest)  # committed meanwhile by another tool
                if st.manifest is not None and not overwrite:
                    _refuse_other(out_dir, st.manifest, job, paths)
                self._arm_warnings(info)
                shards = _plan_shards(plan, st.generation)
                records, stats = self._write_shards(st, plan, shards)
                committed = _commit_features(st, plan, shards, records)
        except PendingJobError as e:
            raise PendingJobError(_pending_message(out_dir, job, e)) from None
        finally:
            self._armed = None
        return dict(committed, timing=dict(stats, **fingerprint_s))

    def _arm_warnings(self, info: Optional[dict]) -> None:
        """:meth:`write` has accepted the job (every check passed, the store's refusal of a different pending job
        included): the warnings about the model (:attr:`held_warnings`; :attr:`random_init_warning` when it has
        random weights) print when it first computes features (:meth:`_fire_warnings`), so that a refused call,
        one whose images are all unreadable included, reports only its error."""
        self._armed = (info,)

    def _fire_warnings(self) -> None:
        """Print what :meth:`_arm_warnings` armed, once."""
        from .cli import emit_held

        armed, self._armed = getattr(self, "_armed", None), None
        if armed is None:
            return
        held, self.held_warnings = list(self.held_warnings), []
        emit_held(held)
        info = armed[0]
        if info is not None and info.get("random_init") and self.random_init_warning:
            logger.warning(self.random_init_warning.format(name=info.get("name")))

    def _write_shards(self, st, plan: dict, shards: list[dict]) -> tuple[dict, dict]:
        """Compute and write ``shards`` (those a resumed job has not finished) as data files of the store ``st``.

        Returns ``({shard index: record}, timing)``; a record (``count``, ``shape``, ``errors``) is saved in the
        store's journal once both files of its shard are durable.
        """
        ds, paths, columns = plan["ds"], plan["paths"], plan["columns"]
        shard_size, metadata_format = plan["shard_size"], plan["metadata_format"]
        records: dict[int, dict] = {}
        for s in shards:  # shards an interrupted run of this job finished (files complete, record saved)
            rec = st.state.get(f"shard-{s['index']}")
            if rec is not None and {s["features"], s["metadata"]} <= st.pending_files:
                records[s["index"]] = rec
        feature_shape = _known_shape(records.values())
        arrow_columns = plan["arrow_columns"]

        def finish(s: dict, feats: list, ids: list, errs: list, shape: tuple, row_cols=None) -> None:
            arr = np.concatenate(feats) if feats else np.zeros((0, *shape), np.float32)
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            with _writing(os.path.join(st.folder, s["features"])):
                with st.open_file(s["features"]) as tmp, open(tmp, "wb") as f:
                    np.save(_ChunkedSink(f), arr)
            with _writing(os.path.join(st.folder, s["metadata"])):
                with st.open_file(s["metadata"]) as tmp:
                    _write_metadata(tmp, metadata_format, ids, paths, columns, arrow_columns, row_cols)
            # sha256 of the float32 rows: the shard's content identity, recorded in the manifest (a job over
            # this folder, e.g. an index build, is resumed only over the same content, without re-reading it)
            rec = {"count": len(ids), "shape": list(arr.shape[1:]), "errors": sorted([int(i), e] for i, e in errs),
                   "sha256": hashlib.sha256(arr.data).hexdigest()}
            with _writing(os.path.join(st.folder, ".store", "journal.jsonl")):
                st.save_state(**{f"shard-{s['index']}": rec})  # the shard is done once this is durable
            records[s["index"]] = json.loads(json.dumps(rec))

        pending = [s for s in shards if s["index"] not in records]
        # batches never cross a shard boundary, so a shard's numbers do not depend on what else is pending
        batches = [b for s in pending for b in self._batches(s["start"], s["end"], ds)]
        bufs = {s["index"]: ([], [], [], 0) for s in pending}
        tile_cols: dict[int, dict] = {}  # tiles: per-row metadata columns of each pending shard
        waiting = []  # finished shards with no readable image, written once the feature shape is known
        by_index = {s["index"]: s for s in shards}
        for ids, feats, errs, *b_tiles in self._run(ds, batches, sum(s["end"] - s["start"] for s in pending)):
            k = (ids[0] if ids else errs[0][0]) // shard_size
            for key, v in (b_tiles[0] if b_tiles else {}).items():
                tile_cols.setdefault(k, {}).setdefault(key, []).extend(v)
            f_list, id_list, err_list, seen = bufs[k]
            if feats is not None:
                self._fire_warnings()  # the first features of the job: the model's warnings print now
                f_list.append(feats)
                feature_shape = feature_shape or tuple(feats.shape[1:])
            id_list.extend(ids)
            err_list.extend(errs)
            bufs[k] = (f_list, id_list, err_list, seen + len(set(ids)) + len(errs))  # images (a tile row each)
            s = by_index[k]
            if bufs[k][3] == s["end"] - s["start"]:
                waiting.append(k)
                if feature_shape is not None:
                    for j in waiting:
                        finish(by_index[j], *bufs.pop(j)[:3], feature_shape, _tile_cols(self, tile_cols, j))
                    waiting = []
        if waiting and feature_shape is None:  # no image of the whole job could be read
            feature_shape = self._blank_output_shape()
        for j in waiting:
            finish(by_index[j], *bufs.pop(j)[:3], feature_shape or (0,), _tile_cols(self, tile_cols, j))
        return records, (dict(self.last_stats) if pending else dict(DONE_STATS))

    def _blank_output_shape(self) -> Optional[tuple]:
        """The shape of one output row, from a blank image (with tiles: a blank tile) at the preset
        preprocessing's size: for a job none of whose images could be read (its empty features and manifest
        record the model's dimension, ``(0, D)``, not ``(0, 0)``). ``None`` when that size is not known here (a
        custom transform)."""
        size = self.preprocessing.get("image_size") if self._preset_preprocessing else None
        if not isinstance(size, int):
            return None
        blank = torch.zeros(1, 3, size, size)
        if self.tiling is not None:  # pooling the tiles of an image keeps the row shape of one tile
            return tuple(self.tiling.encoder(_RawEncoder(self))(blank).shape[1:])
        return tuple(self.encode(blank, normalize=False).shape[1:])


def prefetch(iterable, depth: int = 2) -> Iterator:
    """The items of ``iterable`` in order, produced by a background thread up to ``depth`` items ahead.

    An exception raised while producing an item is raised here, at that item. Closing the generator (or
    leaving the loop early) stops the thread after the item it is producing.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(("error", e))

    thread = threading.Thread(target=work, name="internvit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------------------
# Committing
# ---------------------------------------------------------------------------------------------------
#: timing of a call that computed nothing
DONE_STATS = {"seconds": 0.0, "images": 0, "images_per_s": None}


def _dist_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _remove_parts(out_dir: str) -> None:
    import shutil

    from .store import fsync_dir

    parts = os.path.join(out_dir, PARTS)
    if os.path.isdir(parts):
        shutil.rmtree(parts)
        fsync_dir(out_dir)


def _plan_shards(plan: dict, generation: int) -> list[dict]:
    """The shards of a write, their rows and their file names (generation 1 keeps the plain names)."""
    from .store import generation_name

    n, size = len(plan["paths"]), plan["shard_size"]

    def named(pattern: str, k: int) -> str:
        rel = pattern.format(shard=k)
        return rel if generation == 1 else generation_name(rel, generation)

    return [{"index": k, "start": k * size, "end": min((k + 1) * size, n),
             "features": named(plan["features_pattern"], k), "metadata": named(plan["metadata_pattern"], k)}
            for k in range(math.ceil(n / size))]


def _commit_features(st, plan: dict, shards: list[dict], records: dict) -> dict:
    """Write ``errors.jsonl`` and commit the manifest of a feature folder (every shard written)."""
    from .store import generation_name

    paths, job = plan["paths"], plan["job"]
    gen = st.generation
    errors = sorted((i, e) for rec in records.values() for i, e in rec["errors"])
    errors_file = ERRORS if gen == 1 else generation_name(ERRORS, gen)
    with _writing(os.path.join(st.folder, errors_file)):
        st.write_bytes(errors_file, "".join(
            json.dumps({"id": i, "path": output_text(paths[i]), "error": output_text(e)}, ensure_ascii=False) + "\n"
            for i, e in errors).encode("utf-8"))  # also when empty: same files on every run
    feature_shape = list(_known_shape(records[s["index"]] for s in shards) or (0,))
    manifest = {k: v for k, v in job.items() if k != "extra"}
    manifest["model"] = plan["info"]  # with its name (not part of the job identity)
    manifest.update({
        "feature_shape": feature_shape,
        "dim": feature_shape[0],
        "count": int(sum(int(r["count"]) for r in records.values())),
        "num_errors": len(errors),
        "num_nonfinite": sum(1 for _, e in errors if e.startswith(NONFINITE_ERROR)),
        "num_escaped_paths": sum(1 for p in paths if output_text(p) != p),
        "errors_file": errors_file,
        "shards": [dict(s, count=int(records[s["index"]]["count"]),
                        **({"sha256": records[s["index"]]["sha256"]} if "sha256" in records[s["index"]] else {}))
                   for s in shards],
    })
    manifest.update(job["extra"])
    files = [errors_file] + [s[key] for s in shards for key in ("features", "metadata")]
    with _writing(os.path.join(st.folder, MANIFEST)):
        committed = st.commit(manifest, files)
    _remove_parts(plan["out_dir"])
    return committed


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
def inputs_checksum(paths: Sequence[str], extra_columns: Optional[Mapping[str, Sequence]] = None) -> str:
    """SHA-256 of every input path and extra-column value, streamed (memory does not grow with the inputs)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fspath(p).encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    for name in sorted(extra_columns or {}):
        h.update(json.dumps(name).encode("utf-8") + b"\n")
        for v in (extra_columns or {})[name]:
            h.update(json.dumps(_to_json_value(v), default=str, ensure_ascii=False).encode("utf-8", "surrogateescape"))
            h.update(b"\n")
    return h.hexdigest()


def canonical_paths(paths: Sequence[str]) -> list[str]:
    """``paths`` made absolute, each file's folder by its real path (``os.path.realpath``: ``./many``, ``many``,
    an absolute path, another working directory or a symlinked folder all give the same text); the file name
    itself is kept, so a symlinked *file* stays its own row. ``realpath`` runs once per folder."""
    real: dict[str, str] = {}
    out = []
    for p in paths:
        folder, name = os.path.split(os.path.abspath(os.fspath(p)))
        if folder not in real:
            real[folder] = os.path.realpath(folder)
        out.append(os.path.join(real[folder], name))
    return out


def resolve_input_paths(paths: Sequence[str], out_dir: Union[str, os.PathLike],
                        extra_columns: Optional[Mapping[str, Sequence]] = None) -> list[str]:
    """The paths :meth:`FeatureExtractor.write` records for a folder or list file: :func:`canonical_paths`, so
    another spelling of the same folder is the same job (resumed or reused). A folder ``out_dir`` holding a job
    (finished or interrupted) whose inputs are ``paths`` as listed (written before paths were made absolute)
    keeps them as listed, so that job still resumes."""
    paths = [os.fspath(p) for p in paths]
    canon = canonical_paths(paths)
    if canon == paths:
        return canon
    out_dir = os.fspath(out_dir)
    recorded = set()
    if out_dir and os.path.isdir(out_dir):
        from .store import read_manifest

        recorded.add((read_manifest(out_dir) or {}).get("inputs_checksum"))
        recorded.add(((_pending_header(out_dir) or {}).get("job") or {}).get("inputs_checksum"))
    recorded.discard(None)
    if recorded and inputs_checksum(canon, extra_columns) not in recorded \
            and inputs_checksum(paths, extra_columns) in recorded:
        return paths
    return canon


#: entries that make a folder a feature extraction's (besides the store's own ``.store`` and ``.parts``)
FEATURE_FOLDER_MARKERS = (MANIFEST, "progress.json")


def refuse_foreign_out(out_dir: Union[str, os.PathLike]) -> None:
    """Refuse an output folder that holds files but no feature extraction (a user's photos, another tool's
    output): ``FileExistsError`` naming a few of its entries; ``NotADirectoryError`` when ``out_dir`` is a file
    or lies under one. A missing or empty folder, or one of a finished or interrupted feature extraction (any
    job: another job's finished features are then refused or replaced by :meth:`FeatureExtractor.write`), passes.
    The one check of :meth:`FeatureExtractor.write` and ``tools/extract_features.py``, before any work."""
    from .store import refuse_foreign_folder

    refuse_foreign_folder(out_dir, FEATURE_FOLDER_MARKERS, "feature extraction")


def _same_job(manifest: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    from .store import job_id

    return (manifest.get("_store") or {}).get("job_id") == job_id(job)


#: the end of every refusal of a folder that holds finished features of another job
FINISHED_HINT = ("use another output folder (this one holds finished features: delete it, or pass --overwrite "
                 "(overwrite=True), only if you no longer need them)")


def _inputs_difference(out_dir: str, manifest: Mapping[str, Any], paths: Optional[Sequence[str]]) -> str:
    """In words, how the committed inputs of ``manifest`` differ from ``paths`` (same number of inputs, another
    checksum): the first row whose path differs, read shard by shard from the folder's metadata and
    ``errors.jsonl`` (it stops at the first difference, usually in the first shard)."""
    if paths is None:
        return "the image paths or extra-column values differ"
    try:
        errors: dict[int, str] = {}
        err_file = os.path.join(out_dir, manifest.get("errors_file") or ERRORS)
        if os.path.isfile(err_file):
            with open(err_file, encoding="utf-8") as f:
                errors = {int(r["id"]): r["path"] for r in map(json.loads, f) if r}
        for s in manifest["shards"]:
            there = {int(r["id"]): r["path"] for r in _read_rows(out_dir, dict(manifest, shards=[s]), ["id", "path"])}
            for i in range(int(s["start"]), int(s["end"])):
                old, now = there.get(i, errors.get(i)), output_text(paths[i])
                if old is not None and old != now:
                    return (f"the image paths differ (row {i}: {old!r} there, {now!r} now; give the images of the "
                            f"finished job: a folder or list file is recorded with absolute paths, so another "
                            f"spelling of the same folder is the same job)")
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable record: say what is known
        return "the image paths or extra-column values differ"
    return "the image paths are the same, but the extra-column values differ"


def refuse_not_features(out_dir: str, manifest: Mapping[str, Any]) -> None:
    """``ValueError`` when the committed ``manifest.json`` of ``out_dir`` is not a feature folder's (a FAISS index
    folder of ``tools/build_index.py``, another tool's manifest): with or without ``overwrite`` (which replaced an
    index folder's manifest by features, leaving its index file orphaned), only features are ever replaced."""
    if "shards" not in manifest or "_store" not in manifest:
        raise ValueError(f"{out_dir}: its manifest.json is not a feature folder's (no store record and "
                         f"shards): a folder no feature extraction wrote (overwrite / --overwrite replaces only "
                         f"features); give a new or empty folder")


def _refuse_other(out_dir: str, manifest: Mapping[str, Any], job: Mapping[str, Any],
                  paths: Optional[Sequence[str]] = None) -> None:
    """Raise ``ValueError`` naming the first field in which committed features differ from ``job`` (or saying
    that the folder's ``manifest.json`` is not one a feature extraction wrote). ``paths`` (this call's inputs)
    let a difference of inputs name the first row that differs."""
    refuse_not_features(out_dir, manifest)
    for key, b in job.items():
        if key == "extra":
            a = {k: manifest.get(k) for k in b}
        else:
            a = manifest.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in MODEL_DESCRIPTION_KEYS}
            if a != b:
                diff = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                raise ValueError(f"{out_dir} holds features made with a different model ({diff} differs); "
                                 f"{FINISHED_HINT}")
        elif key == "num_inputs" and a != b:
            raise ValueError(f"{out_dir} holds features of another list of images (num_inputs): the number of "
                             f"input images differs ({a} there, {b} now); {FINISHED_HINT}")
        elif key == "inputs_checksum" and a != b:
            raise ValueError(f"{out_dir} holds features of another list of images (inputs_checksum): "
                             f"{_inputs_difference(out_dir, manifest, paths)}; {FINISHED_HINT}")
        elif a != b:
            raise ValueError(f"{out_dir} holds features made with different arguments ({key}: "
                             f"{_short(a)} there, {_short(b)} now); {FINISHED_HINT}")
    if manifest.get("tiling") != job.get("tiling"):  # tiles vs whole images (only tile jobs carry the key)
        raise ValueError(f"{out_dir} holds features made with different arguments (tiling: "
                         f"{_short(manifest.get('tiling'))} there, {_short(job.get('tiling'))} now); "
                         f"{FINISHED_HINT}")
    raise ValueError(f"{out_dir} holds features of another job (written by another version?); {FINISHED_HINT}")


def _pending_header(out_dir: str) -> Optional[dict]:
    """The ``begin`` record of the job pending in ``out_dir``'s store journal (``None`` when there is none or it
    belongs to an already committed generation). Read only: no lock is taken."""
    from .store import JOURNAL, STORE_KEY

    try:
        with open(os.path.join(out_dir, JOURNAL), encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (FileNotFoundError, NotADirectoryError):
        return None
    header = None
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("op") == "begin":
            header = rec
    if header is None:
        return None
    from .store import read_manifest

    base = int(((read_manifest(out_dir) or {}).get(STORE_KEY) or {}).get("generation") or 0)
    return header if header.get("generation") == base else None


def _refuse_other_parts(out_dir: str, job: Mapping[str, Any]) -> None:
    """``PendingJobError`` when ``out_dir``'s :data:`PARTS` holds a part of an interrupted distributed job (pending
    or committed, before rank 0's merge) that is not ``job``'s: a different job took the folder and dropped
    those parts silently, where an interrupted single-process job is refused (pass ``discard_pending``)."""
    import re

    from .store import STORE_KEY, PendingJobError, _first_difference, job_id, read_manifest

    parts = os.path.join(out_dir, PARTS)
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else ():
        m = re.fullmatch(r"rank-(\d+)-of-(\d+)", name)
        if m is None:
            continue
        folder = os.path.join(parts, name)
        mine = dict(job, part={"rank": int(m[1]), "world": int(m[2])})
        header = _pending_header(folder)
        found = (header or {}).get("job_id") or ((read_manifest(folder) or {}).get(STORE_KEY) or {}).get("job_id")
        if found is None or found == job_id(mine):
            continue
        d = _first_difference(header.get("job") or {}, mine) if header else None
        what = f" ({d[0]}: {_short(d[1])} there, {_short(d[2])} now)" if d else ""
        raise PendingJobError(f"{out_dir}: an interrupted job of {m[2]} processes is pending in this feature folder "
                              f"({PARTS}/{name}) and this one differs{what}; rerun the interrupted command to finish "
                              f"it, or drop it with --discard-pending (discard_pending=True)")


def _refuse_unverified_reuse(out_dir: str, old: Optional[dict], job: Mapping[str, Any]) -> None:
    """Refuse to reuse or resume a job whose preprocessing includes callables known only by name."""
    from .store import job_id

    names = (job.get("preprocessing") or {}).get("unverified_callables")
    if not names or "preprocess_id" in job["preprocessing"]:
        return
    header = _pending_header(out_dir) if os.path.isdir(out_dir) else None
    finished = old is not None and _same_job(old, job)
    pending = header is not None and header.get("job_id") == job_id(job)
    if finished or pending:
        raise ValueError(
            f"{out_dir} holds {'features' if finished else 'an interrupted job'} made with a preprocessing that "
            f"includes {', '.join(names)}, whose parameters cannot be recorded, so it cannot be told whether "
            f"they match this call's; pass preprocess_id='...' (a name you change whenever that preprocessing "
            f"changes) to {'reuse' if finished else 'resume'} it, or use another output folder or delete it")


def _pending_message(out_dir: str, job: Mapping[str, Any], e: BaseException) -> str:
    """The message of a refused pending job, naming the field that differs and how to drop the job."""
    from .store import _first_difference

    header = _pending_header(out_dir) or {}
    d = _first_difference(header.get("job") or {}, dict(job)) if header else None
    if not d:
        return str(e)
    what = f" ({d[0]}: {_short(d[1])} there, {_short(d[2])} now)"
    if d[0] == "num_inputs":
        what = f" (num_inputs): the number of input images differs ({d[1]} there, {d[2]} now)"
    elif d[0] == "inputs_checksum":
        what = (f" (inputs_checksum): the same number of input images ({job.get('num_inputs')}) but other image "
                f"paths or extra-column values (another folder or list of images, or its files changed; a folder or "
                f"list file is recorded with absolute paths, so another spelling of the same folder is the same job)")
    return (f"{out_dir}: an interrupted job is pending in this feature folder and this one differs{what}; rerun "
            f"the interrupted command to finish it, or drop it with --discard-pending (discard_pending=True)")


def _known_shape(records) -> Optional[tuple]:
    for rec in records:
        if rec["count"] > 0 or rec["shape"] != [0]:
            return tuple(rec["shape"])
    return None


def _extra_columns(extra_columns: Optional[Mapping[str, Sequence]], n: int,
                   reserved: Sequence[str] = ("id", "path")) -> dict:
    """The extra metadata columns as lists of ``n`` values; ``ValueError`` for a name among ``reserved`` (the
    columns the job writes itself: ``id``, ``path`` and, with tiles, the tile columns, which took the place of a
    user's column of that name silently) or a column of another length."""
    out = {}
    for name, values in (extra_columns or {}).items():
        if name in reserved:
            raise ValueError(f"extra_columns: {name!r} is a reserved column name (this job writes "
                             f"{', '.join(reserved)} itself); rename it")
        if not isinstance(name, str) or not name:
            raise ValueError(f"extra_columns: column names must be non-empty str, got {name!r}")
        if isinstance(values, (str, bytes)):  # 'ab' for 2 images gave 'a' and 'b', silently
            raise TypeError(f"extra_columns[{name!r}] is a {type(values).__name__}, not one value per image: "
                            f"give a list ([{values!r:.40}] * n for the same value on every row)")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"extra_columns[{name!r}] has {len(values)} values for {n} images")
        out[name] = values
    return out


def _plain(v: Any) -> Any:
    """An extra-column value as it must read back: NumPy scalars and arrays as Python values, tuples as lists,
    strings as written (:func:`output_text`)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return _output_value(v)


def _kept(want: Any, got: Any) -> bool:
    """Whether ``got`` (read back from Arrow) is ``want`` with its types: ``1`` read back as ``1.0``, ``'a'`` as
    ``b'a'`` or a missing key as ``None`` is not."""
    if type(want) is not type(got):
        return False
    if isinstance(want, list):
        return len(want) == len(got) and all(_kept(a, b) for a, b in zip(want, got))
    if isinstance(want, dict):
        return want.keys() == got.keys() and all(_kept(want[k], got[k]) for k in want)
    return want == got or (want != want and got != got)  # NaN is kept as NaN


#: the fields of a feature folder's manifest that the job writes itself (:meth:`FeatureExtractor.write`; the store
#: adds ``_store``, ``write`` returns ``timing``): ``manifest_extra`` may not replace them
MANIFEST_FIELDS = ("dtype", "model", "embed_fn", "preprocessing", "pool", "layers", "normalize", "shard_size",
                   "num_inputs", "inputs_checksum", "features_pattern", "metadata_pattern", "metadata_format",
                   "tiling", "normalize_after", "feature_shape", "dim", "count", "num_errors", "num_nonfinite",
                   "num_escaped_paths", "errors_file", "shards", "_store", "timing")


def check_manifest_extra(manifest_extra: Optional[Mapping[str, Any]]) -> dict:
    """``manifest_extra`` as a dict, checked before any work: a ``Mapping`` of str keys that are not the
    manifest's own fields (:data:`MANIFEST_FIELDS`: ``{'count': 99}`` replaced the count, ``{'shards': 1}``
    committed a folder no reader could open) holding JSON values JSON keeps as they are (an ``object()`` was
    written as its ``repr``, with a memory address that differs on every run; NaN is not JSON)."""
    if manifest_extra is None:
        return {}
    if not isinstance(manifest_extra, Mapping):
        raise TypeError(f"manifest_extra must be a dict, got {type(manifest_extra).__name__}")
    own = [k for k in manifest_extra if k in MANIFEST_FIELDS]
    if own:
        raise ValueError(f"manifest_extra: {', '.join(map(repr, own))} is a field the job writes itself; use "
                         f"another name")
    for k, v in manifest_extra.items():
        try:
            json.dumps(v, allow_nan=False)  # no default=: what JSON cannot hold is refused, never its repr
        except (TypeError, ValueError):
            ok = False
        else:
            ok = isinstance(k, str)
        if not ok:
            raise ValueError(f"manifest_extra[{k!r}] = {v!r:.60}: give JSON data (None, bool, int, finite float, "
                             f"str, lists and dicts of them) under a str key")
    return dict(manifest_extra)


def _json_native(v: Any) -> bool:
    """Whether JSON holds ``v`` as it is (``None``, bool, int, float, str, lists and str-keyed dicts of them)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_json_native(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and _json_native(x) for k, x in v.items())


def _check_json_columns(columns: dict) -> None:
    """``ValueError`` naming the column and row of a value JSON lines would store as another (``b'a'`` as the
    text ``"b'a'"``, a path object as text, an int dict key as a str key)."""
    for k, v in columns.items():
        for i, x in enumerate(v):
            x = _plain(x)
            if not _json_native(x):
                raise ValueError(f"extra_columns[{k!r}]: row {i} holds {x!r} ({type(x).__name__}), which a JSON "
                                 f"lines metadata file would store as another value (e.g. its text); give "
                                 f"None, bool, int, float, str, lists or str-keyed dicts of them")


def _arrow_columns(columns: dict) -> dict:
    """Each extra column converted to Arrow once (per shard only the rows are taken: linear in total).

    A parquet column holds one type: a column whose values Arrow would store as another type (ints among floats
    read back as floats, strings among bytes as bytes) or cannot store together (ints and strings) is refused
    with ``ValueError`` naming the column and its first row that would not be kept, never coerced silently."""
    import pyarrow as pa

    out = {}
    for k, v in columns.items():
        values = [_plain(x) for x in v]  # what must read back
        advice = ("give the column values of one type (e.g. all str), or write metadata_format='jsonl', which "
                  "keeps each value's type")
        try:
            arr = pa.array([_output_value(x) for x in v])  # NumPy scalars keep their Arrow type (float32, ...)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as e:
            kinds = {}
            for i, x in enumerate(values):
                kinds.setdefault(type(x).__name__, i)
            found = ", ".join(f"{t} (first at row {i})" for t, i in kinds.items())
            raise ValueError(f"extra_columns[{k!r}]: cannot be stored in one parquet column: values of types "
                             f"{found} ({str(e).splitlines()[0]}); {advice}") from None
        back = arr.to_pylist()
        bad = next((i for i, (a, b) in enumerate(zip(values, back)) if not _kept(a, b)), None)
        if bad is not None:
            raise ValueError(f"extra_columns[{k!r}]: row {bad} holds {values[bad]!r} "
                             f"({type(values[bad]).__name__}), which a parquet column of {arr.type} stores as "
                             f"{back[bad]!r}; {advice}")
        out[k] = arr
    return out


def _to_json_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _write_metadata(path: str, fmt: str, ids: list[int], paths: Sequence[str], columns: dict,
                    arrow_columns: Optional[dict] = None, row_columns: Optional[dict] = None) -> None:
    """Write the metadata rows ``ids`` (input rows) to ``path`` (exactly that file).

    ``row_columns`` (tiles): more columns given per written row (aligned with ``ids``), after the others.
    """
    row_columns = row_columns or {}
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for j, i in enumerate(ids):
                row = {"id": int(i), "path": output_text(paths[i])}
                row.update({k: _output_value(_to_json_value(v[i])) for k, v in columns.items()})
                row.update({k: _to_json_value(v[j]) for k, v in row_columns.items()})
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_columns = arrow_columns if arrow_columns is not None else _arrow_columns(columns)
    take = pa.array(ids, pa.int64())
    data = {"id": take, "path": pa.array([output_text(paths[i]) for i in ids], pa.string())}
    for k, full in arrow_columns.items():
        data[k] = full.take(take)
    for k, v in row_columns.items():
        data[k] = pa.array(v)
    pq.write_table(pa.table(data), path)


def _tile_cols(fx: "FeatureExtractor", tile_cols: dict, shard: int) -> Optional[dict]:
    """The per-row tile columns of a finished shard (``None`` without tiles; empty lists for an empty shard)."""
    if fx.tiling is None:
        return None
    from .tiling import row_columns

    return tile_cols.pop(shard, None) or {k: [] for k in row_columns(fx.tiling)}


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit] + "..."


def _read_rows(out_dir: str, manifest: dict, columns: Optional[Sequence[str]] = None) -> list[dict]:
    rows = []
    for s in manifest["shards"]:
        mpath = os.path.join(out_dir, s["metadata"])
        if manifest.get("metadata_format", "parquet") == "jsonl":
            with open(mpath, encoding="utf-8") as f:
                part = [json.loads(line) for line in f if line.strip()]
            rows.extend(part if columns is None else [{c: r.get(c) for c in columns} for r in part])
        else:
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(mpath, columns=list(columns) if columns else None).to_pylist())
    return rows


def _committed(out_dir: str) -> dict:
    from .store import read_manifest

    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{os.path.join(out_dir, MANIFEST)}: no manifest (not a finished feature folder)")
    if "shards" not in manifest:
        raise ValueError(f"{os.path.join(out_dir, MANIFEST)}: not a feature folder manifest (no 'shards')")
    return manifest


def read_features(out_dir: Union[str, os.PathLike]) -> tuple[np.ndarray, list[dict]]:
    """Load a folder written by :meth:`FeatureExtractor.write`: ``(features, metadata rows)`` in input order.

    ``features`` is float32 ``(count, *feature_shape)``; only the files of the committed manifest are read
    (one consistent state, even while a writer works on the folder). Raises ``FileNotFoundError`` when
    nothing was committed.
    """
    from .store import read_consistent

    out_dir = os.fspath(out_dir)
    _committed(out_dir)

    def read(manifest: dict):
        feats = [np.load(os.path.join(out_dir, s["features"])) for s in manifest["shards"]]
        rows = _read_rows(out_dir, manifest)
        shape = tuple(manifest.get("feature_shape") or (0,))
        return (np.concatenate(feats) if feats else np.zeros((0, *shape), np.float32)), rows

    return read_consistent(out_dir, read)


class MappedFeatures:
    """Read-only, memory-mapped features of a committed feature folder (no copy in RAM).

    ``len(m)`` rows; ``m[i]`` is row ``i`` (an ``np.ndarray`` view of ``feature_shape``, float32);
    ``m.shape`` / ``m.dtype``; ``np.asarray(m)`` materialises all rows. Each shard ``.npy`` is mapped with
    ``np.load(mmap_mode='r')``; the files stay readable even if a later writer replaces the folder's content.
    """

    def __init__(self, out_dir: str, manifest: dict) -> None:
        self.out_dir, self.manifest = out_dir, manifest
        self.parts = [np.load(os.path.join(out_dir, s["features"]), mmap_mode="r") for s in manifest["shards"]]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), *tuple(manifest.get("feature_shape") or (0,)))
        self.dtype = np.dtype(np.float32)
        self.row_shape: Optional[tuple] = None

    def reshape_rows(self, row_shape: Sequence[int]) -> "MappedFeatures":
        """View every row as ``row_shape`` (one ``-1`` allowed), e.g. flattened tokens as ``(L, C)``; returns self."""
        row = np.empty(self.shape[1:], np.uint8).reshape(tuple(row_shape))  # raises if the sizes do not fit
        self.row_shape = row.shape
        self.shape = (self.shape[0], *row.shape)
        return self

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} features")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        row = self.parts[k][i - self.offsets[k]]
        return row if self.row_shape is None else row.reshape(self.row_shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts) if self.parts else np.zeros(self.shape, np.float32)
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype)


def open_features(out_dir: Union[str, os.PathLike], columns: Optional[Sequence[str]] = None
                  ) -> tuple[MappedFeatures, list[dict]]:
    """Like :func:`read_features`, but the features are memory-mapped (:class:`MappedFeatures`) and only the
    metadata ``columns`` (all when ``None``) are read."""
    from .store import read_consistent

    out_dir = os.fspath(out_dir)
    _committed(out_dir)
    return read_consistent(out_dir, lambda m: (MappedFeatures(out_dir, m), _read_rows(out_dir, m, columns)))
