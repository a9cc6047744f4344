"""What a build / add reads besides the vectors, and what the index records of its sources.

* The rows: the metadata that comes with them (:func:`_metadata_parts`, refused when its columns clash with the
  index's own or a search hit's, :func:`_check_own_columns`; written next to the index by
  :func:`_store_metadata`), the rows a caption index skips (:func:`_skipped_rows`), an add's one-pass scan
  (:func:`_scan`: checksum, norms, normalisation) and the encoder the rows come from (:func:`_encoder_of`).
* The sources: each build / add is recorded in the manifest's ``embeddings`` (:func:`_source_record`: where it
  came from, its checksum, fingerprint and :func:`row_head`); :func:`recorded_source` finds the record of a
  folder (also in a copied or moved index folder) and :func:`_already_indexed` says which build / add already
  holds a source (same identity, or the same rows in another shard layout).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional, Sequence

import numpy as np

from internvit.store import Store

from .embeddings import UNIT_TOLERANCE, EmbeddingError, EmbeddingSource, to_table

logger = logging.getLogger("retrieval")


# --------------------------------------------------------------------------------------------- rows
def _metadata_parts(source: EmbeddingSource, metadata):
    """Metadata as a list of loaders (one per parquet shard, or one in-memory table), row-count checked and
    checked for columns that would clash with the index's own (:func:`_check_own_columns`)."""
    import pyarrow.parquet as pq

    if metadata is not None:
        table = to_table(metadata, source.count)
        _check_own_columns(table.column_names, "the metadata")
        return [lambda: table]
    if not source.metadata_files:
        return []
    source.check_metadata_rows()
    for f in source.metadata_files:
        _check_own_columns(pq.read_schema(f).names, f)
    return [lambda f=f: pq.read_table(f) for f in source.metadata_files]


#: fields of a search hit (``SearchResult.rows`` / ``to_records``, the CLI's ``--json``; the service's ``/search``
#: and clip-retrieval ``/knn-service`` results, :mod:`retrieval.serve`) that a metadata column of the same name
#: would overwrite or be overwritten by
RESULT_FIELDS = ("score", "rank", "query", "similarity", "id_str", "image_url", "thumb_url")


def _check_own_columns(names: Sequence[str], where: str) -> None:
    """``EmbeddingError`` when metadata columns ``names`` clash with the index's own: both ``id`` and
    ``source_id`` (the index writes its own ``id`` column and keeps a source's ``id`` as ``source_id``,
    :func:`_store_metadata`, so the stored part would hold two ``source_id`` columns, which no reader can read:
    every search then failed on an index that was built and committed), or a column named like a search hit's
    own fields (:data:`RESULT_FIELDS`: a ``rank`` column replaced each hit's rank in ``--json`` records, a
    ``score`` column was dropped for the hit's score). Checked before anything is written."""
    if "id" in names and "source_id" in names:
        raise EmbeddingError(f"{where}: has both an 'id' and a 'source_id' column; the index writes its own 'id' "
                             f"column and keeps a source's 'id' as 'source_id': rename one of them")
    clash = [c for c in RESULT_FIELDS if c in names]
    if clash:
        raise EmbeddingError(f"{where}: metadata column(s) {', '.join(map(repr, clash))} would clash with the "
                             f"fields of every search hit ({', '.join(RESULT_FIELDS)}): rename them")


def _skipped_rows(source: EmbeddingSource, parts, kind: str) -> np.ndarray:
    """The rows a build / add skips (:func:`_empty_caption_rows`); ``EmbeddingError`` when that is every row:
    nothing to index (an add of only empty captions used to commit nothing, exit 0, its ids spent)."""
    excluded = _empty_caption_rows(parts, kind)
    if len(excluded) == source.count:
        raise EmbeddingError(f"{source.root or 'embeddings'}: all {source.count} captions are empty: nothing to "
                             f"index")
    return excluded


def _empty_caption_rows(parts, kind: str) -> np.ndarray:
    """Rows of a caption (``text``) collection whose caption is missing or blank: their text embedding is the
    embedding of ``""``, not of a caption, so they are not indexed (sorted int64)."""
    if kind != "text" or not parts:
        return np.zeros(0, np.int64)
    out, start = [], 0
    for load in parts:
        table = load()
        if "caption" in table.column_names:
            caps = table.column("caption").to_pylist()
            out.extend(start + i for i, c in enumerate(caps) if c is None or not str(c).strip())
        start += table.num_rows
    return np.asarray(out, dtype=np.int64)


def _scan(source: EmbeddingSource, normalize: Optional[bool], where: str) -> tuple[dict, bool]:
    """Checksum + norms in one pass; refuse non-finite rows; decide normalisation (``None``: when the vectors
    are not unit length). Returns ``(scan, normalize)``."""
    scan = source.scan()
    if scan["nonfinite"] is not None:
        shard, row = scan["nonfinite"]
        raise EmbeddingError(f"{shard}: row {row} is not finite (NaN or inf); an index cannot hold it (extract "
                             f"again in fp32 / bf16, or drop the row)")
    unit = abs(scan["min_norm"] - 1) <= UNIT_TOLERANCE and abs(scan["max_norm"] - 1) <= UNIT_TOLERANCE
    decided = normalize is None
    if decided:
        normalize = not unit
    if normalize and scan["zero"] is not None:  # refused before the warning: a refused run prints one line
        shard, row = scan["zero"]
        raise EmbeddingError(f"{shard}: row {row} is all zeros and cannot be normalised; drop it")
    if decided and normalize:
        logger.warning("%s: vectors are not unit length (L2 norms %.3g to %.3g): normalising them, so inner "
                       "product = cosine similarity (queries are normalised too; normalize=False keeps "
                       "raw inner products)", where, scan["min_norm"], scan["max_norm"])
    return scan, bool(normalize)


def _without_device(encoder: Optional[dict]) -> Optional[dict]:
    """Encoder info without the device it ran on (which does not change the embeddings' identity)."""
    return {k: v for k, v in encoder.items() if k != "device"} if encoder else encoder


def _encoder_of(source: EmbeddingSource, encoder_info: Optional[dict]) -> Optional[dict]:
    if encoder_info is not None:
        return encoder_info
    m = source.manifest() or {}
    return m.get("encoder") or (m.get("extra") or {}).get("encoder")


def _store_metadata(st: Store, parts, first_id: int, generation: int) -> list[dict]:
    """Write metadata shards ``metadata/metadata_g{generation}_{i}.parquet`` with an ``id`` column (the index
    id; a source ``id`` column is kept as ``source_id``). Sorted file names = id order (clip-back style)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    entries, next_id = [], first_id
    for i, load in enumerate(parts):
        table = load()
        if "id" in table.column_names:
            table = table.rename_columns(["source_id" if c == "id" else c for c in table.column_names])
        ids = np.arange(next_id, next_id + table.num_rows, dtype=np.int64)
        table = table.add_column(0, "id", pa.array(ids))
        name = f"metadata/metadata_g{generation:04d}_{i:05d}.parquet"
        with st.open_file(name) as tmp:
            pq.write_table(table, tmp)
        entries.append({"file": name, "first_id": next_id, "count": table.num_rows})
        next_id += table.num_rows
    return entries


# --------------------------------------------------------------------------------------------- sources
def _source_record(source: EmbeddingSource, checksum: str, first_id: int) -> dict:
    """The manifest's record of one build / add source: where it came from, its ``checksum`` (what the job
    was identified by), its ``fingerprint`` (:func:`_fingerprint`: the same kind for a build and an add, so an
    add of a source the index already holds is recognised), row count and first id."""
    root = os.path.abspath(source.root) if source.root else "array"
    return {"source": root, "checksum": checksum, "fingerprint": _fingerprint(source, checksum),
            "head": row_head(source), "count": source.count, "first_id": first_id}


def record_source(source, checksum) -> dict:
    """The manifest's record of the embeddings a build read (first id 0)."""
    return _source_record(source, checksum, 0)


#: rows a source record's ``head`` hashes
HEAD_ROWS = 1024


def row_head(source: EmbeddingSource, start: int = 0, count: Optional[int] = None) -> str:
    """``'head:'`` + sha256 of the row count, the dim and the first :data:`HEAD_ROWS` rows as stored (float32,
    little-endian) of ``source`` or of its rows ``[start, start + count)``: the same for the same rows in any shard
    layout (``--shard-size``), unlike the fingerprint of a feature folder, which hashes its shards. Equal heads
    with more rows than that are compared in full by :func:`_already_indexed` where the recorded source can still
    be read."""
    count = source.count - start if count is None else int(count)
    h = hashlib.sha256(f"{count}x{source.dim}:".encode())
    if count:
        rows = source.normalized(False).rows(start, start + min(count, HEAD_ROWS))
        h.update(np.ascontiguousarray(rows, dtype="<f4"))
    return "head:" + h.hexdigest()


def _in_memory(source: EmbeddingSource) -> bool:
    return any(not isinstance(s, str) for s in source.shards)


def _fingerprint(source: EmbeddingSource, checksum: Optional[str] = None) -> str:
    """:meth:`EmbeddingSource.fingerprint` (the content checksum a store-written folder recorded, else a stat
    fingerprint of its files; an array's row checksum), reusing ``checksum`` for an array (it is that value
    already: a build's fingerprint or an add's full scan) instead of reading the rows again."""
    if _in_memory(source) and checksum is not None and checksum.startswith("sha256:"):
        return checksum
    return source.fingerprint()


def _identities(record: dict) -> set:
    """What identifies a recorded source's content: its fingerprint and its checksum (a build recorded its
    fingerprint as checksum, an add its full-scan checksum; both kinds are prefixed, so they never collide)."""
    return {v for v in (record.get("fingerprint"), record.get("checksum")) if isinstance(v, str) and v}


def folder_fingerprint(folder: str, kind: str) -> Optional[str]:
    """:meth:`EmbeddingSource.fingerprint` of the ``kind`` embeddings in ``folder``; ``None`` when it holds
    none that can be read (missing, empty, or an interrupted job's folder)."""
    try:
        return EmbeddingSource.from_folder(os.fspath(folder), kind).fingerprint()
    except (EmbeddingError, OSError, ValueError):
        return None


def recorded_source(manifest: dict, folder: str) -> Optional[dict]:
    """The record in the committed index ``manifest`` of the build / add whose source is ``folder``: by path,
    or (an index folder that was copied or moved, with its ``embeddings`` / ``embeddings-add-*`` folders) a
    record of a folder of the same name whose content ``folder`` holds (its fingerprint among the record's
    identities); else ``None``. Another folder with the same content (an add of the build's own images) is not
    the recorded one."""
    records = manifest.get("embeddings") or []
    path = os.path.abspath(folder)
    for rec in records:
        if rec.get("source") == path:
            return rec
    named = [rec for rec in records if isinstance(rec.get("source"), str) and rec["source"] != "array"
             and os.path.basename(rec["source"]) == os.path.basename(path)]
    if not named or not os.path.isdir(path):
        return None
    fingerprint = folder_fingerprint(path, manifest.get("kind", "img"))
    return next((rec for rec in named if fingerprint in _identities(rec)), None)


def _shown_source(manifest: dict, rec: dict, out_dir: Optional[str]) -> Optional[str]:
    """Where a recorded source is now: the folder of the same name in ``out_dir`` when it holds that content
    and the recorded path is elsewhere (the index folder was copied or moved), else the recorded path."""
    source = rec.get("source")
    if source in (None, "array"):
        return None
    if out_dir is not None:
        here = os.path.join(os.path.abspath(out_dir), os.path.basename(source))
        if here != source and recorded_source(manifest, here) is rec:
            return here
    return source


def _already_indexed(manifest: dict, identities: set, out_dir: Optional[str] = None,
                     source: Optional[EmbeddingSource] = None, checksum: Optional[str] = None) -> Optional[str]:
    """How the committed index already holds a source with one of ``identities`` (``'the build (ids
    0..299)'`` / ``'add #2 (ids 300..339)'``), else ``None``; a source folder is named where it now is
    (:func:`_shown_source`, ``out_dir`` the index folder).

    With ``source`` (and its row ``checksum``), a record with the same :func:`row_head` counts too: the same
    rows written in another shard layout. When it holds more than :data:`HEAD_ROWS` rows, the recorded source
    is read in full where it still holds what was indexed (a differing checksum: not a duplicate); where it
    cannot be read, the answer says the match is on the count and the first rows only."""
    head = row_head(source) if source is not None else None
    for i, rec in enumerate(manifest.get("embeddings") or []):
        same = bool(_identities(rec) & identities)
        partly = False
        if not same and head is not None and rec.get("head") == head:
            same, partly = _same_rows(manifest, rec, source, checksum, out_dir)
        if same:
            first = int(rec.get("first_id", 0)) + int(manifest.get("id_offset", 0))
            what = "the build" if i == 0 else f"add #{i}"
            shown = _shown_source(manifest, rec, out_dir)
            where = f" from {shown}" if shown else ""
            note = (f"; compared on the row count and the first {HEAD_ROWS} rows only, since that source "
                    f"cannot be read any more" if partly else "")
            return f"{what}{where} (ids {first}..{first + int(rec.get('count', 0)) - 1}{note})"
    return None


def _same_rows(manifest: dict, rec: dict, source: EmbeddingSource, checksum: Optional[str],
               out_dir: Optional[str]) -> tuple[bool, bool]:
    """``(same, partly)`` for a record whose :func:`row_head` equals ``source``'s: every row is in the head
    (same), the recorded source still holds what was indexed and its row checksum is (or is not) ``checksum``,
    or it cannot be read (same, partly: on the head only)."""
    if source.count <= HEAD_ROWS or checksum is None:
        return True, source.count > HEAD_ROWS
    shown = _shown_source(manifest, rec, out_dir)
    try:
        held = EmbeddingSource.from_folder(shown, manifest.get("kind", "img")) if shown else None
        if held is not None and held.fingerprint() in _identities(rec):
            return held.checksum() == checksum, False
    except (EmbeddingError, OSError, ValueError):
        pass
    return True, True
