"""IVF indexes whose inverted lists live on disk: build in bounded memory, search through a memory map.

An on-disk index folder holds, besides the manifest and metadata, two generation-named data files::

    image.g0001.index      the trained index (coarse quantizer, (O)PQ / SQ tables, list sizes and offsets)
    image.g0001.ivfdata    the inverted lists: ids and codes of every vector, list after list

Build (:func:`build_ondisk_index`), in RAM at most about ``max_index_memory`` plus one batch:

1. **train** the coarse quantizer (and PQ / OPQ / SQ tables) on a sample (``default_train_size``: at most a
   quarter of the budget), as the in-memory build does; the trained, empty index is a data file;
2. **add in partitions**: contiguous row ranges, each small enough that its codes take at most a quarter of
   the budget per worker process (``workers`` processes run partitions in parallel); each partition is read
   batch by batch from the shards on disk, added to a copy of the trained index, and written as its own
   index file (its inverted lists) — the vectors are never concatenated;
3. **merge** the partitions' lists on disk with faiss's own machinery
   (:func:`faiss.contrib.ondisk.merge_ondisk`: ``OnDiskInvertedLists.merge_from_multiple`` over the partition
   files opened with ``IO_FLAG_MMAP``); the lists keep row order, so search results equal those of the
   in-memory index trained on the same sample (same ids, same scores);
4. **tune** nprobe on held-out rows (as the in-memory build: the lists without them, merged once into a
   scratch file), then merge the final lists with the held-out rows last (faiss's on-disk lists cannot take adds
   after a merge), write the index file, commit.

Every step is a data file of an :class:`internvit.store.Store` job: a kill resumes at the first missing
partition; the committed manifest only ever names a complete pair of files.

The index file names its lists file by base name only; :func:`read_ondisk_index` points it at the lists file
beside it in whatever folder the index now lives (a folder can be moved or copied). The lists are mapped,
not read: opening an index costs the quantizer's memory, and a search reads the ``nprobe`` lists it visits.

Memory accounting: faiss maps the partition files and the lists file (``mmap``); the pages a merge or search
touches count in the process's RSS as *file-backed* pages, which the kernel writes back and drops under
memory pressure. What the budget bounds is the process's own (anonymous) memory.
"""
from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import time
from typing import Optional, Union

import numpy as np

from internvit.store import Store, generation_name, job_id

from .embeddings import EmbeddingSource, _table_digest, to_table
from .faiss_ops import (
    RetrievalError,
    _faiss_message,
    add_vectors,
    faiss_module,
    new_index,
    read_index,
    write_index,
)
from .index_folder import check_id_offset
from .index_plan import (
    MIN_POINTS_PER_CENTROID,
    IndexPlan,
    _parse_key,
    check_index_key,
    choose_index_key,
    default_nlist,
    default_train_size,
    estimate_index_bytes,
    format_bytes,
    parse_memory,
)

logger = logging.getLogger("retrieval")

__all__ = ["ONDISK_SUFFIX", "choose_ondisk_key", "plan_ondisk", "wants_on_disk", "resident_bytes",
           "partition_rows", "build_ondisk_index", "read_ondisk_index", "write_ondisk_index", "ivfdata_name",
           "code_size"]

ONDISK_SUFFIX = ".ivfdata"


# --------------------------------------------------------------------------------------------- planning
def ivfdata_name(index_file: str) -> str:
    """``image.g0001.index`` → ``image.g0001.ivfdata`` (the lists file of an on-disk index file)."""
    return os.path.splitext(index_file)[0] + ONDISK_SUFFIX


def code_size(key: str, dim: int) -> int:
    """Bytes of one vector's code in the inverted lists of ``key`` (ids not included)."""
    index = new_index(key, dim)
    ivf = faiss_module().try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(f"index_key {key!r} is not an IVF index; only IVF inverted lists can live on disk")
    return int(ivf.code_size)


def resident_bytes(key: str, dim: int) -> int:
    """RAM an opened on-disk index of ``key`` keeps (quantizer, HNSW links, transforms, codebooks); the codes
    and ids stay in the lists file."""
    return estimate_index_bytes(key, 0, dim)


def choose_ondisk_key(n: int, dim: int, max_index_memory: Union[str, int] = "4G") -> IndexPlan:
    """The automatic key of an on-disk index of ``n`` vectors of ``dim``.

    The codes are on disk, so they need not be compressed to fit the budget: ``IVF{K},SQ8`` (one byte per
    dimension, close to exact for embeddings) with ``K`` from :func:`~retrieval.index_plan.default_nlist`
    and an HNSW coarse quantizer from 16,384 lists. Raises ``ValueError`` when even the quantizer does not fit
    ``max_index_memory``."""
    budget = parse_memory(max_index_memory)
    nlist = min(default_nlist(n), max(16, n // MIN_POINTS_PER_CENTROID))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 16_384 else f"IVF{nlist}"
    key = f"{coarse},SQ8"
    resident = resident_bytes(key, dim)
    if resident > budget // 2:
        raise ValueError(f"max_index_memory={format_bytes(budget)} is too small for an on-disk index of {n} "
                         f"vectors of dim {dim}: its {nlist}-list quantizer alone needs {format_bytes(resident)}")
    disk = estimate_index_bytes(key, n, dim) - resident
    return IndexPlan(key, resident, default_train_size(key, n, dim, budget // 4),
                     f"on disk: {nlist} lists, {dim}-byte SQ8 codes ({format_bytes(disk)} of lists on disk, "
                     f"{format_bytes(resident)} in RAM)")


def max_ondisk_nprobe(nlist: int) -> int:
    """The largest nprobe an on-disk build's tuning tries: ``max(64, nlist // 16)`` (a query then reads at most
    about 1/16 of the lists from disk; beyond that, a scan of the collection would do)."""
    return max(64, int(nlist) // 16)


def plan_ondisk(n: int, dim: int, index_key: Optional[str] = None, max_index_memory: Union[str, int] = "4G"
                ) -> IndexPlan:
    """The plan of an on-disk build: :func:`choose_ondisk_key`, or ``index_key`` checked (an IVF key faiss
    can build at ``dim`` from ``n`` vectors; not ``IVF…,PQ…+…`` refinement, which keeps codes outside the
    lists). ``estimated_bytes`` is what stays in RAM. One-line ``ValueError`` before any work."""
    budget = parse_memory(max_index_memory)
    if index_key is None:
        return choose_ondisk_key(n, dim, budget)
    check_index_key(index_key, n, dim)
    faiss = faiss_module()
    index = new_index(index_key, dim)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(f"index_key {index_key!r}: only IVF indexes can keep their lists on disk (use e.g. "
                         f"IVF{default_nlist(n)},SQ8)")
    if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQR) or "Refine" in index_key or "RFlat" in index_key:
        raise ValueError(f"index_key {index_key!r}: refinement keeps vectors outside the inverted lists; it cannot "
                         f"live on disk")
    return IndexPlan(index_key, resident_bytes(index_key, dim), default_train_size(index_key, n, dim, budget // 4),
                     "explicit index_key, lists on disk")


def wants_on_disk(n: int, dim: int, index_key: Optional[str], max_index_memory: Union[str, int]) -> bool:
    """Whether :func:`~retrieval.index_build.build_index` should build on disk when not told: an explicit IVF
    key whose codes exceed ``max_index_memory``, or no key and no in-memory index fits the budget."""
    budget = parse_memory(max_index_memory)
    if index_key is None:
        try:
            choose_index_key(n, dim, budget)
        except ValueError:
            return True
        return False
    p = _parse_key(index_key)
    return bool(p["nlist"]) and estimate_index_bytes(index_key, n, dim) > budget


def partition_rows(code_bytes: int, budget: int, workers: int, batch_rows: int, n: int) -> int:
    """Rows per partition: the partition's codes + ids take at most a quarter of the budget per worker (the
    lists' vectors grow by doubling, so at most half of it), a multiple of ``batch_rows``, at most ``n``."""
    per = int(code_bytes) + 8
    rows = max(1, budget // (4 * max(1, workers) * per))
    rows = max(batch_rows, rows // batch_rows * batch_rows)
    return int(min(rows, -(-n // batch_rows) * batch_rows))


# --------------------------------------------------------------------------------------------- partitions
def add_partition(trained_path: str, source: EmbeddingSource, start: int, end: int, skip: np.ndarray,
                  batch_rows: int, out_path: str) -> int:
    """Add rows ``[start, end)`` of ``source`` (but not the sorted rows ``skip``) under ids = row to a copy of
    the trained index at ``trained_path``, batch by batch, and write it to ``out_path`` (its inverted lists
    hold only this partition). Returns the number of vectors added. Runs in worker processes too."""
    index = read_index(trained_path)
    lo_skip = np.asarray(skip, dtype=np.int64)
    for s in range(start, end, batch_rows):
        e = min(s + batch_rows, end)
        x = source.rows(s, e)
        rows = np.arange(s, e, dtype=np.int64)
        lo, hi = np.searchsorted(lo_skip, [s, e])
        if hi > lo:
            keep = ~np.isin(rows, lo_skip[lo:hi])
            x, rows = np.ascontiguousarray(x[keep]), rows[keep]
        if len(rows):
            add_vectors(index, x, rows)
        del x
    write_index(index, out_path)
    return int(index.ntotal)


def _worker_init() -> None:
    faiss_module()  # silence the loader notice once per worker


@contextlib.contextmanager
def _stdout_to_stderr():
    """faiss's ``OnDiskInvertedLists`` prints progress ("resizing ...") on the C stdout; keep it off stdout
    (where tools print results) during a merge, which only a build runs."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def merge_partitions(trained_path: str, part_paths: list[str], ivfdata_path: str):
    """The trained index with the lists of ``part_paths`` merged into an ``OnDiskInvertedLists`` file at
    ``ivfdata_path`` (``faiss.contrib.ondisk.merge_ondisk``). The returned index's lists are writable (adds
    grow the file); write it with :func:`write_ondisk_index`."""
    from faiss.contrib.ondisk import merge_ondisk

    index = read_index(trained_path)
    with _stdout_to_stderr():
        merge_ondisk(index, list(part_paths), ivfdata_path)
    return index


def write_ondisk_index(index, path: str, ivfdata_ref: str) -> None:
    """Write an on-disk index to ``path``, naming its lists file by the base name ``ivfdata_ref`` (where
    :func:`read_ondisk_index` finds it: beside the index file, whatever the folder is called then)."""
    faiss = faiss_module()
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    actual = invlists.filename
    invlists.filename = os.path.basename(ivfdata_ref)
    try:
        write_index(index, path)
    finally:
        invlists.filename = actual


def _point_lists_at(data: bytes, ref: str, target: str, where: str) -> bytes:
    """The serialized index ``data`` with its ``OnDiskInvertedLists`` file name ``ref`` replaced by ``target``
    (faiss writes it as a little-endian size_t length followed by the bytes)."""
    old = struct.pack("<Q", len(ref.encode())) + ref.encode()
    at = data.find(b"ilod")
    if at < 0:
        raise RetrievalError(f"{where}: not an on-disk IVF index (no OnDiskInvertedLists in it)")
    found = data.count(old, at)
    if found != 1:
        raise RetrievalError(f"{where}: the index does not refer to its lists file {ref!r} "
                             f"(modified outside retrieval?)")
    new = struct.pack("<Q", len(target.encode())) + target.encode()
    pos = data.find(old, at)
    return data[:pos] + new + data[pos + len(old):]


def read_ondisk_index(index_path: str, ivfdata_path: Optional[str] = None, *, expect_bytes: Optional[int] = None):
    """Open an on-disk index: the index file is read (quantizer, tables, list offsets), its lists file
    ``ivfdata_path`` (default: the ``.ivfdata`` beside it) is memory-mapped read-only.

    The index file names its lists file by base name (so the folder can move, and generation naming is kept);
    it is pointed at ``ivfdata_path`` on load. Raises :class:`RetrievalError` (one line) when either file is
    missing, truncated (``expect_bytes``: the lists file's recorded size) or not an on-disk faiss index."""
    faiss = faiss_module()
    ivfdata_path = os.path.abspath(ivfdata_path or ivfdata_name(index_path))
    if not os.path.isfile(ivfdata_path):
        raise FileNotFoundError(ivfdata_path)
    size = os.path.getsize(ivfdata_path)
    if expect_bytes is not None and size != expect_bytes:
        raise RetrievalError(f"{ivfdata_path}: {size} bytes but the manifest says {expect_bytes} "
                             f"(truncated or modified)")
    with open(index_path, "rb") as f:
        data = f.read()
    data = _point_lists_at(data, os.path.basename(ivfdata_path), ivfdata_path, index_path)
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise RetrievalError(f"{index_path}: not a readable on-disk faiss index, truncated or corrupt "
                             f"({_faiss_message(e)[:120]})") from None
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if int(invlists.totsize) > size:
        raise RetrievalError(f"{ivfdata_path}: {size} bytes but its index expects {int(invlists.totsize)} "
                             f"(truncated)")
    return index


# --------------------------------------------------------------------------------------------- build
def build_ondisk_index(
    embeddings,
    out_dir: str,
    *,
    index_key: Optional[str] = None,
    max_index_memory: Union[str, int] = "4G",
    target_recall: float = 0.95,
    metadata=None,
    kind: str = "img",
    k: int = 10,
    n_tune_queries: int = 1000,
    encoder_info: Optional[dict] = None,
    overwrite: bool = False,
    batch_rows: Optional[int] = None,
    seed: int = 0,
    normalize: Optional[bool] = None,
    workers: int = 1,
    id_offset: int = 0,
    progress: bool = True,
) -> dict:
    """Build a tuned inner-product IVF index whose inverted lists live on disk; returns the committed manifest.

    Arguments as :func:`~retrieval.index_build.build_index` (same embeddings / metadata inputs, same checks,
    same normalisation, tuning and held-out rows), plus ``workers`` (processes adding partitions in parallel;
    the result does not depend on it, nor on the partition size: a rerun with other workers resumes) and
    ``id_offset`` (recorded in the manifest: the folder's ids are
    ``id_offset + row`` in a :class:`~retrieval.sharded.ShardedRetriever`, so folders built from disjoint parts
    of one collection get globally unique ids). ``index_key`` must be an IVF key (``None``:
    :func:`choose_ondisk_key`); ``max_index_memory`` bounds the RAM of the build (training sample, partitions,
    batches), not the lists, which are on disk.

    Raises ``ValueError`` for a bad argument or key (before any work), ``EmbeddingError`` for non-finite rows,
    ``FileExistsError`` when ``out_dir`` holds another index (``overwrite=True`` replaces it), and the store's
    ``PendingJobError`` / ``StoreBusyError``. Rerunning an interrupted build resumes it (finished partitions
    are kept); rerunning a finished one returns its manifest.
    """
    from . import index_build as ib
    from .index_folder import INDEX_FILES
    from .index_tune import split_rows, tune_index

    faiss_module()
    out_dir = os.fspath(out_dir)
    budget = ib.check_build_args(kind=kind, target_recall=target_recall, k=k, n_tune_queries=n_tune_queries,
                                 batch_rows=batch_rows, max_index_memory=max_index_memory)
    for name, v, low in (("workers", workers, 1), ("id_offset", id_offset, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    source = EmbeddingSource.open(embeddings, kind)
    n, dim = source.count, source.dim
    check_id_offset(id_offset, n, out_dir)  # its last global id must fit faiss's int64 ids
    parts = ib._metadata_parts(source, metadata)
    excluded = ib._skipped_rows(source, parts, kind)
    indexed = n - len(excluded)
    n_held = min(n_tune_queries, max(indexed // 10, 1)) if n_tune_queries else 0
    plan = plan_ondisk(indexed - n_held, dim, index_key, budget)
    rows_per_batch = ib._batch_rows(dim, budget, batch_rows)
    csize = code_size(plan.key, dim)
    part_rows = partition_rows(csize, budget, workers, rows_per_batch, n)
    existing = ib._committed_or_none(out_dir)
    if existing is not None and not overwrite and (
            not existing.get("on_disk") or existing.get("kind") != kind or existing.get("index_key") != plan.key
            or [e.get("count") for e in existing.get("embeddings", [])[:1]] != [n]):  # before the checksum pass
        raise FileExistsError(f"{out_dir}: already holds an index built from other embeddings or arguments "
                              f"(use another folder, or overwrite=True)")
    scan, normalize_ = ib._scan(source, normalize, source.root or "embeddings")
    checksum = scan["checksum"]
    encoder = ib._encoder_of(source, encoder_info)
    job = dict(op="build", on_disk=True, checksum=checksum, key=plan.key, train=plan.train_size,
               target=target_recall, k=k, nq=n_tune_queries, seed=seed, batch=rows_per_batch,
               kind=kind, normalize=normalize_, normalize_arg=normalize, skipped=int(len(excluded)),
               id_offset=int(id_offset), encoder=ib._without_device(encoder),
               metadata=None if metadata is None else _table_digest(to_table(metadata, source.count)))
    signature = job_id(job)
    if existing is not None and not overwrite:
        if existing.get("build", {}).get("signature") == signature:
            logger.info("%s: index already built with these arguments", out_dir)
            ib._tidy(out_dir, job)
            return existing
        raise FileExistsError(f"{out_dir}: already holds an index built from other embeddings or arguments "
                              f"(use another folder, or overwrite=True)")
    src = source.normalized(normalize_)
    with Store(out_dir, job=job, discard_pending=overwrite, description="index") as st:
        gen = st.generation
        index_file = generation_name(INDEX_FILES[kind], gen)
        data_file = ivfdata_name(index_file)
        stem = os.path.splitext(index_file)[0]
        trained = f"{stem}.trained.index"
        timings = dict(st.state.get("timings", {}))
        train_rows, held = split_rows(n, plan.train_size, n_held, seed, excluded)
        skip = np.union1d(held, excluded).astype(np.int64)
        stage = st.state.get("stage", "train")
        part_rows = int(st.state.get("part_rows", part_rows))  # a resumed build keeps its partitions
        if stage == "train":
            t0 = time.perf_counter()
            index = new_index(plan.key, dim)
            logger.info("training %s on %d vectors", plan.key, len(train_rows))
            index.train(src.take(train_rows))
            with st.open_file(trained) as tmp:
                write_index(index, tmp)
            del index
            timings["train_s"] = time.perf_counter() - t0
            st.save_state(stage="add", timings=timings, part_rows=part_rows)
            stage = "add"
        ranges = [(s, min(s + part_rows, n)) for s in range(0, n, part_rows)]
        names = [f"{stem}.part-{i:05d}.index" for i in range(len(ranges))]
        held_part = f"{stem}.part-held.index"
        trained_path = os.path.join(st.folder, trained)
        if stage == "add":
            t0 = time.perf_counter()
            _add_partitions(st, trained_path, src, ranges, names, skip, rows_per_batch, workers, progress)
            if n_held and held_part not in st.pending_files:  # tuning queries: added after the other rows
                with st.open_file(held_part) as tmp:
                    index = read_index(trained_path)
                    add_vectors(index, src.take(held), held)
                    write_index(index, tmp)
                    del index
            timings["add_s"] = timings.get("add_s", 0.0) + time.perf_counter() - t0
            stage = "tune" if n_held else "merge"
            st.save_state(stage=stage, timings=timings)
        parts_paths = [os.path.join(st.folder, p) for p in names]
        if stage == "tune":
            # nprobe is tuned on the lists without the held-out rows (merged once into a scratch lists file;
            # faiss's on-disk lists cannot take adds after a merge, so the final lists are merged afresh)
            t0 = time.perf_counter()
            scratch = f"{stem}.tune{ONDISK_SUFFIX}"
            with st.open_file(scratch) as data_tmp:
                index = merge_partitions(trained_path, parts_paths, data_tmp)
                tuning = tune_index(index, plan.key, src, src.take(held), exclude=skip,
                                    target_recall=target_recall, k=k, batch_rows=rows_per_batch, progress=progress,
                                    max_nprobe=max_ondisk_nprobe(_parse_key(plan.key)["nlist"]))
                tuning["queries"] = "held-out collection rows (disjoint from the training sample)"
                del index
            st.discard(scratch)
            timings["tune_s"] = time.perf_counter() - t0
            st.save_state(stage="merge", timings=timings, tuning=tuning)
            stage = "merge"
        if stage == "merge":
            t0 = time.perf_counter()
            tuning = st.state.get("tuning") or {"search_params": "", "recall": None, "k": k, "n_queries": 0,
                                                "curve": []}
            with st.open_file(data_file) as data_tmp:
                index = merge_partitions(trained_path, parts_paths + ([os.path.join(st.folder, held_part)]
                                                                      if n_held else []), data_tmp)
                ntotal = int(index.ntotal)
                with st.open_file(index_file) as tmp:
                    write_ondisk_index(index, tmp, data_file)
                del index
            timings["merge_s"] = time.perf_counter() - t0
            st.save_state(stage="commit", tuning=tuning, timings=timings, ntotal=ntotal,
                          index_bytes=os.path.getsize(os.path.join(st.folder, index_file)),
                          ivfdata_bytes=os.path.getsize(os.path.join(st.folder, data_file)))
        s = st.state
        manifest = ib.build_manifest(s, kind=kind, index_file=index_file, normalize_=normalize_,
                                     normalize=normalize, scan=scan, dim=dim, plan=plan, budget=budget,
                                     target_recall=target_recall, n=n, excluded=excluded, encoder=encoder,
                                     source=ib.record_source(source, checksum), signature=signature)
        manifest["id_offset"] = int(id_offset)
        manifest["on_disk"] = {"ivfdata_file": data_file, "ivfdata_bytes": s["ivfdata_bytes"], "code_size": csize,
                               "partitions": len(ranges), "partition_rows": part_rows}
        manifest["bytes_per_vector"] = (s["index_bytes"] + s["ivfdata_bytes"]) / max(s["ntotal"], 1)
        entries = ib._store_metadata(st, parts, 0, gen)
        manifest["metadata_files"] = entries
        return st.commit(manifest, [index_file, data_file] + [e["file"] for e in entries])


def _add_partitions(st: Store, trained_path: str, src: EmbeddingSource, ranges, names, skip: np.ndarray,
                    batch_rows: int, workers: int, progress: bool) -> None:
    """Write every partition file that a previous (interrupted) run did not finish, ``workers`` at a time."""
    todo = [i for i, name in enumerate(names) if name not in st.pending_files]
    if len(todo) < len(names):
        logger.info("resuming: %d of %d partitions already written", len(names) - len(todo), len(names))

    def skip_of(i):
        lo, hi = np.searchsorted(skip, ranges[i])
        return skip[lo:hi]

    if workers > 1 and not all(isinstance(x, str) for x in src.shards):
        logger.info("in-memory embeddings: partitions are added in this process (workers read shard files)")
        workers = 1
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            with st.open_file(names[i]) as tmp:
                add_partition(trained_path, src, *ranges[i], skip_of(i), batch_rows, tmp)
            if progress:
                logger.info("partition %d/%d written", i + 1, len(names))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # no fork of a process holding OpenMP threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        for w in range(0, len(todo), workers):
            wave = todo[w:w + workers]
            with contextlib.ExitStack() as stack:
                tmps = [stack.enter_context(st.open_file(names[i])) for i in wave]
                futures = [pool.submit(add_partition, trained_path, src, *ranges[i], skip_of(i), batch_rows, t)
                           for i, t in zip(wave, tmps)]
                for f in futures:
                    f.result()
            if progress:
                logger.info("partitions %d-%d/%d written", wave[0] + 1, wave[-1] + 1, len(names))
