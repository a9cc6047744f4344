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
* :func:`~retrieval.index_add.add_to_index` appends vectors under new ids (``next_id`` onwards) into a new
  generation of the index file; :func:`~retrieval.index_add.remove_from_index` removes ids into a new generation
  (:mod:`retrieval.index_add`; both re-exported here, as are the helpers of :mod:`retrieval.index_job` and
  :mod:`retrieval.index_source` that lived in this module).

Crash safety (what a kill at any point leaves): the committed manifest keeps naming the previous generation's
files, so readers see the old state; the job is pending in the store's journal. Rerunning the same call
resumes it (from the last checkpoint) and ends byte-identical to an uninterrupted run (HNSW graphs with one
OpenMP thread, since faiss inserts HNSW vertices in parallel); a different build / add / remove is refused
with :class:`internvit.store.PendingJobError` naming the field that differs. Rerunning the call that was
committed last is a no-op. A second concurrent writer gets :class:`internvit.store.StoreBusyError`.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict
from typing import Optional, Union

import numpy as np

from internvit.store import Store, generation_name, job_id

from .embeddings import EmbeddingSource, row_facts
from .faiss_ops import add_vectors, faiss_module, gpu_count, maybe_gpu, new_index, read_index, seed_levels
from .index_add import (  # noqa: F401
    _OWN_COLUMNS,
    _add_in_store,
    _check_columns,
    _check_compatible,
    _check_format,
    _last_added,
    _own_folder_moved,
    _refuse_duplicate,
    _refuse_on_disk,
    _remove_in_store,
    _rows_removed,
    add_to_index,
    check_add_offset,
    check_add_room,
    check_kind,
    remove_from_index,
)
from .index_folder import FORMAT_VERSION, INDEX_FILES, check_id_offset, check_index_destination
from .index_job import (  # noqa: F401
    CHECKPOINT_SHARE,
    DETERMINISTIC_ERRORS,
    _batch_rows,
    _checkpoint,
    _committed_or_none,
    _NotUnit,
    _populate,
    _RowCheck,
    _tidy,
    _write_final,
    discard_pending,
)
from .index_plan import format_bytes, needs_training, parse_memory, plan_index
from .index_source import (  # noqa: F401
    HEAD_ROWS,
    RESULT_FIELDS,
    _already_indexed,
    _check_own_columns,
    _empty_caption_rows,
    _encoder_of,
    _fingerprint,
    _identities,
    _in_memory,
    _metadata_parts,
    _same_rows,
    _scan,
    _shown_source,
    _skipped_rows,
    _source_record,
    _store_metadata,
    _without_device,
    folder_fingerprint,
    record_source,
    recorded_source,
    row_head,
)
from .index_tune import split_rows, tune_index

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
