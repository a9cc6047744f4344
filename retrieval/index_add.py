"""Extending and shrinking an index folder, every change committed through :mod:`internvit.store`.

* :func:`add_to_index` appends vectors under new ids (``next_id`` onwards) into a new generation of the index
  file; :func:`remove_from_index` removes ids into a new generation.
* Before any row is read, the committed manifest is checked against the change (format, kind, dim, encoder,
  id offset and room, metadata columns); a source the index already holds is refused
  (:func:`_refuse_duplicate`) unless it is a rerun of the last add (:func:`_last_added`: nothing to do).

Crash safety as for :func:`~retrieval.index_build.build_index` (see :mod:`retrieval.index_build`): a kill
leaves the committed state, rerunning the same call finishes the job, rerunning the call committed last is a
no-op.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from internvit.store import Store, generation_name, job_id

from .embeddings import EmbeddingSource, _table_digest, to_table
from .faiss_ops import (
    MAX_ID,
    IndexMismatchError,
    RetrievalError,
    as_ids,
    maybe_gpu,
    read_index,
    set_search_params,
    stored_ids,
    supports_remove,
)
from .index_folder import FORMAT_VERSION, INDEX_FILES, read_manifest
from .index_job import DETERMINISTIC_ERRORS, _batch_rows, _populate, _tidy, _write_final
from .index_plan import parse_memory
from .index_source import (
    _already_indexed,
    _encoder_of,
    _fingerprint,
    _identities,
    _metadata_parts,
    _scan,
    _skipped_rows,
    _source_record,
    _store_metadata,
    recorded_source,
)

logger = logging.getLogger("retrieval")

__all__ = ["add_to_index", "remove_from_index"]


# --------------------------------------------------------------------------------------------- checks
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


# --------------------------------------------------------------------------------------------- add
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
