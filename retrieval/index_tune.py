"""Tuning search parameters: exact ground truth (``faiss.contrib.exhaustive_search.knn_ground_truth`` over the
collection streamed in batches), recall@k, the held-out query sample, and the nprobe / efSearch search."""
from __future__ import annotations

import math
import re
import warnings
from typing import Iterator, Optional

import numpy as np

from .embeddings import EmbeddingSource
from .faiss_ops import faiss_module, set_search_params
from .index_plan import _parse_key


def _progress(it, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def position_to_row(pos: np.ndarray, excluded: Optional[np.ndarray]) -> np.ndarray:
    """Map positions in the collection *without* the sorted rows ``excluded`` back to collection rows."""
    pos = np.asarray(pos, dtype=np.int64)
    if excluded is None or len(excluded) == 0:
        return pos
    excluded = np.asarray(excluded, dtype=np.int64)
    shifted = excluded - np.arange(len(excluded), dtype=np.int64)  # kept rows before each excluded row
    return pos + np.searchsorted(shifted, pos, side="right")


def split_rows(n: int, train_size: int, n_queries: int, seed: int = 0, excluded: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(training rows, held-out query rows)``: disjoint, sorted, drawn from one sample of the rows not in
    ``excluded``. The held-out rows (≤ ``n_queries``, ≤ 10 % of the rows) tune the search parameters and are
    added to the index only afterwards; the training rows are at most the rest."""
    m = n - (0 if excluded is None else len(excluded))
    h = min(int(n_queries), max(m // 10, 1)) if n_queries and m > 1 else 0
    t = max(0, min(int(train_size), m - h))
    pos = np.random.default_rng(seed).choice(m, size=t + h, replace=False) if t + h else np.zeros(0, np.int64)
    held = np.sort(position_to_row(pos[:h], excluded))
    train = np.sort(position_to_row(pos[h:], excluded))
    return train, held


def holdout_rows(n: int, n_queries: int, seed: int = 0) -> np.ndarray:
    """The held-out query rows of :func:`split_rows` (no training sample, nothing excluded)."""
    return split_rows(n, 0, n_queries, seed)[1]


def _kept_batches(source: EmbeddingSource, batch_rows: int, exclude: np.ndarray, k: int,
                  progress: bool) -> Iterator[np.ndarray]:
    """Batches of the rows not in ``exclude``, each of at least ``k`` rows (unless there are fewer in all):
    ``knn_ground_truth`` offsets ids by position, so a batch shorter than ``k`` would turn faiss's -1 fillers
    into valid-looking ids."""
    prev = None
    batches = source.iter_batches(batch_rows)
    for start, batch in _progress(batches, progress, "exact search", total=-(-source.count // batch_rows)):
        lo, hi = np.searchsorted(exclude, [start, start + len(batch)])
        if hi > lo:
            batch = np.delete(batch, exclude[lo:hi] - start, axis=0)
        if len(batch) == 0:
            continue
        if prev is None:
            prev = batch
        elif len(prev) < k or len(batch) < k:
            prev = np.concatenate([prev, batch])
        else:
            yield np.ascontiguousarray(prev)
            prev = batch
    if prev is not None:
        yield np.ascontiguousarray(prev)


def exact_search(source: EmbeddingSource, queries: np.ndarray, k: int, *, batch_rows: int = 65536,
                 exclude: Optional[np.ndarray] = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product neighbours ``(scores, rows)`` ``(Q, k)`` of ``queries`` over a collection,
    streamed batch by batch (``knn_ground_truth``). ``exclude``: sorted rows that are not candidates (e.g.
    held-out query rows or rows that are not indexed)."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    k = min(int(k), source.count - len(exclude))
    d, i = knn_ground_truth(queries, _kept_batches(source, batch_rows, exclude, k, progress), k,
                            metric_type=faiss.METRIC_INNER_PRODUCT)
    return d, np.where(i >= 0, position_to_row(np.maximum(i, 0), exclude), -1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / min(k, neighbours the query has) (k-recall@k, "intersection"
    measure, as :func:`retrieval.evaluate.knn_recall` defines it): the denominator counts the exact neighbours
    (``truth`` entries other than -1), so a collection smaller than k does not cap the score below 1 (a
    10-vector build holds one row out to tune: 9 neighbours, all found = 1.0, not 0.9). A -1 result is a miss;
    a query with no neighbour at all is not counted (1.0 when none has one)."""
    recalls = []
    for f, t in zip(found, truth):
        t = {int(x) for x in t[:k] if x >= 0}
        if t:
            recalls.append(len({int(x) for x in f[:k] if x >= 0} & t) / len(t))
    return float(np.mean(recalls)) if recalls else 1.0


def _drop_self(ids: np.ndarray, self_ids: Optional[np.ndarray], k: int) -> np.ndarray:
    if self_ids is None:
        return ids[:, :k]
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (row, s) in enumerate(zip(ids, self_ids)):
        kept = row[row != s][:k]
        out[r, : len(kept)] = kept
    return out


def _param_ladder(key: str, index) -> tuple[str, list[int]]:
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        top = ivf.nlist
        ladder = sorted({min(top, 2**i) for i in range(0, int(math.log2(max(top, 1))) + 2)})
        return "nprobe", ladder
    if _parse_key(key)["hnsw"]:
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096]
    return "", []


def _params_str(name: str, value: int, key: str) -> str:
    if name == "nprobe" and _parse_key(key)["quantizer_hnsw"]:
        return f"nprobe={value},quantizer_efSearch={max(64, 2 * value)}"
    return f"{name}={value}" if name else ""


def tune_index(index, key: str, source: EmbeddingSource, queries: np.ndarray, *, exclude: Optional[np.ndarray] = None,
               target_recall: float = 0.95, k: int = 10, batch_rows: int = 65536, progress: bool = False,
               max_nprobe: Optional[int] = None) -> dict:
    """Smallest nprobe / efSearch whose recall@k against exact search reaches ``target_recall``.

    ``max_nprobe`` bounds the nprobe ladder (an on-disk index reads every probed list from disk: beyond a
    fraction of the lists a search costs a scan of the collection, and each ladder step doubles the tuning time);
    when the target is not reached within it, the best setting is kept with the warning below.

    ``queries`` must not be in ``index`` (a build holds out collection rows and adds them after tuning;
    in-index queries find themselves and their graph / list neighbours too easily, which overstates recall).
    Ground truth is the exact top-k over ``source`` without the ``exclude`` rows. Returns
    ``{'search_params', 'recall', 'k', 'n_queries', 'curve'}``; if the target cannot be reached (e.g. PQ
    compression) the best setting is kept and a warning names the recall reached.
    """
    name, ladder = _param_ladder(key, index)
    if name == "nprobe" and max_nprobe is not None:
        ladder = [v for v in ladder if v < max_nprobe] + [max_nprobe] if ladder and ladder[-1] > max_nprobe \
            else ladder
    lossy = _parse_key(key)["code_bytes"] not in (None, "flat")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact_search(source, queries, k, batch_rows=batch_rows, exclude=exclude, progress=progress)

    def measure(params: str) -> float:
        set_search_params(index, params)
        _, found = index.search(queries, k)
        return recall_at_k(found, truth, k)

    if not name:  # nothing to tune (Flat, PCA + Flat, ...): the recall it has, and a warning when it misses
        r = measure("")
        if r < target_recall:
            warnings.warn(f"index {key}: recall@{k} is only {r:.3f} < target {target_recall} (it has no search "
                          f"parameter to raise); give another index_key", stacklevel=2)
        return {"search_params": "", "recall": r, "k": k, "n_queries": len(queries), "curve": [["", r]]}
    curve, best, prev = [], None, None
    for value in _progress(ladder, progress, f"tuning {name}"):
        params = _params_str(name, value, key)
        r = measure(params)
        curve.append([params, r])
        if r >= target_recall:
            best = (value, r)
            break
        if lossy and prev is not None and r - prev[1] < 0.002:  # plateau: quantisation-limited
            best = prev if prev[1] >= r else (value, r)
            break
        prev = (value, r)
    if best is not None and best[1] >= target_recall and len(curve) > 1:
        lo = int(re.search(r"=(\d+)", curve[-2][0]).group(1))
        hi = best[0]
        while hi - lo > 1:  # bisect between the last miss and the first hit
            mid = (lo + hi) // 2
            r = measure(_params_str(name, mid, key))
            curve.append([_params_str(name, mid, key), r])
            if r >= target_recall:
                hi, best = mid, (mid, r)
            else:
                lo = mid
    if best is None:
        best = prev
    params = _params_str(name, best[0], key)
    set_search_params(index, params)
    if best[1] < target_recall:
        warnings.warn(f"index {key}: recall@{k} reaches only {best[1]:.3f} < target {target_recall} "
                      f"(at {params}); give a larger max_index_memory or an explicit index_key", stacklevel=2)
    return {"search_params": params, "recall": best[1], "k": k, "n_queries": len(queries), "curve": curve}


def indexed_source(manifest: dict, index, kind: Optional[str] = None) -> tuple[EmbeddingSource, np.ndarray]:
    """The collection behind an index for exact ground truth: every embeddings folder its manifest records
    (build, then each add), concatenated in id order (row ``r`` = id ``r``) and normalised as the index was,
    plus the sorted ids that are not in ``index`` (removed, or skipped empty captions) to exclude.

    Raises ``ValueError`` when a part was added from an in-memory array or its folder no longer holds the
    recorded number of rows (then pass the embeddings explicitly)."""
    import os

    from .faiss_ops import stored_ids

    kind = kind or manifest.get("kind", "img")
    shards: list = []
    for e in manifest.get("embeddings", []):
        where = e.get("source")
        if not where or where == "array" or not os.path.exists(where):
            raise ValueError(f"ids {e.get('first_id')}..: added from {where or 'an array'}, which is not a folder "
                             f"that still exists; pass the embeddings explicitly")
        part = EmbeddingSource.open(where, kind)
        if part.count != e["count"]:
            raise ValueError(f"{where}: holds {part.count} rows but {e['count']} were indexed from it")
        shards += part.shards
    source = EmbeddingSource(shards).normalized(bool(manifest.get("normalize")))
    present = stored_ids(index)
    absent = np.zeros(0, np.int64) if present is None else np.setdiff1d(np.arange(source.count), present)
    return source, absent
