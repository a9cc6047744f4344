"""Building, extending and shrinking an index folder, every change committed through :mod:`internvit.store`.

* :func:`build_index` trains the planned index on a sample, adds the collection in batches (checkpointing the
  partial index as a data file every ``checkpoint_every_s``), tunes the search parameters on held-out rows
  (disjoint from the training sample), adds those rows, and commits ``manifest.json``. It reads the rows no
  more often than plain faiss would: the job is identified without reading them
  (:meth:`~retrieval.embeddings.EmbeddingSource.fingerprint`), the training sample decides the
  normalisation, and every row is checked as the add pass reads it (a NaN / inf row, or an all-zero row to
  normalise, is refused naming shard and row and the job is dropped: nothing stays behind; a row that is not
  unit length where the sample was restarts the job normalised, so the result is the one a full scan first
  would have decided).
* :func:`add_to_index` appends vectors under new ids (``next_id`` onwards) into a new generation of the index
  file; :func:`remove_from_index` removes ids into a new generation.

Crash safety (what a kill at any point leaves): the committed manifest keeps naming the previous generation's
files, so readers see the old state; the job is pending in the store's journal. Rerunning the same call
resumes it (from the last checkpoint) and ends byte-identical to an uninterrupted run (HNSW graphs with one
OpenMP thread, since faiss inserts HNSW vertices in parallel); a different build / add / remove is refused
with :class:`internvit.store.PendingJobError` naming the field that differs. Rerunning the call that was
committed last is a no-op. A second concurrent writer gets :class:`internvit.store.StoreBusyError`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import asdict
from typing import Optional, Sequence, Union

import numpy as np

from internvit.store import JOURNAL, PendingJobError, Store, StoreBusyError, generation_name, job_id

from .embeddings import UNIT_TOLERANCE, EmbeddingError, EmbeddingSource, _table_digest, row_facts, to_table
from .faiss_ops import (
    MAX_ID,
    IndexMismatchError,
    RetrievalError,
    add_vectors,
    as_ids,
    faiss_module,
    gpu_count,
    maybe_gpu,
    new_index,
    read_index,
    seed_levels,
    set_search_params,
    stored_ids,
    supports_remove,
    write_index,
)
from .index_folder import FORMAT_VERSION, INDEX_FILES, check_id_offset, check_index_destination, read_manifest
from .index_plan import format_bytes, needs_training, parse_memory, plan_index
from .index_tune import _progress, split_rows, tune_index

logger = logging.getLogger("retrieval")

__all__ = ["build_index", "add_to_index", "remove_from_index", "check_build_args", "discard_pending"]


# --------------------------------------------------------------------------------------------- checks
def check_build_args(*, kind: str = "img", target_recall: float = 0.95, k: int = 10, n_tune_queries: int = 1000,
                     checkpoint_every_s: float = 300.0, batch_rows: Optional[int] = None,
                     max_index_memory: Union[str, int] = "4G") -> int:
    """Validate the scalar arguments of :func:`build_index` (``ValueError`` naming the bad one); returns the
    memory budget in bytes."""
    if kind not in INDEX_FILES:
        raise ValueError(f"kind must be one of {sorted(INDEX_FILES)}, got {kind!r}")
    if isinstance(target_recall, bool) or not 0.0 < float(target_recall) <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    for name, v, low in (("k", k, 1), ("n_tune_queries", n_tune_queries, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if batch_rows is not None and (isinstance(batch_rows, bool) or int(batch_rows) < 1):
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows!r}")
    if not float(checkpoint_every_s) >= 0:
        raise ValueError(f"checkpoint_every_s must be >= 0, got {checkpoint_every_s!r}")
    return parse_memory(max_index_memory)


def _batch_rows(dim: int, budget: int, batch_rows: Optional[int]) -> int:
    if batch_rows:
        return int(batch_rows)
    return int(max(1024, min(262_144, min(budget // 10, 1 << 30) // (4 * dim))))


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


# --------------------------------------------------------------------------------------------- adding rows
def _checkpoint(st: Store, index, name: str, **state) -> None:
    """Write ``index`` as the data file ``name``, then record it in the journal, then discard the checkpoint it
    supersedes: a kill at any point leaves a state whose ``rows_done`` matches the checkpoint it names."""
    old = st.state.get("checkpoint")
    with st.open_file(name) as tmp:
        write_index(index, tmp)
    st.save_state(checkpoint=name, **state)
    if old and old != name and old in st.pending_files:
        st.discard(old)


#: the add pass waits at least this many times the last checkpoint's write time before the next one
CHECKPOINT_SHARE = 19.0


def _populate(st: Store, index, source: EmbeddingSource, *, first_id: int, batch_rows: int, stem: str,
              checkpoint_every_s: float, helper, progress: bool, skip: Optional[np.ndarray] = None,
              check: Optional["_RowCheck"] = None) -> None:
    """Add ``source`` (but not the sorted rows ``skip``) to ``index`` with ids ``first_id + row``,
    checkpointing into data files of ``st`` (resumable from ``st.state['rows_done']``) every
    ``checkpoint_every_s`` seconds, or every batch when it is 0; a checkpoint rewrites the whole partial index,
    so the next one waits at least :data:`CHECKPOINT_SHARE` times as long as the last took (checkpoints cost
    at most 5 % of the add pass). ``check`` sees every raw batch first (its state is saved with each
    checkpoint)."""
    done = int(st.state.get("rows_done", 0))
    if done:
        logger.info("resuming from row %d of %d", done, source.count)
    skip = np.zeros(0, np.int64) if skip is None else skip
    last, wait = time.monotonic(), checkpoint_every_s
    raw = source.normalized(False)
    bar = _progress(raw.iter_batches(batch_rows, start=done), progress, "adding",
                    total=-(-source.count // batch_rows) - done // batch_rows)
    for start, batch in bar:
        if check is not None:
            check.check_batch(start, batch)
        batch = source.normalize_rows(batch)
        end = start + len(batch)
        lo, hi = np.searchsorted(skip, [start, end])
        seed_levels(index, first_id + start)
        ids = np.arange(start, end, dtype=np.int64) + first_id
        if hi > lo:  # one copy without the skipped rows: one add call (small adds cost far more than the copy)
            cut = skip[lo:hi] - start
            batch, ids = np.delete(batch, cut, axis=0), np.delete(ids, cut)
        if len(ids):
            helper.add_with_ids(batch, ids) if helper else add_vectors(index, batch, ids)
        done = end
        if done < source.count and time.monotonic() - last >= wait:
            t = time.monotonic()
            _checkpoint(st, index, f"{stem}.partial-{done:012d}.index", rows_done=done,
                        **(check.state() if check is not None else {}))
            last = time.monotonic()
            if checkpoint_every_s > 0:  # a checkpoint rewrites the whole partial index: keep them <= 5 % of the time
                wait = max(checkpoint_every_s, CHECKPOINT_SHARE * (last - t))


def _write_final(st: Store, index, name: str) -> int:
    with st.open_file(name) as tmp:
        write_index(index, tmp)
    return os.path.getsize(os.path.join(st.folder, name))


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


def _source_record(source: EmbeddingSource, checksum: str, first_id: int) -> dict:
    """The manifest's record of one build / add source: where it came from, its ``checksum`` (what the job
    was identified by), its ``fingerprint`` (:func:`_fingerprint`: the same kind for a build and an add, so an
    add of a source the index already holds is recognised), row count and first id."""
    root = os.path.abspath(source.root) if source.root else "array"
    return {"source": root, "checksum": checksum, "fingerprint": _fingerprint(source, checksum),
            "head": row_head(source), "count": source.count, "first_id": first_id}


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


def _tidy(out_dir: str, job: dict) -> None:
    """On a no-op rerun (the job was committed), let the store finish the clean-up a kill right after the
    commit interrupted (superseded checkpoints); skipped while another writer is busy or a job is pending."""
    if os.path.exists(os.path.join(out_dir, JOURNAL)):
        try:
            with Store(out_dir, job=job, description="index"):
                pass
        except (StoreBusyError, PendingJobError):
            pass


def _committed_or_none(out_dir: str) -> Optional[dict]:
    try:
        return read_manifest(out_dir)
    except RetrievalError:
        return None


def discard_pending(out_dir: str) -> bool:
    """Drop the interrupted job pending in ``out_dir`` (its files are removed; the committed index is kept);
    ``True`` when there was one. What ``overwrite=True`` / ``discard_pending=True`` do before their own job,
    and ``tools/build_index.py --overwrite`` with ``--model``. ``StoreBusyError`` while a writer is active."""
    from .index_folder import pending_job

    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir) or pending_job(out_dir) is None:
        return False
    with Store(out_dir, job={"op": "discard"}, discard_pending=True, description="index"):
        pass
    return True


# --------------------------------------------------------------------------------------------- build
def _refuse_undoing_changes(existing: dict, out_dir: str, source: EmbeddingSource) -> None:
    """``ValueError`` when an index that was added to or removed from since its build would be replaced by a
    build (``overwrite``): the new generation would hold only the new source's rows, so removed rows (often a
    takedown) come back, added rows are dropped, and ``next_id`` restarts, handing ids already given to other
    items out again (what a served index hot-reloads to; ids are promised never to be reused)."""
    records = existing.get("embeddings") or []
    removed = int(existing.get("removed") or 0)
    adds = records[1:]
    if not adds and not removed:
        return
    what = []
    if adds:
        first = int(adds[0].get("first_id", 0)) + int(existing.get("id_offset", 0))
        last = int(existing.get("next_id", 0)) + int(existing.get("id_offset", 0)) - 1
        what.append(f"{len(adds)} add(s) (ids {first}..{last})")
    if removed:
        what.append(f"{removed} removed id(s)")
    raise ValueError(f"{out_dir}: the index holds {' and '.join(what)} since its build; replacing it with a build "
                     f"from {source.root or 'these embeddings'} would undo them (removed rows back, added rows "
                     f"dropped, their ids handed out again): build into a new folder, or delete {out_dir} first")


def build_index(
    embeddings,
    out_dir: str,
    *,
    index_key: Optional[str] = None,
    max_index_memory: Union[str, int] = "4G",
    target_recall: float = 0.95,
    metadata=None,
    kind: str = "img",
    k: int = 10,
    tune_queries: Optional[np.ndarray] = None,
    n_tune_queries: int = 1000,
    encoder_info: Optional[dict] = None,
    use_gpu: bool = False,
    overwrite: bool = False,
    checkpoint_every_s: float = 300.0,
    batch_rows: Optional[int] = None,
    seed: int = 0,
    normalize: Optional[bool] = None,
    progress: bool = True,
    on_disk: Optional[bool] = None,
    workers: int = 1,
    id_offset: Optional[int] = None,
) -> dict:
    """Build a tuned inner-product index over ``embeddings`` into ``out_dir``; returns the committed manifest.

    ``embeddings``: a clip-retrieval folder (``img_emb/`` or, with ``kind='text'``, ``text_emb/``; its
    ``metadata/`` parquet is kept with the index) or a float32 ``(N, D)`` array (then ``metadata`` may be a
    pyarrow Table, dict of columns or list of dicts). ``index_key`` is any faiss ``index_factory`` string,
    checked against N and D before any work (e.g. ``IVF1024`` needs ≥ 1024 vectors); ``None`` chooses one
    from N, D and ``max_index_memory``. Search parameters are tuned to reach ``target_recall`` recall@``k``
    against exact search, on held-out rows disjoint from the training sample.

    ``normalize``: ``None`` L2-normalises the vectors when they are not unit length (recorded in the manifest;
    :class:`~retrieval.search.Retriever` then normalises queries too), ``True`` always, ``False`` never.
    A caption index (``kind='text'``) skips rows whose caption is empty (counted in ``skipped``).

    ``on_disk``: build an IVF index whose inverted lists live on disk (:mod:`retrieval.ondisk`; ``workers``
    processes add its partitions); ``None`` chooses it when the codes exceed ``max_index_memory`` (an explicit
    IVF ``index_key`` too large for it, or no in-memory index fits), ``False`` never.

    ``id_offset``: the global id of row 0 (folders searched as one collection,
    :mod:`retrieval.sharded`), recorded in the same commit as the index; ``None`` keeps the folder's recorded
    offset (0 for a new folder). Refused (``ValueError``, before any work) when it is negative or the last id
    ``id_offset + N - 1`` exceeds ``2**63 - 1``. Rerunning a finished build with another ``id_offset`` only
    records the new offset.

    A build that fails on a deterministic error (bad input found while reading, an index faiss cannot fill)
    rolls back what it wrote: the folder is left as it was (a new folder is removed). A kill leaves the job
    pending for the rerun to resume; ``overwrite=True`` also discards a pending job of other arguments.

    Raises ``EmbeddingError`` naming shard and row for a NaN / inf vector, ``ValueError`` for a bad argument
    or index key, ``FileExistsError`` when ``out_dir`` holds another index (``overwrite=True`` replaces it, as
    a new generation), ``PendingJobError`` / ``StoreBusyError`` from the store (see module docstring).
    """
    faiss_module()
    out_dir = os.fspath(out_dir)
    budget = check_build_args(kind=kind, target_recall=target_recall, k=k, n_tune_queries=n_tune_queries,
                              checkpoint_every_s=checkpoint_every_s, batch_rows=batch_rows,
                              max_index_memory=max_index_memory)
    source = EmbeddingSource.open(embeddings, kind)
    n, dim = source.count, source.dim
    parts = _metadata_parts(source, metadata)
    excluded = _skipped_rows(source, parts, kind)
    indexed = n - len(excluded)
    if tune_queries is not None:
        tune_queries = np.ascontiguousarray(tune_queries, dtype=np.float32)
        if tune_queries.ndim != 2 or tune_queries.shape[1] != dim or not len(tune_queries):
            raise ValueError(f"tune_queries must be a non-empty (Q, {dim}) array, got shape {tune_queries.shape}")
    existing = _committed_or_none(out_dir)
    if existing is None:
        check_index_destination(out_dir)  # a user's folder: refused before the index is trained
    elif overwrite:
        _refuse_undoing_changes(existing, out_dir, source)
    recorded_offset = int((existing or {}).get("id_offset", 0))
    offset = check_id_offset(recorded_offset if id_offset is None else id_offset, n, out_dir)
    from .ondisk import build_ondisk_index, wants_on_disk

    if on_disk or (on_disk is None and wants_on_disk(indexed, dim, index_key, budget)):
        if tune_queries is not None or use_gpu:
            raise ValueError("an on-disk build tunes on held-out rows on the CPU: tune_queries and use_gpu are "
                             "not supported with it")
        return build_ondisk_index(source, out_dir, index_key=index_key, max_index_memory=budget,
                                  target_recall=target_recall, metadata=metadata, kind=kind, k=k,
                                  n_tune_queries=n_tune_queries, encoder_info=encoder_info, overwrite=overwrite,
                                  batch_rows=batch_rows, seed=seed, normalize=normalize, workers=workers,
                                  id_offset=offset, progress=progress)
    # plan on the rows that can train: a non-exact index holds out its tuning queries first
    plan = plan_index(indexed, dim, index_key, budget)
    exact = plan.key == "Flat"
    n_held = 0 if exact or tune_queries is not None else min(n_tune_queries, max(indexed // 10, 1))
    if n_held and index_key:
        try:
            plan = plan_index(indexed - n_held, dim, plan.key, budget)
        except ValueError as e:
            raise ValueError(f"{e} ({n_held} of the {indexed} vectors are held out to tune the search "
                             f"parameters)") from None
    if plan.estimated_bytes > budget:
        logger.warning("index %s for %d×%d needs about %s, more than max_index_memory=%s", plan.key, n, dim,
                       format_bytes(plan.estimated_bytes), format_bytes(budget))
    rows_per_batch = _batch_rows(dim, budget, batch_rows)
    if existing is not None and not overwrite and (
            existing.get("kind") != kind or existing.get("index_key") != plan.key
            or [e.get("count") for e in existing.get("embeddings", [])[:1]] != [n]):
        raise FileExistsError(f"{out_dir}: already holds an index built from other embeddings or arguments "
                              f"(use add_to_index / --add to extend it, or overwrite=True / another folder)")
    # the job's identity without reading the rows (EmbeddingSource.fingerprint); the rows are checked, and the
    # normalisation decided, by the passes that read them anyway (the training sample, then the add pass)
    checksum = source.fingerprint()
    encoder = _encoder_of(source, encoder_info)
    job = dict(op="build", checksum=checksum, key=plan.key, train=plan.train_size, target=target_recall, k=k,
               nq=n_tune_queries, tq=None if tune_queries is None else EmbeddingSource.from_array(tune_queries)
               .checksum(), seed=seed, batch=rows_per_batch, kind=kind, normalize_arg=normalize,
               skipped=int(len(excluded)), encoder=_without_device(encoder))
    signature = job_id(job)
    if existing is not None and not overwrite:
        if existing.get("build", {}).get("signature") == signature:
            logger.info("%s: index already built with these arguments", out_dir)
            _tidy(out_dir, job)
            if offset != recorded_offset:
                from .sharded import set_id_offset

                return set_id_offset(out_dir, offset)
            return existing
        raise FileExistsError(f"{out_dir}: already holds an index built from other embeddings or arguments "
                              f"(use add_to_index / --add to extend it, or overwrite=True / another folder)")
    if use_gpu and gpu_count() == 0:
        warnings.warn("use_gpu=True but faiss sees no GPU (faiss-gpu not installed or no device): using the CPU",
                      stacklevel=2)
        use_gpu = False
    created = not os.path.exists(out_dir)
    try:
        with Store(out_dir, job=job, discard_pending=overwrite, description="index") as st:
            try:
                return _build_in_store(st, source, kind=kind, plan=plan, n=n, dim=dim, n_held=n_held, seed=seed,
                                       excluded=excluded, exact=exact, normalize=normalize, tune_queries=tune_queries,
                                       use_gpu=use_gpu, rows_per_batch=rows_per_batch, target_recall=target_recall,
                                       k=k, checkpoint_every_s=checkpoint_every_s, progress=progress, parts=parts,
                                       budget=budget, encoder=encoder, checksum=checksum, signature=signature,
                                       id_offset=offset)
            except DETERMINISTIC_ERRORS:
                st.abort()  # refused input / a failure a rerun would repeat: nothing of this job stays
                raise
    except DETERMINISTIC_ERRORS:
        if created:
            _remove_empty_store_folder(out_dir)
        raise


#: errors a rerun of the same job would meet again (refused rows, faiss refusing the index, a bad argument
#: found late): the job is rolled back instead of left pending. A kill (no exception), ``KeyboardInterrupt``,
#: ``OSError`` (disk full, I/O) and ``MemoryError`` keep it pending, so the rerun resumes. The store's own
#: refusals (busy, another job pending) are raised before the job starts.
DETERMINISTIC_ERRORS = (ValueError, RuntimeError, TypeError, AssertionError, LookupError)


def _remove_empty_store_folder(out_dir: str) -> None:
    """Remove the folder a refused build created, if the store left nothing in it but its lock."""
    from internvit.store import LOCK, STORE_DIR

    try:
        if set(os.listdir(os.path.join(out_dir, STORE_DIR))) <= {os.path.basename(LOCK)}:
            if os.path.exists(os.path.join(out_dir, LOCK)):
                os.remove(os.path.join(out_dir, LOCK))
            os.rmdir(os.path.join(out_dir, STORE_DIR))
        os.rmdir(out_dir)
    except OSError:
        pass  # something else is there: leave it


class _NotUnit(Exception):
    """The add pass met a row that is not unit length after the sample had decided not to normalise."""


class _RowCheck:
    """Checks every raw row a build reads (finite; not all zeros when normalised; unit length when the
    automatic decision was not to normalise) and keeps the L2 norm range, resumable through the job state."""

    def __init__(self, source: EmbeddingSource, *, normalize: bool, auto: bool, norms=None) -> None:
        self.source, self.normalize, self.auto = source, normalize, auto
        self.lo, self.hi = (np.inf, 0.0) if not norms or norms[0] is None else (float(norms[0]), float(norms[1]))

    def state(self) -> dict:
        return {"norms": [None if self.lo == np.inf else self.lo, self.hi]}

    def where(self, row: int) -> str:
        i, r = self.source.locate(row)
        return f"{self.source.shard_name(i)}: row {r}"

    def check(self, rows: np.ndarray, x: np.ndarray) -> None:
        """``x``: the raw rows ``rows`` (sorted global row numbers). Raises ``EmbeddingError`` / ``_NotUnit``."""
        f = row_facts(x)
        if f["nonfinite"] is not None:
            raise EmbeddingError(f"{self.where(int(rows[f['nonfinite']]))} is not finite (NaN or inf); an index "
                                 f"cannot hold it (extract again in fp32 / bf16, or drop the row)")
        self.lo, self.hi = min(self.lo, f["min_norm"]), max(self.hi, f["max_norm"])
        if f["nonunit"] is not None and not self.normalize and self.auto:
            if f["zero"] is None:
                raise _NotUnit()
            self.normalize = True  # a zero row means normalising, which it cannot be
        if self.normalize and f["zero"] is not None:
            raise EmbeddingError(f"{self.where(int(rows[f['zero']]))} is all zeros and cannot be normalised; "
                                 f"drop it")

    def check_batch(self, start: int, x: np.ndarray) -> None:
        self.check(np.arange(start, start + len(x), dtype=np.int64), x)


def _warn_normalising(where: str, lo: float, hi: float) -> None:
    logger.warning("%s: vectors are not unit length (L2 norms %.3g to %.3g): normalising them, so inner product = "
                   "cosine similarity (queries are normalised too; normalize=False keeps raw inner products)",
                   where, lo, hi)


def _build_in_store(st: Store, source: EmbeddingSource, *, kind, plan, n, dim, n_held, seed, excluded, exact,
                    normalize, tune_queries, use_gpu, rows_per_batch, target_recall, k, checkpoint_every_s, progress,
                    parts, budget, encoder, checksum, signature, id_offset: int = 0) -> dict:
    """The stages of :func:`build_index` inside its store job: train (on a sample that also decides the
    normalisation), add (checking every row; a row that contradicts the decision restarts the job
    normalised), tune, commit."""
    raw = source.normalized(False)
    where = source.root or "embeddings"
    gen = st.generation
    index_file = generation_name(INDEX_FILES[kind], gen)
    stem = os.path.splitext(index_file)[0]
    timings = dict(st.state.get("timings", {}))
    train_rows, held = split_rows(n, plan.train_size if needs_training(plan.key) else 0, n_held, seed, excluded)
    index = helper = None
    while True:
        if st.state.get("stage", "train") == "train":
            t0 = time.perf_counter()
            # the sample: the training rows and the held-out rows, else the first rows
            sample = [r for r in (train_rows, held) if len(r)] or [np.arange(min(n, 4096), dtype=np.int64)]
            xs = [raw.take(r) for r in sample]
            decided = st.state.get("normalize")
            check = _RowCheck(source, normalize=bool(decided), auto=False)
            facts = [row_facts(x) for x in xs]
            bad = [int(r[f["nonfinite"]]) for r, f in zip(sample, facts) if f["nonfinite"] is not None]
            if bad:
                check.check(np.array([min(bad)]), raw.take(np.array([min(bad)])))
            warn = decided is None and normalize is None
            if decided is None:
                decided = bool(normalize) if normalize is not None else any(f["nonunit"] is not None for f in facts)
            if decided:  # a zero row is refused before the normalising warning (a refused run prints one line)
                zeros = [int(r[f["zero"]]) for r, f in zip(sample, facts) if f["zero"] is not None]
                if zeros:
                    check.normalize = True
                    check.check(np.array([min(zeros)]), raw.take(np.array([min(zeros)])))
                if warn:
                    _warn_normalising(where, min(f["min_norm"] for f in facts), max(f["max_norm"] for f in facts))
            index = new_index(plan.key, dim)
            helper = maybe_gpu(index, use_gpu)
            if not index.is_trained:
                logger.info("training %s on %d vectors", plan.key, len(train_rows))
                x = source.normalized(decided).normalize_rows(xs[0])
                del xs
                (helper or index).train(x)
                del x
            else:
                del xs
            timings["train_s"] = time.perf_counter() - t0
            _checkpoint(st, index, f"{stem}.trained.index", stage="add", rows_done=0, timings=timings,
                        normalize=decided, norms=[None, 0.0])
        normalize_ = bool(st.state["normalize"])
        src = source.normalized(normalize_)
        if st.state.get("stage") == "add":
            t0 = time.perf_counter()
            if index is None:
                index = read_index(os.path.join(st.folder, st.state["checkpoint"]))
                helper = maybe_gpu(index, use_gpu)
            skip = np.union1d(held, excluded).astype(np.int64)
            check = _RowCheck(source, normalize=normalize_, auto=normalize is None, norms=st.state.get("norms"))
            try:
                _populate(st, index, src, first_id=0, batch_rows=rows_per_batch, stem=stem, skip=skip,
                          checkpoint_every_s=checkpoint_every_s, helper=helper, progress=progress, check=check)
            except _NotUnit:
                # the sample was unit length but this row is not: normalise everything, from training on
                _warn_normalising(where, check.lo, check.hi)
                st.save_state(stage="train", normalize=True, rows_done=0)
                index = helper = None
                continue
            timings["add_s"] = timings.get("add_s", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            if exact:
                tuning = {"search_params": "", "recall": 1.0, "k": k, "n_queries": 0, "curve": []}
            else:
                if tune_queries is None:
                    queries = src.take(held)
                else:
                    queries = _unit(tune_queries) if normalize_ else tune_queries
                tuning = tune_index(index, plan.key, src, queries, exclude=skip, target_recall=target_recall, k=k,
                                    batch_rows=rows_per_batch, progress=progress)
                tuning["queries"] = ("held-out collection rows (disjoint from the training sample)"
                                     if tune_queries is None else "tune_queries")
                if len(held):  # the held-out rows join the index now, under their own ids
                    seed_levels(index, n)
                    add_vectors(index, queries, held)
            timings["tune_s"] = time.perf_counter() - t0
            size = _write_final(st, index, index_file)
            st.save_state(stage="commit", tuning=tuning, timings=timings, index_bytes=size,
                          ntotal=int(index.ntotal), **check.state())
        break
    lo, hi = st.state["norms"]
    scan = {"min_norm": np.inf if lo is None else lo, "max_norm": hi}
    manifest = build_manifest(st.state, kind=kind, index_file=index_file, normalize_=normalize_,
                              normalize=normalize, scan=scan, dim=dim, plan=plan, budget=budget,
                              target_recall=target_recall, n=n, excluded=excluded, encoder=encoder,
                              source=record_source(source, checksum), signature=signature)
    manifest["id_offset"] = int(id_offset)
    entries = _store_metadata(st, parts, 0, gen)
    manifest["metadata_files"] = entries
    return st.commit(manifest, [index_file] + [e["file"] for e in entries])


def record_source(source, checksum) -> dict:
    """The manifest's record of the embeddings a build read (first id 0)."""
    return _source_record(source, checksum, 0)


def build_manifest(s: dict, *, kind: str, index_file: str, normalize_: bool, normalize, scan: dict, dim: int, plan,
                   budget: int, target_recall: float, n: int, excluded, encoder, source: dict,
                   signature: str) -> dict:
    """The manifest of a finished build from the job's saved state ``s`` (tuning, timings, sizes, ntotal); shared
    by the in-memory and the on-disk builds, which add their own fields."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "index_file": index_file,
        "metric": "inner_product",
        "normalize": normalize_,
        "normalize_mode": "auto" if normalize is None else "explicit",
        "norms": {"min": scan["min_norm"], "max": scan["max_norm"]},
        "dim": dim,
        "index_key": plan.key,
        "index_choice": asdict(plan),
        "max_index_memory": budget,
        "search_params": s["tuning"]["search_params"],
        "tuning": {**{k_: v for k_, v in s["tuning"].items() if k_ != "search_params"},
                   "target_recall": target_recall},
        "ntotal": s["ntotal"],
        "next_id": n,
        "removed": 0,
        "skipped": {"empty_caption": int(len(excluded))},
        "index_bytes": s["index_bytes"],
        "bytes_per_vector": s["index_bytes"] / max(s["ntotal"], 1),
        "encoder": encoder,
        "embeddings": [source],
        "metadata_files": [],
        "build": {"signature": signature, "timings": s["timings"], "faiss_version": _faiss_version()},
    }


def _faiss_version() -> str:
    return faiss_module().__version__


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


# --------------------------------------------------------------------------------------------- add
def _check_compatible(manifest: dict, source: EmbeddingSource, encoder_info: Optional[dict], where: str) -> None:
    if source.dim != manifest["dim"]:
        raise IndexMismatchError(f"{where}: index dim is {manifest['dim']} but the new embeddings have dim "
                                 f"{source.dim}")
    enc_new, enc_old = _encoder_of(source, encoder_info), manifest.get("encoder")
    if enc_new and not enc_old:  # an index of bare vectors: nothing says the new ones live in the same space
        raise IndexMismatchError(f"{where}: the index records no model (built from bare embeddings); refusing to "
                                 f"add embeddings of encoder {enc_new.get('name')!r} to it (they may not share "
                                 f"its vector space): build a new index with that model")
    if enc_new and enc_old:
        if enc_new.get("name") != enc_old.get("name"):
            raise IndexMismatchError(f"{where}: index was built with encoder {enc_old.get('name')!r} but the new "
                                     f"embeddings come from {enc_new.get('name')!r}")
        fa, fb = enc_old.get("weights_fingerprint"), enc_new.get("weights_fingerprint")
        if fa and fb and fa != fb and enc_old.get("dtype") == enc_new.get("dtype"):
            raise IndexMismatchError(f"{where}: the new embeddings come from encoder {enc_new.get('name')!r} with "
                                     f"other weights than the index was built with")


def _check_format(manifest: dict, where: str) -> None:
    if int(manifest.get("format_version", 1)) < FORMAT_VERSION or "_store" not in manifest:
        raise RetrievalError(f"{where}: index written by an older version (format {manifest.get('format_version', 1)},"
                             f" before the durable store); rebuild it with build_index to add or remove ids")


def _refuse_on_disk(manifest: dict, where: str, what: str) -> None:
    if manifest.get("on_disk"):
        raise RetrievalError(f"{where}: an on-disk index (lists in {manifest['on_disk']['ivfdata_file']}) cannot be "
                             f"{what} in place; rebuild it from the whole collection")


def check_kind(manifest: dict, kind: Optional[str], where: str) -> str:
    """The kind to add to an index (``None``: the index's); :class:`IndexMismatchError` when it differs."""
    have = manifest.get("kind", "img")
    if kind is not None and kind != have:
        names = {"img": "image", "text": "caption (text)"}
        raise IndexMismatchError(f"{where} is a {names.get(have, have)} index (kind={have!r}): refusing to add "
                                 f"{names.get(kind, kind)} embeddings (kind={kind!r}) to it")
    return have


def _last_added(manifest: dict, job: dict, identities: set, source: EmbeddingSource, where: str) -> bool:
    """Whether the committed state already ends with this add (rerun after a commit: nothing to do): the last
    commit was this very job, or the last add read the same rows from the same place (folder, or an array)
    with the same metadata. Equal rows from another folder, or with other metadata (the same pictures under
    other paths or captions), are not a rerun: they are a duplicate (:func:`_refuse_duplicate`); taking them
    for one dropped the new paths and captions with "nothing to do" and exit 0.

    The same place includes the index folder's own ``embeddings-add-*`` folder after the index folder ``where``
    was copied or moved (recognised by name and content, :func:`recorded_source`, as a build's rerun is): the
    rerun of the last ``--add`` in a copy used to be refused as a duplicate of itself.

    Rows of the last add removed since (:func:`_rows_removed`) mean the state no longer ends with it:
    re-adding a removed batch used to answer "nothing to do" with exit 0 while none of its rows was back
    (removals of other ids leave it a rerun)."""
    records = manifest.get("embeddings") or []
    if len(records) < 2:
        return False
    last = records[-1]
    if int(manifest.get("removed") or 0) and _rows_removed(manifest, last, int(job.get("skipped") or 0), where):
        return False
    place = os.path.abspath(source.root) if source.root else "array"
    # the job does not name its folder: equal rows elsewhere give an equal job
    if last.get("source") != place and not _own_folder_moved(manifest, last, place, where):
        return False
    if (manifest.get("_store") or {}).get("job_id") == job_id(job):
        return True
    return bool(_identities(last) & identities) and last.get("metadata") == job.get("metadata")


def _rows_removed(manifest: dict, rec: dict, skipped: int, where: str) -> bool:
    """Whether the committed index in ``where`` lacks rows the build / add of record ``rec`` brought (ids
    ``first_id .. first_id + count - 1`` less its ``skipped`` rows): some were removed since. Reads the index's
    ids (only asked when the manifest counts removals)."""
    ids = stored_ids(read_index(os.path.join(where, manifest["index_file"])))
    if ids is None:  # an index type that keeps no ids: nothing can have been removed from it
        return False
    first, count = int(rec["first_id"]), int(rec["count"])
    held = int(np.count_nonzero((ids >= first) & (ids < first + count)))
    return held < count - skipped


def _own_folder_moved(manifest: dict, rec: dict, place: str, where: str) -> bool:
    """Whether ``place`` is a folder inside the index folder ``where`` that is the recorded source ``rec`` after
    the index folder was copied or moved (same name, recorded content: :func:`recorded_source`)."""
    if place == "array" or not isinstance(rec.get("source"), str):
        return False
    if os.path.dirname(place) != os.path.abspath(where):
        return False
    return recorded_source(manifest, place) is rec


def add_to_index(out_dir: str, embeddings, metadata=None, *, kind: Optional[str] = None,
                 encoder_info: Optional[dict] = None, checkpoint_every_s: float = 300.0,
                 batch_rows: Optional[int] = None, use_gpu: bool = False, progress: bool = True,
                 id_offset: Optional[int] = None, allow_duplicate: bool = False,
                 discard_pending: bool = False) -> dict:
    """Append ``embeddings`` (folder or array, same dim, kind and encoder) to an existing index without
    rebuilding; returns the committed manifest.

    New ids continue after the largest id ever assigned, so ids stay unique and stable (also after removals).
    The tuned search parameters are kept; the index's normalisation is applied to the new vectors. ``kind``
    defaults to the index's (``'img'`` / ``'text'``); another kind raises :class:`IndexMismatchError`, as do
    another dim or encoder. Non-finite vectors raise ``EmbeddingError`` naming shard and row. Resumable and
    crash-safe like :func:`build_index`; rerunning the add that was committed last is a no-op, and a different
    add while one is pending raises ``PendingJobError`` (``discard_pending=True`` drops that job instead).

    Embeddings the index already holds (the build's or an earlier add's source: same fingerprint or content
    checksum, as recorded in the manifest's ``embeddings``) are refused with a ``ValueError`` naming that
    build / add, since every row would be indexed twice; ``allow_duplicate=True`` adds them anyway.

    ``id_offset``: ``None`` or the folder's recorded offset (ids already handed out never change: another
    value raises ``ValueError`` naming both, before any work; renumbering a folder on purpose is
    :func:`~retrieval.sharded.set_id_offset`); refused before any work when the grown folder's last global id
    ``id_offset + next_id - 1`` exceeds ``2**63 - 1``.

    An index that records no encoder (built from bare vectors) refuses embeddings that record one
    (:class:`IndexMismatchError`): nothing says they share its vector space.
    A deterministic failure (refused rows, faiss refusing the vectors) rolls the add back.
    """
    out_dir = os.fspath(out_dir)
    manifest = read_manifest(out_dir)
    _check_format(manifest, out_dir)
    _refuse_on_disk(manifest, out_dir, "extended")
    kind = check_kind(manifest, kind, out_dir)
    check_add_offset(manifest, id_offset, out_dir)  # before any row is read
    if batch_rows is not None and (isinstance(batch_rows, bool) or int(batch_rows) < 1):
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows!r}")
    source = EmbeddingSource.open(embeddings, kind)
    _check_compatible(manifest, source, encoder_info, out_dir)
    parts = _metadata_parts(source, metadata)
    _check_columns(manifest, out_dir, source, metadata)
    excluded = _skipped_rows(source, parts, kind)
    explicit = manifest.get("normalize_mode") == "explicit"
    scan, normalize = _scan(source, manifest.get("normalize", False) if explicit or manifest.get("normalize")
                            else None, source.root or "embeddings")
    checksum = scan["checksum"]
    identities = {checksum, _fingerprint(source, checksum)}
    rows_per_batch = _batch_rows(source.dim, manifest.get("max_index_memory", parse_memory("4G")), batch_rows)
    job = dict(op="add", checksum=checksum, kind=kind, batch=rows_per_batch, normalize=normalize,
               metadata=None if metadata is None else _table_digest(to_table(metadata, source.count)),
               skipped=int(len(excluded)))
    check_add_room(manifest, id_offset, source.count, out_dir)
    if _last_added(manifest, job, identities, source, out_dir):
        logger.info("%s: these embeddings were the last ones added; nothing to do", out_dir)
        _tidy(out_dir, job)
        return manifest
    _refuse_duplicate(manifest, identities, allow_duplicate, out_dir, source=source, checksum=checksum)
    with Store(out_dir, job=job, discard_pending=discard_pending, description="index") as st:
        try:
            return _add_in_store(st, job, source, parts, excluded, normalize, identities, checksum, id_offset,
                                 allow_duplicate, kind=kind, rows_per_batch=rows_per_batch, use_gpu=use_gpu,
                                 checkpoint_every_s=checkpoint_every_s, progress=progress, where=out_dir)
        except DETERMINISTIC_ERRORS:
            st.abort()  # a rerun would fail the same way: nothing of this add stays (not even pending)
            raise


def check_add_offset(manifest: dict, id_offset: Optional[int], where: str) -> None:
    """An add keeps the folder's recorded offset: ``ValueError`` naming both values when ``id_offset`` is given
    and differs (committing it would renumber every id already handed out)."""
    recorded = int(manifest.get("id_offset", 0))
    if id_offset is None:
        return
    if isinstance(id_offset, bool) or not isinstance(id_offset, (int, np.integer)):
        raise ValueError(f"id_offset must be an integer >= 0, got {id_offset!r}")
    if int(id_offset) != recorded:
        raise ValueError(f"{where}: id_offset {int(id_offset)} differs from the folder's recorded id_offset "
                         f"{recorded}; an add keeps the recorded offset (changing it would renumber every id "
                         f"already handed out): leave id_offset out")


#: metadata columns the index itself writes (not the user's)
_OWN_COLUMNS = frozenset({"id", "source_id"})


def _check_columns(manifest: dict, where: str, source: EmbeddingSource, metadata) -> None:
    """An add's metadata must share a column with the index's: metadata of wholly other columns (``other``
    instead of ``caption``, a misspelt ``captoin``) would leave the new rows without any of the index's columns
    while their search results look complete. ``ValueError`` naming both sets. Otherwise the columns are the
    union: each row has the columns of the build / add that brought it (a column the add lacks is absent from
    its rows; an image folder with captions added to an index without them brings ``caption``). Rows added
    without metadata, and an index without metadata columns, accept anything."""
    import pyarrow.parquet as pq

    have: set = set()
    for e in manifest.get("metadata_files") or []:
        try:
            have |= set(pq.read_schema(os.path.join(where, e["file"])).names)
        except (OSError, ValueError, KeyError):
            continue  # a damaged metadata file is reported where it is read
    have -= _OWN_COLUMNS
    if metadata is not None:
        new = set(to_table(metadata, source.count).column_names)
    elif source.metadata_files:
        new = set(pq.read_schema(source.metadata_files[0]).names)
    else:
        return
    new -= _OWN_COLUMNS
    if have and new and not (new & have):
        raise ValueError(f"{where}: the new metadata's column(s) {', '.join(sorted(new))} share none with the "
                         f"index's ({', '.join(sorted(have))}); rename them to the index's columns")


def check_add_room(manifest: dict, id_offset: Optional[int], count: int, where: str) -> int:
    """The offset an add of ``count`` rows commits (the recorded one; a different ``id_offset`` is refused),
    checked against the grown folder: ``ValueError`` when its last global id would pass ``2**63 - 1``, saying
    how many rows still fit (an add keeps the offset, so "use a smaller id_offset" would be no advice). Also
    what ``index_images`` checks before embedding anything for an add (the number of inputs is known)."""
    check_add_offset(manifest, id_offset, where)
    offset, next_id = int(manifest.get("id_offset", 0)), int(manifest["next_id"])
    room = MAX_ID - (offset + next_id - 1)
    if int(count) > room:
        last = offset + next_id + int(count) - 1
        raise ValueError(f"{where}: adding {int(count)} rows would give global ids up to {last}, "
                         f"beyond the largest id faiss can hold (2**63 - 1 = {MAX_ID}); the folder's id range "
                         f"(id_offset {offset}) has room for {room} more: add the rest to a new folder with its own "
                         f"id_offset")
    return offset


def _refuse_duplicate(manifest: dict, identities: set, allow: bool, where: str, warn: bool = True,
                      source: Optional[EmbeddingSource] = None, checksum: Optional[str] = None) -> None:
    """``ValueError`` naming the build / add that already indexed a source with these identities or (with
    ``source``) the same rows in another shard layout (:func:`_already_indexed`); a warning instead with
    ``allow``."""
    held = _already_indexed(manifest, identities, where, source, checksum)
    if held and not allow:
        removed = int(manifest.get("removed") or 0)
        since = (f"; {removed} id(s) have been removed from the index: if these rows were among them, pass "
                 f"allow_duplicate=True to add them again" if removed else
                 " (pass allow_duplicate=True to add them anyway)")
        raise ValueError(f"{where}: these embeddings are already in the index, added by {held}; adding them "
                         f"again would index every row twice{since}")
    if held and warn:
        logger.warning("%s: these embeddings are already in the index (%s); adding them again as asked", where,
                       held)


def _add_in_store(st: Store, job: dict, source: EmbeddingSource, parts, excluded, normalize: bool, identities: set,
                  checksum: str, id_offset: Optional[int], allow_duplicate: bool, *, kind: str, rows_per_batch: int,
                  use_gpu: bool, checkpoint_every_s: float, progress: bool, where: str) -> dict:
    """The stages of :func:`add_to_index` inside its store job: add the rows to a copy of the index, commit."""
    # the committed state may have moved since the checks above (another writer finished first)
    manifest = st.manifest
    if _last_added(manifest, job, identities, source, where):
        return manifest
    _refuse_duplicate(manifest, identities, allow_duplicate, where, warn=False, source=source, checksum=checksum)
    offset = check_add_room(manifest, id_offset, source.count, where)
    gen, first_id = st.generation, int(manifest["next_id"])
    index_file = generation_name(INDEX_FILES[kind], gen)
    stem = os.path.splitext(index_file)[0]
    if st.state.get("stage", "add") == "add":
        ckpt = st.state.get("checkpoint") if st.state.get("rows_done") else None
        index = read_index(os.path.join(st.folder, ckpt or manifest["index_file"]))
        helper = maybe_gpu(index, use_gpu)
        _populate(st, index, source.normalized(normalize), first_id=first_id, batch_rows=rows_per_batch,
                  stem=stem, skip=excluded, checkpoint_every_s=checkpoint_every_s, helper=helper,
                  progress=progress)
        set_search_params(index, manifest.get("search_params", ""))
        size = _write_final(st, index, index_file)
        st.save_state(stage="commit", index_bytes=size, ntotal=int(index.ntotal))
    new = dict(manifest)
    new.update(index_file=index_file, ntotal=st.state["ntotal"], next_id=first_id + source.count,
               id_offset=offset, normalize=bool(manifest.get("normalize")) or normalize,
               index_bytes=st.state["index_bytes"],
               bytes_per_vector=st.state["index_bytes"] / max(st.state["ntotal"], 1))
    new["skipped"] = {"empty_caption": int((manifest.get("skipped") or {}).get("empty_caption", 0))
                      + int(len(excluded))}
    new["embeddings"] = manifest["embeddings"] + [dict(_source_record(source, checksum, first_id),
                                                      metadata=job.get("metadata"))]
    entries = _store_metadata(st, parts, first_id, gen)
    new["metadata_files"] = list(manifest.get("metadata_files", [])) + entries
    return st.commit(new, [index_file] + [e["file"] for e in new["metadata_files"]])


# --------------------------------------------------------------------------------------------- remove
def remove_from_index(out_dir: str, ids: Sequence[int]) -> dict:
    """Remove ``ids`` from the index (IVF and Flat indexes; HNSW graphs and refine stages cannot delete); returns
    the committed manifest. ``ids`` are the folder's global ids, as searches return them (``id_offset + row``; the row
    numbers themselves when no offset is recorded). Ids are never reused; their metadata rows stay on disk but
    are never returned (:meth:`~retrieval.search.Retriever.metadata` gives ``{}``, search by id ``KeyError``).

    Raises ``ValueError`` for ids that are not integers (``1.5``, ``True``: never rounded to another id) and
    naming ids that are not in the index (never assigned, already removed, or skipped at build),
    :class:`RetrievalError` for an index type that cannot delete. Crash-safe like :func:`build_index`: a kill
    leaves the old state, rerunning finishes it with every id removed exactly once; rerunning the remove that
    was committed last is a no-op.
    """
    import hashlib

    out_dir = os.fspath(out_dir)
    manifest = read_manifest(out_dir)
    _check_format(manifest, out_dir)
    _refuse_on_disk(manifest, out_dir, "shrunk")
    ids = np.unique(as_ids(ids))  # 1.5 or True is refused, not turned into id 1
    if not len(ids):
        raise ValueError("no ids to remove")
    job = dict(op="remove", ids=hashlib.sha256(ids.tobytes()).hexdigest(), count=int(len(ids)))
    if (manifest.get("_store") or {}).get("job_id") == job_id(job):
        logger.info("%s: these ids were removed by the last commit; nothing to do", out_dir)
        _tidy(out_dir, job)
        return manifest
    with Store(out_dir, job=job, description="index") as st:
        try:
            return _remove_in_store(st, job, ids, out_dir)
        except DETERMINISTIC_ERRORS:
            st.abort()  # nothing of a refused remove stays pending
            raise


def _remove_in_store(st: Store, job: dict, ids: np.ndarray, out_dir: str) -> dict:
    manifest = st.manifest
    if (manifest.get("_store") or {}).get("job_id") == job_id(job):
        return manifest
    offset = int(manifest.get("id_offset", 0))
    index_file = generation_name(INDEX_FILES[manifest.get("kind", "img")], st.generation)
    if st.state.get("stage") != "commit":
        index = read_index(os.path.join(st.folder, manifest["index_file"]))
        if not supports_remove(index):
            raise RetrievalError(f"{out_dir}: index {manifest['index_key']} does not support removing ids (only "
                                 f"IVF and Flat indexes without a refinement or graph layer delete: HNSW graphs and "
                                 f"refine stages cannot); build a new index of such a type, or one from "
                                 f"embeddings without those rows")
        local = ids[ids >= offset] - offset  # global ids below the offset are not this folder's
        present = stored_ids(index)
        missing = np.union1d(ids[ids < offset], np.setdiff1d(local, present) + offset)
        if len(missing):
            shown = ", ".join(str(int(i)) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise ValueError(f"{out_dir}: {len(missing)} of the {len(ids)} ids to remove are not in the index "
                             f"(never assigned, already removed or skipped): {shown}")
        removed = int(index.remove_ids(local))
        size = _write_final(st, index, index_file)
        st.save_state(stage="commit", removed=removed, index_bytes=size, ntotal=int(index.ntotal))
    s = st.state
    new = dict(manifest, index_file=index_file, ntotal=s["ntotal"],
               removed=int(manifest.get("removed", 0)) + s["removed"], index_bytes=s["index_bytes"],
               bytes_per_vector=s["index_bytes"] / max(s["ntotal"], 1))
    return st.commit(new, [index_file] + [e["file"] for e in manifest.get("metadata_files", [])])
