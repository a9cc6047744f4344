"""Feature extraction: pooled, multi-layer or dense features of an InternViT (or any image encoder).

:class:`FeatureExtractor` reads images through the model's own preprocessing and a ``DataLoader``;
``extract`` returns the features in memory, ``write`` stores them as shards that are written atomically and
resumed after an interruption (byte-identical to an uninterrupted run), with a ``manifest.json`` describing
how they were made. :func:`read_features` loads such a folder back.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import ImageDataset, ImagesLike, IndexedDataset, collate_images, list_images
from .transforms import build_transform, preprocess_config

POOLS = ("cls", "mean", "cls_mean", "grid")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ERRORS = "errors.jsonl"
PARTIAL_SUFFIX = ".partial"
#: manifest fields that must match for a resumed run to continue an output folder
SIGNATURE_KEYS = ("model", "embed_fn", "preprocessing", "pool", "layers", "dtype", "normalize", "shard_size",
                  "num_inputs", "inputs_checksum", "features_pattern", "metadata_pattern", "metadata_format")


@dataclass
class FeatureResult:
    """Features of the images that could be read, in input order.

    ``ids[j]`` is the input row of ``features[j]``; ``errors`` lists the skipped inputs as
    ``{'id', 'path', 'error'}``.
    """

    features: np.ndarray
    ids: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.float32`` / ``'fp32'`` / ``'bf16'`` / ... → ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from None


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the weights: a hash over names, shapes and a strided sample of every tensor."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _stable_repr(obj: Any) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


class FeatureExtractor:
    """Turn images into features with an InternViT (or any ``embed_fn``).

    Args:
        model: an :class:`~internvit.InternViT` (or a model with a ``vision_model``), moved to ``device`` and
            cast to ``dtype``. May be ``None`` when ``embed_fn`` and ``preprocess`` are given.
        preprocess: ``None`` (the model's preset), a dict as made by :func:`internvit.preprocess_config`
            (fields override the preset) or a callable PIL → tensor transform.
        pool: ``'cls'``, ``'mean'`` (mean of patch tokens), ``'cls_mean'`` (both, concatenated) or ``'grid'``
            (``(C, h, w)`` patch maps).
        layers: block indices (negatives allowed); several are concatenated on the channel axis. ``None`` =
            last block.
        embed_fn: ``callable(pixel_values) -> (B, D)``, replaces pooling (e.g. ``InternVL.encode_image``).
        normalize: L2-normalise each output vector (for ``'grid'``: each position's channel vector).
    """

    def __init__(
        self,
        model: Optional[nn.Module],
        preprocess: Union[None, Mapping[str, Any], Callable] = None,
        *,
        pool: str = "cls",
        layers: Optional[Sequence[int]] = None,
        batch_size: int = 32,
        num_workers: int = 0,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype] = torch.float32,
        embed_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        normalize: bool = False,
        progress: bool = True,
        model_name: Optional[str] = None,
    ) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if model is None and embed_fn is None:
            raise ValueError("FeatureExtractor needs a model (or an embed_fn)")
        if model is None and preprocess is None:
            raise ValueError("FeatureExtractor without a model needs preprocess= (a dict or a transform)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available")
        self.dtype = parse_dtype(dtype)
        self.pool, self.batch_size, self.num_workers = pool, int(batch_size), int(num_workers)
        self.embed_fn, self.normalize, self.progress = embed_fn, bool(normalize), progress
        if model is not None:
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
                self.backbone.resolve_indices(self.layers)  # raises naming the bad index
        self.model_name = model_name
        self.transform, self.preprocessing = self._resolve_preprocess(preprocess)
        self.last_stats: dict = {}

    # -- set-up ----------------------------------------------------------------------------------------
    def _resolve_preprocess(self, preprocess) -> tuple[Callable, dict]:
        if preprocess is not None and callable(preprocess) and not isinstance(preprocess, Mapping):
            return preprocess, {"transform": _stable_repr(preprocess)}
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
        }

    def _dataset(self, images: Union[ImagesLike, Dataset]) -> Dataset:
        if isinstance(images, ImageDataset):
            return images if images.transform is not None else ImageDataset(images.paths, self.transform)
        if isinstance(images, Dataset):
            return IndexedDataset(images)
        return ImageDataset(list_images(images), self.transform)

    # -- compute ---------------------------------------------------------------------------------------
    def _pool(self, patches: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        if self.pool == "grid":
            return patches.float()
        cls = prefix[:, 0].float()
        if self.pool == "cls":
            return cls
        mean = patches.float().mean(1)
        return mean if self.pool == "mean" else torch.cat([cls, mean], dim=-1)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of a preprocessed batch ``(B, 3, H, W)`` as a float32 tensor on ``device``."""
        x = pixel_values.to(self.device, non_blocking=True)
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
        if self.normalize:
            out = F.normalize(out, dim=1)
        return out

    def _run(self, dataset: Dataset, batches: list[list[int]], total: int
             ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        """Yield ``(ids, features, errors)`` per batch; batches are lists of dataset indices."""
        from tqdm.auto import tqdm

        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=collate_images, pin_memory=self.device.type == "cuda")
        start, done = time.perf_counter(), 0
        with tqdm(total=total, unit="img", desc="features", disable=not self.progress, smoothing=0.1) as bar:
            for pixels, ids, errors in loader:
                feats = self.encode(pixels).cpu().numpy() if pixels is not None else None
                done += len(ids) + len(errors)
                bar.update(len(ids) + len(errors))
                if errors:
                    bar.set_postfix(errors=len(errors), refresh=False)
                yield ids, feats, errors
        seconds = time.perf_counter() - start
        self.last_stats = {"seconds": round(seconds, 3), "images": done,
                           "images_per_s": round(done / seconds, 2) if seconds > 0 else None}

    def _batches(self, start: int, end: int) -> list[list[int]]:
        return [list(range(s, min(s + self.batch_size, end))) for s in range(start, end, self.batch_size)]

    def extract(self, images: Union[ImagesLike, Dataset]) -> FeatureResult:
        """Features of a folder / list file / list of paths / ``Dataset``, in memory (unreadable images skipped)."""
        ds = self._dataset(images)
        paths = ds.paths
        feats, ids, errors = [], [], []
        for b_ids, b_feats, b_errors in self._run(ds, self._batches(0, len(ds)), len(ds)):
            if b_feats is not None:
                feats.append(b_feats)
                ids.extend(b_ids)
            errors.extend({"id": i, "path": paths[i], "error": e} for i, e in b_errors)
        features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
        return FeatureResult(features.astype(np.float32, copy=False), ids, [paths[i] for i in ids], errors)

    # -- write -----------------------------------------------------------------------------------------
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
    ) -> dict:
        """Write features as shards of ``shard_size`` input rows, resumably; returns the manifest.

        Shard ``k`` covers input rows ``[k*shard_size, (k+1)*shard_size)``: a ``.npy`` of the kept rows and a
        metadata table (``id`` = input row, ``path``, and every ``extra_columns`` entry), each written to a
        temporary file and renamed. Unreadable images are listed in ``errors.jsonl``. Rerunning with the same
        arguments keeps finished shards and computes the rest; the result is byte-identical to an
        uninterrupted run. A folder made with other arguments raises ``ValueError``. ``manifest.json`` is
        written last.
        """
        out_dir = os.fspath(out_dir)
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        shard_size = int(shard_size)
        if metadata_format not in ("parquet", "jsonl"):
            raise ValueError(f"metadata_format must be 'parquet' or 'jsonl', got {metadata_format!r}")
        for name, pattern in (("features_pattern", features_pattern), ("metadata_pattern", metadata_pattern)):
            try:
                a, b = pattern.format(shard=0), pattern.format(shard=1)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{name} {pattern!r}: must use only the field {{shard}} ({e})") from None
            if a == b or os.path.isabs(a) or ".." in a.split("/"):
                raise ValueError(f"{name} {pattern!r}: must be a relative path containing {{shard}}")

        ds = self._dataset(images)
        paths, n = ds.paths, len(ds)
        columns = _extra_columns(extra_columns, n)
        checksum = hashlib.sha256("\n".join(paths).encode())
        checksum.update(json.dumps({k: list(v) for k, v in (extra_columns or {}).items()}, sort_keys=True,
                                   default=str).encode())
        signature = {
            "model": self.model_info(),
            "embed_fn": None if self.embed_fn is None else getattr(self.embed_fn, "__qualname__",
                                                                  _stable_repr(self.embed_fn)),
            "preprocessing": self.preprocessing,
            "pool": "embed_fn" if self.embed_fn is not None else self.pool,
            "layers": self.layers,
            "dtype": str(self.dtype).replace("torch.", ""),
            "normalize": self.normalize,
            "shard_size": shard_size,
            "num_inputs": n,
            "inputs_checksum": checksum.hexdigest(),
            "features_pattern": features_pattern,
            "metadata_pattern": metadata_pattern,
            "metadata_format": metadata_format,
        }
        signature = json.loads(json.dumps(signature, default=str))  # JSON-normalised, comparable with a file

        os.makedirs(out_dir, exist_ok=True)
        _check_resume(out_dir, signature)
        _remove_partials(out_dir)
        _write_json(os.path.join(out_dir, PROGRESS), {"signature": signature})

        errors = {r["id"]: r for r in _read_errors(os.path.join(out_dir, ERRORS)) if r["id"] < n}
        shards = []
        for k in range(math.ceil(n / shard_size)):
            start, end = k * shard_size, min((k + 1) * shard_size, n)
            shards.append({"index": k, "start": start, "end": end,
                           "features": features_pattern.format(shard=k),
                           "metadata": metadata_pattern.format(shard=k)})
        feature_shape, counts, pending = None, {}, []
        for s in shards:
            fpath, mpath = (os.path.join(out_dir, s[key]) for key in ("features", "metadata"))
            if os.path.isfile(fpath) and os.path.isfile(mpath):
                arr = np.load(fpath, mmap_mode="r")
                counts[s["index"]] = arr.shape[0]
                if arr.shape[0] > 0 or arr.shape[1:] != (0,):
                    feature_shape = feature_shape or tuple(arr.shape[1:])
            else:
                pending.append(s)

        def finish(s: dict, feats: list, ids: list, errs: list, shape: tuple) -> None:
            for i, e in errs:  # errors first: a shard counts as done only once its errors are recorded
                errors[i] = {"id": i, "path": paths[i], "error": e}
            if errs:
                _write_errors(os.path.join(out_dir, ERRORS), errors)
            arr = np.concatenate(feats) if feats else np.zeros((0, *shape), np.float32)
            _write_npy(os.path.join(out_dir, s["features"]), arr.astype(np.float32, copy=False))
            _write_metadata(os.path.join(out_dir, s["metadata"]), metadata_format, ids,
                            [paths[i] for i in ids], columns)
            counts[s["index"]] = len(ids)

        # batches never cross a shard boundary, so a shard's numbers do not depend on what else is pending
        batches = [b for s in pending for b in self._batches(s["start"], s["end"])]
        bufs = {s["index"]: ([], [], [], 0) for s in pending}
        waiting = []  # finished shards with no readable image, written once the feature shape is known
        by_index = {s["index"]: s for s in shards}
        for ids, feats, errs in self._run(ds, batches, sum(s["end"] - s["start"] for s in pending)):
            k = (ids[0] if ids else errs[0][0]) // shard_size
            f_list, id_list, err_list, seen = bufs[k]
            if feats is not None:
                f_list.append(feats)
                feature_shape = feature_shape or tuple(feats.shape[1:])
            id_list.extend(ids)
            err_list.extend(errs)
            bufs[k] = (f_list, id_list, err_list, seen + len(ids) + len(errs))
            s = by_index[k]
            if bufs[k][3] == s["end"] - s["start"]:
                waiting.append(k)
                if feature_shape is not None:
                    for j in waiting:
                        finish(by_index[j], *bufs.pop(j)[:3], feature_shape)
                    waiting = []
        for j in waiting:
            finish(by_index[j], *bufs.pop(j)[:3], feature_shape or (0,))
        _write_errors(os.path.join(out_dir, ERRORS), errors)  # also when empty: same files on every run

        feature_shape = list(feature_shape or (0,))
        manifest = dict(signature)
        manifest.update({
            "feature_shape": feature_shape,
            "dim": feature_shape[0],
            "count": int(sum(counts.values())),
            "num_errors": len(errors),
            "shards": [dict(s, count=int(counts[s["index"]])) for s in shards],
            "timing": dict(self.last_stats, finished_at=datetime.datetime.now().isoformat(timespec="seconds")),
        })
        manifest.update(manifest_extra or {})
        _write_json(os.path.join(out_dir, MANIFEST), manifest)
        os.remove(os.path.join(out_dir, PROGRESS))
        return manifest


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
def _extra_columns(extra_columns: Optional[Mapping[str, Sequence]], n: int) -> dict:
    out = {}
    for name, values in (extra_columns or {}).items():
        if name in ("id", "path"):
            raise ValueError(f"extra_columns: {name!r} is a reserved column name")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"extra_columns[{name!r}] has {len(values)} values for {n} images")
        out[name] = values
    return out


def _atomic(path: str, write: Callable[[str], None]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + PARTIAL_SUFFIX
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_npy(path: str, arr: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    _atomic(path, write)


def _write_json(path: str, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
    _atomic(path, write)


def _to_json_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _write_metadata(path: str, fmt: str, ids: list[int], paths: list[str], columns: dict) -> None:
    if fmt == "jsonl":
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                for j, i in enumerate(ids):
                    row = {"id": int(i), "path": paths[j]}
                    row.update({k: _to_json_value(v[i]) for k, v in columns.items()})
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return _atomic(path, write)

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = {"id": pa.array(ids, pa.int64()), "path": pa.array(paths, pa.string())}
    for k, v in columns.items():
        full = pa.array(v)
        data[k] = full.take(pa.array(ids, pa.int64()))
    table = pa.table(data)
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


def _read_errors(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                out.append({"id": int(rec["id"]), "path": rec.get("path"), "error": rec.get("error")})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a foreign or damaged line; rewritten from the records we keep
    return out


def _write_errors(path: str, errors: Mapping[int, dict]) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for i in sorted(errors):
                f.write(json.dumps(errors[i], ensure_ascii=False) + "\n")
    _atomic(path, write)


def _remove_partials(out_dir: str) -> None:
    for root, _, files in os.walk(out_dir):
        for f in files:
            if f.endswith(PARTIAL_SUFFIX):
                os.remove(os.path.join(root, f))


def _check_resume(out_dir: str, signature: dict) -> None:
    """Refuse to continue a folder made with other arguments (naming the first field that differs)."""
    for name in (MANIFEST, PROGRESS):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable ({e}); delete it or use another output folder") from None
        old = old.get("signature", old)
        for key in SIGNATURE_KEYS:
            a, b = old.get(key), signature.get(key)
            if key == "model" and isinstance(a, dict) and isinstance(b, dict):
                a, b = ({k: v for k, v in m.items() if k != "name"} for m in (a, b))
                if a != b:
                    diff = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                    raise ValueError(f"{out_dir} holds features made with a different model ({diff} differs); "
                                     f"use another output folder or delete it")
            elif a != b:
                raise ValueError(f"{out_dir} holds features made with different arguments ({key}: "
                                 f"{_short(a)} there, {_short(b)} now); use another output folder or delete it")


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit] + "..."


def read_features(out_dir: Union[str, os.PathLike]) -> tuple[np.ndarray, list[dict]]:
    """Load a folder written by :meth:`FeatureExtractor.write`: ``(features, metadata rows)`` in input order."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest (not a finished feature folder)")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    feats, rows = [], []
    for s in manifest["shards"]:
        feats.append(np.load(os.path.join(out_dir, s["features"])))
        mpath = os.path.join(out_dir, s["metadata"])
        if manifest.get("metadata_format", "parquet") == "jsonl":
            with open(mpath, encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f if line.strip())
        else:
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(mpath).to_pylist())
    shape = tuple(manifest.get("feature_shape") or (0,))
    features = np.concatenate(feats) if feats else np.zeros((0, *shape), np.float32)
    return features, rows
