"""Reading an index folder: its committed manifest, the index file and metadata it references, checked.

An index folder is an :class:`internvit.store.Store` folder::

    manifest.json                      the commit point: what a reader sees (index file, metadata, counts)
    image.g0003.index                  the faiss index of generation 3 (``text.g….index`` for a caption index)
    metadata/metadata_g0003_00000.parquet   metadata rows of the ids added in generation 3 (id order)
    .store/                            lock and journal of the job in progress

Data files are immutable and generation-named; a reader opens only what the committed manifest names, so it
sees the state before or after a build / add / remove, never a mix (:func:`internvit.store.read_consistent`).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from internvit import store as _store

from .faiss_ops import MAX_ID, IndexMismatchError, RetrievalError, read_index, set_search_params

__all__ = ["MANIFEST", "FORMAT_VERSION", "INDEX_FILES", "RetrievalError", "IndexMismatchError", "read_manifest",
           "open_index", "check_metadata", "pending_job", "id_range", "check_id_offset"]

MANIFEST = _store.MANIFEST
FORMAT_VERSION = 2
INDEX_FILES = {"img": "image.index", "text": "text.index"}
REQUIRED = ("index_file", "dim", "ntotal", "next_id", "kind", "index_key")


def check_index_destination(out_dir: str) -> None:
    """Refuse, before any work, an ``out_dir`` that is a folder holding files but no index build (no committed
    or interrupted index, no embeddings of one): a build writes its files by name and would fail on, or
    replace, a user's. Raises ``FileExistsError`` (:func:`internvit.store.refuse_foreign_folder`), also for a
    folder whose committed ``manifest.json`` is not an index's (a feature or embeddings folder written before
    the store recorded each folder's kind, which :class:`internvit.store.Store` refuses by itself)."""
    _store.refuse_foreign_folder(out_dir, (".store", "manifest.json", "embeddings", "embeddings-add-*"), "index")
    _store.refuse_other_kind(out_dir, "index")  # e.g. a killed feature extraction: before anything is embedded
    try:
        manifest = _store.read_manifest(out_dir) if os.path.isdir(out_dir) else None
    except _store.StoreError:
        manifest = None  # unreadable: the index's own reading names it
    missing = [k for k in REQUIRED if manifest is not None and k not in manifest]
    if missing:
        kind = (manifest.get(_store.STORE_KEY) or {}).get("description")
        what = (f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}, not an index" if kind else
                f"a {MANIFEST} that is not an index's (no {missing[0]!r}; a feature or embeddings folder?)")
        raise FileExistsError(f"{out_dir}: holds {what}: nothing was changed; give another folder")


def check_id_offset(id_offset, next_id: int, where: Optional[str] = None) -> int:
    """``id_offset`` as an int, checked for a folder whose local ids run below ``next_id``: an integer >= 0 whose
    last global id ``id_offset + next_id - 1`` fits faiss's int64 ids (at most ``2**63 - 1``). ``ValueError``
    (one line, naming the largest offset that fits) otherwise."""
    if isinstance(id_offset, bool) or not isinstance(id_offset, (int, np.integer)) or id_offset < 0:
        raise ValueError(f"id_offset must be an integer >= 0, got {id_offset!r}")
    last = int(id_offset) + max(int(next_id), 1) - 1
    if last > MAX_ID:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}id_offset {int(id_offset)} + {int(next_id)} ids would give global ids up to "
                         f"{last}, beyond the largest id faiss can hold (2**63 - 1 = {MAX_ID}); use an id_offset "
                         f"<= {MAX_ID - max(int(next_id), 1) + 1}")
    return int(id_offset)


def id_range(manifest: dict, where: str = "index") -> tuple[int, int]:
    """``[first, end)`` of the global ids a folder can hold: ``id_offset`` to ``id_offset + next_id``.
    :class:`RetrievalError` (one line) for a recorded offset that is negative, not an integer, or puts ids
    beyond int64 (a manifest written before offsets were checked)."""
    off = manifest.get("id_offset", 0)
    try:
        off = check_id_offset(off, int(manifest["next_id"]))
    except ValueError as e:
        raise RetrievalError(f"{where}/{MANIFEST}: {e} (record a valid one with set_id_offset / "
                             f"--id-offset)") from None
    return off, off + int(manifest["next_id"])


def pending_job(index_dir: str) -> Optional[str]:
    """The operation (``build``, ``add``, ``remove``) of an interrupted job in ``index_dir``, if any."""
    import json

    path = os.path.join(index_dir, _store.JOURNAL)
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        return (json.loads(first).get("job") or {}).get("op") or "job"
    except (OSError, ValueError, AttributeError):
        return None


def read_manifest(index_dir) -> dict:
    """The committed manifest of an index folder.

    Raises :class:`RetrievalError` (one line) when the folder does not exist, holds no finished index (naming
    an interrupted build), or its manifest is not an index manifest."""
    index_dir = os.fspath(index_dir)
    if not os.path.isdir(index_dir):
        raise RetrievalError(f"{index_dir}: index folder does not exist")
    try:
        manifest = _store.read_manifest(index_dir)
    except _store.StoreError as e:
        raise RetrievalError(str(e)) from None
    if manifest is None:
        op = pending_job(index_dir)
        hint = f" (a {op} was interrupted: rerun the same command to finish it)" if op else ""
        raise RetrievalError(f"{index_dir}: no {MANIFEST}, not a finished index{hint}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise RetrievalError(f"{index_dir}/{MANIFEST}: not an index manifest (no {missing[0]!r})")
    return manifest


def check_metadata(index_dir: str, manifest: dict) -> None:
    """Check that every metadata file the manifest references is a parquet file with the recorded row count
    (reads only the footers). Raises :class:`RetrievalError` naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for entry in manifest.get("metadata_files", []):
        path = os.path.join(index_dir, entry["file"])
        if not os.path.isfile(path):
            raise RetrievalError(f"{path}: metadata file is missing")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise RetrievalError(f"{path}: not a readable parquet file, truncated or corrupt "
                                 f"({str(e).splitlines()[0][:100]})") from None
        if rows != entry["count"]:
            raise RetrievalError(f"{path}: holds {rows} metadata rows but the manifest says {entry['count']} "
                                 f"(truncated or modified)")


def _open(index_dir: str, manifest: dict, mmap: bool, metadata: bool):
    path = os.path.join(index_dir, manifest["index_file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(path)  # read_consistent retries on a newer commit
    size, want = os.path.getsize(path), manifest.get("index_bytes")
    if want is not None and size != want:
        raise RetrievalError(f"{path}: {size} bytes but the manifest says {want} (truncated or modified)")
    on_disk = manifest.get("on_disk")
    if on_disk:  # IVF lists in their own memory-mapped file (retrieval.ondisk)
        from .ondisk import read_ondisk_index

        index = read_ondisk_index(path, os.path.join(index_dir, on_disk["ivfdata_file"]),
                                  expect_bytes=on_disk.get("ivfdata_bytes"))
    else:
        index = read_index(path, mmap=mmap)
    if index.ntotal != manifest["ntotal"] or index.d != manifest["dim"]:
        raise RetrievalError(f"{path}: holds {index.ntotal}×{index.d} vectors but the manifest says "
                             f"{manifest['ntotal']}×{manifest['dim']} (modified outside retrieval)")
    if metadata:
        check_metadata(index_dir, manifest)
    try:
        set_search_params(index, manifest.get("search_params", ""))
    except ValueError as e:
        raise RetrievalError(f"{index_dir}/{MANIFEST}: {e}") from None
    return index, manifest


def open_index(index_dir, *, mmap: bool = False, check_metadata_files: bool = True):
    """``(faiss index with the tuned search parameters set, manifest)`` of the committed state of an index
    folder. ``mmap`` maps the index file instead of reading it (IVF indexes).

    Raises :class:`RetrievalError` (one line) for a missing / unfinished folder, an index file that is
    truncated, corrupt or disagrees with the manifest, and (``check_metadata_files``) a metadata file that is
    missing, corrupt or shortened."""
    index_dir = os.fspath(index_dir)
    read_manifest(index_dir)  # the one-line errors for a missing / unfinished folder
    try:
        return _store.read_consistent(index_dir, lambda m: _open(index_dir, m, mmap, check_metadata_files))
    except FileNotFoundError as e:
        raise RetrievalError(f"{e.filename or e}: index file is missing") from None
    except _store.StoreError as e:
        raise RetrievalError(str(e)) from None
