"""Reading a finished feature folder (one :meth:`internvit.features.FeatureExtractor.write` committed):
:func:`read_features` loads it, :func:`open_features` memory-maps it (:class:`MappedFeatures`). Only the files of
the committed manifest are read. The names are re-exported by :mod:`internvit.features`.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import numpy as np

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"


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
