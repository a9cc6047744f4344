"""The store job around a build / add / remove (:mod:`internvit.store`), shared by :mod:`retrieval.index_build`
and :mod:`retrieval.index_add`.

* :func:`_populate` is the add pass: the rows in batches under their ids, each raw batch checked first
  (:class:`_RowCheck`), the partial index checkpointed as a data file (:func:`_checkpoint`) so a kill resumes
  from the last checkpoint; :func:`_write_final` writes the finished index.
* :data:`DETERMINISTIC_ERRORS` are rolled back instead of left pending; a no-op rerun finishes the clean-up
  a kill after the commit interrupted (:func:`_tidy`); :func:`discard_pending` drops an interrupted job.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import numpy as np

from internvit.store import JOURNAL, PendingJobError, Store, StoreBusyError

from .embeddings import EmbeddingError, EmbeddingSource, row_facts
from .faiss_ops import RetrievalError, add_vectors, seed_levels, write_index
from .index_folder import read_manifest
from .index_tune import _progress

logger = logging.getLogger("retrieval")


#: errors a rerun of the same job would meet again (refused rows, faiss refusing the index, a bad argument
#: found late): the job is rolled back instead of left pending. A kill (no exception), ``KeyboardInterrupt``,
#: ``OSError`` (disk full, I/O) and ``MemoryError`` keep it pending, so the rerun resumes. The store's own
#: refusals (busy, another job pending) are raised before the job starts.
DETERMINISTIC_ERRORS = (ValueError, RuntimeError, TypeError, AssertionError, LookupError)


def _batch_rows(dim: int, budget: int, batch_rows: Optional[int]) -> int:
    if batch_rows:
        return int(batch_rows)
    return int(max(1024, min(262_144, min(budget // 10, 1 << 30) // (4 * dim))))


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


# --------------------------------------------------------------------------------------------- committed / pending
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
