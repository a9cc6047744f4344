"""Feature extraction: pooled, multi-layer or dense features of an InternViT (or any image encoder).

:class:`FeatureExtractor` reads images through the model's own preprocessing and a ``DataLoader``;
``extract`` returns the features in memory, ``write`` stores them as shards committed through the durable
store (:mod:`internvit.store`: resumed after a kill, byte-identical to an uninterrupted run), with a
``manifest.json`` describing how they were made. :func:`read_features` loads such a folder back,
:func:`open_features` memory-maps it.

The output folder's code lives in its own modules (re-exported here): :mod:`internvit.feature_write` (what
``write`` runs), :mod:`internvit.feature_folder` (job identity, refusals, shard plan and commit),
:mod:`internvit.feature_metadata` (metadata columns and files) and :mod:`internvit.feature_read` (reading a
finished folder).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .cli import DTYPE_NAMES, check_device, check_flag, dtype_arg
from .data import ImageDataset, ImagesLike, IndexedDataset, collate_images, join_units, list_images, worker_units

# the output folder's code lives in feature_folder / feature_metadata / feature_read / feature_write; the names
# that were defined here before are re-exported (marked F401), so ``from internvit.features import X`` works
from .feature_folder import (
    DONE_STATS,  # noqa: F401
    FEATURE_FOLDER_MARKERS,  # noqa: F401
    FINISHED_HINT,  # noqa: F401
    MANIFEST_FIELDS,  # noqa: F401
    MODEL_DESCRIPTION_KEYS,
    NONFINITE_ERROR,
    _dist_rank_world,  # noqa: F401
    canonical_paths,
    check_manifest_extra,  # noqa: F401
    inputs_checksum,
    refuse_foreign_out,
    refuse_not_features,  # noqa: F401
    resolve_input_paths,
)
from .feature_metadata import output_text
from .feature_read import (
    ERRORS,  # noqa: F401
    MANIFEST,  # noqa: F401
    MappedFeatures,
    open_features,
    read_features,
)
from .feature_write import (
    _ChunkedSink,  # noqa: F401
    write_features,
    write_shards,
)
from .fingerprint import dataset_fingerprint, preprocessing_fingerprint, weights_fingerprint
from .store import PARTS  # noqa: F401
from .store import named_write_errors as _writing  # noqa: F401
from .transforms import build_transform, normalize_pixels, preprocess_config

__all__ = ["FeatureExtractor", "FeatureResult", "read_features", "open_features", "MappedFeatures", "parse_dtype",
           "weights_fingerprint", "inputs_checksum", "output_text", "canonical_paths", "resolve_input_paths",
           "refuse_foreign_out"]

logger = logging.getLogger("internvit")

POOLS = ("cls", "mean", "cls_mean", "grid")
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}


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
        return write_features(self, images, out_dir, shard_size=shard_size, features_pattern=features_pattern,
                              metadata_pattern=metadata_pattern, metadata_format=metadata_format,
                              extra_columns=extra_columns, manifest_extra=manifest_extra, overwrite=overwrite,
                              discard_pending=discard_pending, preprocess_id=preprocess_id)

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
        """Compute and write ``shards`` (those a resumed job has not finished) as data files of the store ``st``;
        returns ``({shard index: record}, timing)`` (:func:`internvit.feature_write.write_shards`)."""
        return write_shards(self, st, plan, shards)

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
