"""Build, extend and tune FAISS indexes: memory-bounded, resumable, incremental; inner-product metric.

An index folder holds::

    image.index            the CPU faiss index (``text.index`` for a caption index); ids = row numbers
    metadata/*.parquet     one row per id, in id order (path, caption, ...), clip-retrieval back-end style
    manifest.json          encoder, preprocessing, dim, metric, index key, search params, counts, checksums
    .work/                 only while a build / add runs: state.json + checkpoints (removed on success)

Every file is written to a temporary name and renamed. A job killed at any point and rerun with the same
arguments resumes from its last checkpoint (trained index, then every ``checkpoint_every_s`` of adding) and
ends with the same index as an uninterrupted run. (HNSW graphs are bit-identical only with one OpenMP
thread, since faiss inserts HNSW vertices in parallel; IVF and Flat indexes are identical with any thread count.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np

from .embeddings import (
    EmbeddingError,
    EmbeddingSource,
    atomic_write,
    atomic_write_json,
    atomic_write_parquet,
    to_table,
)

logger = logging.getLogger("retrieval")

MANIFEST = "manifest.json"
WORK = ".work"
FORMAT_VERSION = 1
INDEX_FILES = {"img": "image.index", "text": "text.index"}

# Automatic choice (see choose_index_key): below FLAT_MAX vectors exact search is fast enough; up to HNSW_MAX
# an HNSW graph gives the best speed/recall; past it IVF builds an order of magnitude faster on a few cores.
FLAT_MAX = 10_000
HNSW_MAX = 200_000
HNSW_M = 32
PQ_CHOICES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)


class RetrievalError(RuntimeError):
    """An index folder that cannot be used: missing, half-written, or an unsupported operation."""


class IndexMismatchError(RetrievalError):
    """The index and the query encoder / new embeddings disagree (model or dimension)."""


# --------------------------------------------------------------------------------------------- sizes
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_memory(value: Union[str, int, float]) -> int:
    """``'4G'``, ``'512M'``, ``'1.5GB'`` or a byte count → bytes (binary units, as autofaiss)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", str(value), flags=re.I)
    if not m:
        raise ValueError(f"cannot parse memory size {value!r} (use e.g. 4G, 512M, 2.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class IndexPlan:
    """What :func:`choose_index_key` decided, and why."""

    key: str
    estimated_bytes: int
    train_size: int
    reason: str


def _parse_key(key: str) -> dict:
    """The parts of an index_factory string that matter for memory and tuning."""
    info = {"pre_dim": None, "nlist": 0, "quantizer_hnsw": 0, "hnsw": 0, "code_bytes": None, "pq": 0,
            "opq": False}
    for part in key.split(","):
        if m := re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", part):
            info["opq"] = True
            info["pre_dim"] = int(m.group(2)) if m.group(2) else None
        elif m := re.fullmatch(r"PCAR?(\d+)", part):
            info["pre_dim"] = int(m.group(1))
        elif m := re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", part):
            info["nlist"] = int(m.group(1))
            info["quantizer_hnsw"] = int(m.group(2) or 0)
        elif m := re.fullmatch(r"HNSW(\d+)(?:_.*)?", part):
            info["hnsw"] = int(m.group(1))
        elif m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs.*)?", part):
            info["pq"] = int(m.group(1))
            info["code_bytes"] = int(m.group(1)) * int(m.group(2) or 8) / 8
        elif m := re.fullmatch(r"SQ(\d+|fp16|bf16)", part):
            bits = 16 if m.group(1) in ("fp16", "bf16") else int(m.group(1))
            info["code_bytes"] = ("sq", bits)
        elif part == "Flat" or part.startswith("RFlat") or part.startswith("Refine"):
            info["code_bytes"] = info["code_bytes"] if info["code_bytes"] is not None else "flat"
    return info


def estimate_index_bytes(key: str, n: int, dim: int) -> int:
    """Approximate RAM / file size of ``key`` holding ``n`` vectors of ``dim`` (ids included)."""
    p = _parse_key(key)
    d = p["pre_dim"] or dim
    fixed = (dim * d * 4) if p["pre_dim"] or p["opq"] else 0
    code = p["code_bytes"]
    if code is None or code == "flat":
        per = 4 * d
    elif isinstance(code, tuple):
        per = d * code[1] / 8
    else:
        per = code
    if p["pq"]:
        fixed += 256 * d * 4  # PQ codebooks
    if p["nlist"]:
        fixed += p["nlist"] * d * 4 + p["nlist"] * p["quantizer_hnsw"] * 2 * 4 * 1.1
        per += 8  # ids in the inverted lists
    elif p["hnsw"]:
        per += p["hnsw"] * 2 * 4 * 1.05 + 8 + 8  # level-0 links (+ upper levels), level info, id map
    else:
        per += 8  # id map
    return int(fixed + per * n)


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4·√n (faiss guidelines: 4·√n…16·√n; the low
    end keeps k-means cheap on CPUs, and the tuned nprobe recovers the recall)."""
    return int(max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))))


def default_train_size(key: str, n: int, dim: int, max_train_bytes: Optional[int] = None) -> int:
    """Training vectors for ``key``: 50 per inverted list (faiss wants 39…256), ≥ 10k for PQ codebooks;
    capped by ``n`` and by ``max_train_bytes``. 0 for indexes that need no training."""
    p = _parse_key(key)
    if not (p["nlist"] or p["pq"] or p["opq"] or p["pre_dim"] or isinstance(p["code_bytes"], tuple)):
        return 0
    want = max(50 * p["nlist"], 256 * 39 if p["pq"] else 0, 1000)
    if max_train_bytes:
        want = min(want, max(1000, max_train_bytes // (4 * dim)))
    return int(min(n, want))


def choose_index_key(n: int, dim: int, max_index_memory: Union[str, int] = "4G") -> IndexPlan:
    """Pick an ``index_factory`` key for ``n`` vectors of ``dim`` under a memory budget.

    Flat (< 10k vectors, exact) → ``HNSW32`` (< 200k, M lowered to fit) → ``IVF{K},Flat`` (K from
    :func:`default_nlist`, HNSW coarse quantizer from 1M vectors) → when raw vectors do not fit:
    ``IVF{K},PQ{m}`` with the largest ``m`` that fits, rotated by OPQ when each sub-quantizer spans ≥ 8 dims
    (high compression, where OPQ's balancing pays).
    """
    budget = parse_memory(max_index_memory)
    train_cap = budget // 4

    def plan(key, reason):
        return IndexPlan(key, estimate_index_bytes(key, n, dim), default_train_size(key, n, dim, train_cap), reason)

    if n < FLAT_MAX and estimate_index_bytes("Flat", n, dim) <= budget:
        return plan("Flat", f"{n} < {FLAT_MAX} vectors: exact search is fast enough")
    if n < HNSW_MAX:
        m = HNSW_M
        while m >= 8 and estimate_index_bytes(f"HNSW{m}", n, dim) > budget:
            m //= 2
        if m >= 8:
            return plan(f"HNSW{m}", f"{n} < {HNSW_MAX} vectors and the graph fits in {format_bytes(budget)}")
    nlist = min(default_nlist(n), max(16, n // 39))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 16_384 else f"IVF{nlist}"
    key = f"{coarse},Flat"
    if estimate_index_bytes(key, n, dim) <= budget:
        return plan(key, f"raw vectors fit in {format_bytes(budget)}; {nlist} lists for {n} vectors")
    for m in PQ_CHOICES:
        if m > dim // 2:
            continue
        opq = dim // m >= 8
        out = dim if dim % m == 0 else (dim // m + 1) * m
        if not opq and dim % m:
            opq = True  # PQ needs dim % m == 0; OPQ's rotation can pad to a multiple of m
        key = f"OPQ{m}_{out},{coarse},PQ{m}" if opq else f"{coarse},PQ{m}"
        if estimate_index_bytes(key, n, dim) <= budget:
            return plan(key, f"raw vectors ({format_bytes(estimate_index_bytes('Flat', n, dim))}) exceed "
                             f"{format_bytes(budget)}: {m}-byte PQ codes" + (" with OPQ" if opq else ""))
    need = estimate_index_bytes(f"OPQ4_{dim},{coarse},PQ4", n, dim)
    raise ValueError(f"max_index_memory={format_bytes(budget)} is too small for {n} vectors of dim {dim} "
                     f"(the smallest IVF-PQ index needs about {format_bytes(need)})")


# --------------------------------------------------------------------------------------------- faiss helpers
def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a declared extra
        raise ImportError("retrieval needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def new_index(key: str, dim: int):
    """An empty inner-product index for ``key``, with sequential-id support (IVF natively, others IDMap)."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid index_key {key!r} for dim {dim}: {str(e).splitlines()[0]}") from None
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False  # search never uses Hamming thresholds; this training is slow
    return faiss.IndexIDMap(index) if ivf is None else index


def read_index(path: str, mmap: bool = False):
    faiss = _faiss()
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(path, flags)


def write_index_atomic(index, path: str) -> None:
    faiss = _faiss()
    with atomic_write(path) as tmp:
        faiss.write_index(index, tmp)


def _hnsw_of(index):
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return getattr(faiss.downcast_index(inner), "hnsw", None)


def seed_levels(index, value: int) -> None:
    """Reseed the HNSW level generator from the first id of a batch: faiss does not save that generator, so
    without this a resumed build would draw other levels than an uninterrupted one."""
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.rng = _faiss().RandomGenerator(int(value) % (2**31 - 1))


def index_bytes(index) -> int:
    """Serialized size of an index (what it occupies on disk, close to its RAM)."""
    return int(_faiss().serialize_index(index).nbytes)


def set_search_params(index, params: str) -> None:
    if params:
        _faiss().ParameterSpace().set_index_parameters(index, params)


def supports_remove(index) -> bool:
    faiss = _faiss()
    if faiss.try_extract_index_ivf(index) is not None:
        return True
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(inner, (faiss.IndexFlat,))


def _gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _pretransforms(index) -> tuple[list, object]:
    """``(the IndexPreTransform wrappers of index, outermost first; the index they wrap)``."""
    faiss = _faiss()
    wrappers, inner = [], faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        wrappers.append(inner)
        inner = faiss.downcast_index(inner.index)
    return wrappers, inner


def _sync_ntotal(wrappers, inner) -> None:
    """After adding straight into ``inner`` (``add_core``), make its IndexPreTransform wrappers count the rows."""
    for w in wrappers:
        w.ntotal = inner.ntotal


class _GpuHelper:
    """Train IVF k-means and assign vectors to lists on the GPU(s); the index itself stays a CPU index."""

    def __init__(self, index) -> None:
        faiss = _faiss()
        self.faiss = faiss
        self.ivf = faiss.try_extract_index_ivf(index)
        self.index = index
        self._assigner = None
        # GPU assignment + add_core is used when the index is an IVF, bare or under pre-transforms (OPQ, PCA)
        self._wrappers, inner = _pretransforms(index)
        self._direct = inner if isinstance(inner, faiss.IndexIVF) else None

    def train(self, x: np.ndarray) -> None:
        faiss = self.faiss
        if self.ivf is not None:
            d = self.ivf.d
            flat = faiss.IndexFlatIP(d) if self.ivf.metric_type == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(d)
            self.ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
        self.index.train(x)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        faiss = self.faiss
        ivf = self._direct
        if ivf is None:
            self.index.add_with_ids(x, ids)
            return
        if self._assigner is None:
            centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
            flat = faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type)
            flat.add(centroids)
            self._assigner = faiss.index_cpu_to_all_gpus(flat)
        xt = x
        for w in self._wrappers:
            for i in range(w.chain.size()):
                xt = faiss.downcast_VectorTransform(w.chain.at(i)).apply(xt)
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        _, assign = self._assigner.search(xt, 1)
        ivf.add_core(len(xt), faiss.swig_ptr(xt), faiss.swig_ptr(ids),
                     faiss.swig_ptr(np.ascontiguousarray(assign.ravel(), dtype=np.int64)))
        _sync_ntotal(self._wrappers, ivf)  # add_core bypasses the wrappers' ntotal


# --------------------------------------------------------------------------------------------- exact search
def exact_search(source: EmbeddingSource, queries: np.ndarray, k: int, *, batch_rows: int = 65536,
                 exclude: Optional[np.ndarray] = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product neighbours of ``queries`` over a collection, streamed batch by batch.

    ``exclude``: sorted row ids that are not candidates (e.g. held-out query rows)."""
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    k = min(k, source.count - len(exclude))
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    batches = source.iter_batches(batch_rows)
    for start, batch in _progress(batches, progress, "exact search", total=-(-source.count // batch_rows)):
        lo, hi = np.searchsorted(exclude, [start, start + len(batch)])
        kk = min(k + int(hi - lo), len(batch))
        d, i = faiss.knn(queries, batch, kk, metric=faiss.METRIC_INNER_PRODUCT)
        i = np.where(i >= 0, i + start, -1)
        if hi > lo:  # push excluded rows to the end of each list, then keep the first k
            order = np.argsort(np.isin(i, exclude[lo:hi]), axis=1, kind="stable")[:, : min(k, kk)]
            d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
            d = np.where(np.isin(i, exclude[lo:hi]), -np.inf, d).astype(np.float32)
            i = np.where(np.isinf(d), -1, i)
        heap.add_result(np.ascontiguousarray(d, dtype=np.float32), np.ascontiguousarray(i, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k (k-recall@k, "intersection" measure)."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if hits else 0.0


def _drop_self(ids: np.ndarray, self_ids: Optional[np.ndarray], k: int) -> np.ndarray:
    if self_ids is None:
        return ids[:, :k]
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (row, s) in enumerate(zip(ids, self_ids)):
        kept = row[row != s][:k]
        out[r, : len(kept)] = kept
    return out


def _param_ladder(key: str, index) -> tuple[str, list[int]]:
    faiss = _faiss()
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


def holdout_rows(n: int, n_queries: int, seed: int = 0) -> np.ndarray:
    """The sorted collection rows a build holds out as tuning queries (added to the index after tuning)."""
    return np.sort(np.random.default_rng(seed + 1).choice(n, size=min(n_queries, max(n // 10, 1)), replace=False))


def tune_index(index, key: str, source: EmbeddingSource, queries: np.ndarray, *, exclude: Optional[np.ndarray] = None,
               target_recall: float = 0.95, k: int = 10, batch_rows: int = 65536, progress: bool = False) -> dict:
    """Smallest nprobe / efSearch whose recall@k against exact search reaches ``target_recall``.

    ``queries`` must not be in ``index`` (a build holds out collection rows and adds them after tuning;
    in-index queries find themselves and their graph / list neighbours too easily, which overstates recall).
    Ground truth is the exact top-k over ``source`` without the ``exclude`` rows. Returns
    ``{'search_params', 'recall', 'k', 'n_queries', 'curve'}``; if the target cannot be reached (e.g. PQ
    compression) the best setting is kept and a warning names the recall reached.
    """
    name, ladder = _param_ladder(key, index)
    lossy = _parse_key(key)["code_bytes"] not in (None, "flat")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact_search(source, queries, k, batch_rows=batch_rows, exclude=exclude, progress=progress)

    def measure(params: str) -> float:
        set_search_params(index, params)
        _, found = index.search(queries, k)
        return recall_at_k(found, truth, k)

    if not name:
        r = measure("")
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


def _progress(it, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


# --------------------------------------------------------------------------------------------- jobs
def _signature(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Job:
    """The ``.work`` folder of one build / add: ``state.json`` plus index checkpoints."""

    def __init__(self, out_dir: str, signature: str) -> None:
        self.dir = os.path.join(out_dir, WORK)
        self.signature = signature
        self.state_path = os.path.join(self.dir, "state.json")
        self.state = {}
        if os.path.isfile(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
            if state.get("signature") == signature:
                self.state = state
        if not self.state:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
            self.state = {"signature": signature, "stage": "train", "rows_done": 0}
            self.save()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def save(self, **updates) -> None:
        self.state.update(updates)
        atomic_write_json(self.state_path, self.state)

    def checkpoint(self, index, name: str, **updates) -> None:
        """Write ``index`` as ``name``, then point ``state.json`` at it, then delete the checkpoint it replaces:
        a kill at any point leaves a state whose ``rows_done`` matches the checkpoint it names."""
        old = self.state.get("checkpoint")
        write_index_atomic(index, self.path(name))
        self.save(checkpoint=name, **updates)
        if old and old != name and os.path.exists(self.path(old)):
            os.remove(self.path(old))

    def resume_path(self, default: str) -> str:
        """The checkpoint to continue adding from: the one ``state.json`` names once rows were added."""
        return self.path(self.state.get("checkpoint", "partial.index")) if self.state.get("rows_done") else default

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def read_manifest(index_dir: str) -> dict:
    path = os.path.join(os.fspath(index_dir), MANIFEST)
    if not os.path.isfile(path):
        if not os.path.isdir(index_dir):
            raise RetrievalError(f"{index_dir}: index folder does not exist")
        pending = os.path.isfile(os.path.join(index_dir, WORK, "state.json"))
        hint = " (a build was interrupted: rerun the same build command to finish it)" if pending else ""
        raise RetrievalError(f"{index_dir}: no {MANIFEST}, not a finished index{hint}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _without_device(encoder: Optional[dict]) -> Optional[dict]:
    """Encoder info without the device it ran on (which does not change the embeddings' identity)."""
    return {k: v for k, v in encoder.items() if k != "device"} if encoder else encoder


def _encoder_of(source: EmbeddingSource, encoder_info: Optional[dict]) -> Optional[dict]:
    if encoder_info is not None:
        return encoder_info
    m = source.manifest() or {}
    return m.get("encoder") or (m.get("extra") or {}).get("encoder")


def _populate(job: _Job, index, source: EmbeddingSource, *, first_id: int, batch_rows: int,
              checkpoint_every_s: float, helper, progress: bool, skip: Optional[np.ndarray] = None) -> None:
    """Add ``source`` (but not the sorted rows ``skip``) to ``index`` with ids ``first_id + row``,
    checkpointing into ``job`` (resumable)."""
    done = job.state.get("rows_done", 0)
    if done:
        logger.info("resuming from row %d of %d", done, source.count)
    last = time.monotonic()
    bar = _progress(source.iter_batches(batch_rows, start=done), progress, "adding",
                    total=-(-source.count // batch_rows) - done // batch_rows)
    for start, batch in bar:
        end = start + len(batch)
        ids = np.arange(first_id + start, first_id + end, dtype=np.int64)
        if skip is not None and len(skip):
            keep = ~np.isin(ids - first_id, skip)
            batch, ids = np.ascontiguousarray(batch[keep]), ids[keep]
        seed_levels(index, first_id + start)
        if helper is not None:
            helper.add_with_ids(batch, ids)
        else:
            index.add_with_ids(batch, ids)
        done = end
        if done < source.count and time.monotonic() - last >= checkpoint_every_s:
            job.checkpoint(index, f"partial-{done:012d}.index", rows_done=done)
            last = time.monotonic()


def _batch_rows(dim: int, budget: int, batch_rows: Optional[int]) -> int:
    if batch_rows:
        return int(batch_rows)
    return int(max(1024, min(262_144, min(budget // 10, 1 << 30) // (4 * dim))))


def _metadata_parts(source: EmbeddingSource, metadata):
    """Metadata as a list of loaders (one per parquet shard, or one in-memory table), row-count checked."""
    import pyarrow.parquet as pq

    if metadata is not None:
        table = to_table(metadata, source.count)
        return [lambda: table]
    if not source.metadata_files:
        return []
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in source.metadata_files)
    if rows != source.count:
        raise EmbeddingError(f"{source.root}: metadata has {rows} rows but the embeddings have {source.count}")
    return [lambda f=f: pq.read_table(f) for f in source.metadata_files]


def _store_metadata(out_dir: str, parts, first_id: int, generation: int) -> list[dict]:
    """Write metadata shards ``metadata/metadata_{generation}_{i}.parquet`` with an ``id`` column (the index
    id; a source ``id`` column is kept as ``source_id``). Sorted file names = id order (clip-back style)."""
    import pyarrow as pa

    entries, next_id = [], first_id
    for i, load in enumerate(parts):
        table = load()
        if "id" in table.column_names:
            table = table.rename_columns(["source_id" if c == "id" else c for c in table.column_names])
        ids = np.arange(next_id, next_id + table.num_rows, dtype=np.int64)
        table = table.add_column(0, "id", pa.array(ids))
        name = f"metadata/metadata_{generation:05d}_{i:05d}.parquet"
        atomic_write_parquet(os.path.join(out_dir, name), table)
        entries.append({"file": name, "first_id": next_id, "count": table.num_rows})
        next_id += table.num_rows
    return entries


def _commit(out_dir: str, job: _Job, manifest: dict, parts, first_id: int, generation: int) -> dict:
    """Move the finished index into place, then metadata, then the manifest (the commit point)."""
    final_tmp = job.path("final.index")
    if os.path.exists(final_tmp):
        os.replace(final_tmp, os.path.join(out_dir, manifest["index_file"]))
    entries = _store_metadata(out_dir, parts, first_id, generation)
    keep = [e for e in manifest.get("metadata_files", []) if not e["file"].startswith(f"metadata/metadata_"
                                                                                     f"{generation:05d}_")]
    manifest["metadata_files"] = keep + entries
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    job.finish()
    return manifest


def _index_size(job: _Job, out_dir: str, index_file: str) -> int:
    final = job.path("final.index")
    return os.path.getsize(final if os.path.exists(final) else os.path.join(out_dir, index_file))


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
    progress: bool = True,
) -> dict:
    """Build a tuned inner-product index over ``embeddings`` into ``out_dir``; returns the manifest.

    ``embeddings``: a clip-retrieval folder (``img_emb/`` or, with ``kind='text'``, ``text_emb/``; its
    ``metadata/`` parquet is kept with the index) or a float32 ``(N, D)`` array (then ``metadata`` may be a
    pyarrow Table, dict of columns or list of dicts). ``index_key`` is any faiss ``index_factory`` string;
    ``None`` chooses one from N, D and ``max_index_memory`` (:func:`choose_index_key`). Search parameters are
    tuned to reach ``target_recall`` recall@``k`` against exact search. Memory: the index, the training sample
    (≤ a quarter of the budget) and one batch of rows. Resumable: rerunning with the same arguments after a
    crash continues from the last checkpoint; rerunning after success returns the existing manifest.
    """
    faiss = _faiss()
    out_dir = os.fspath(out_dir)
    source = EmbeddingSource.open(embeddings, kind)
    n, dim = source.count, source.dim
    budget = parse_memory(max_index_memory)
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if index_key is None:
        plan = choose_index_key(n, dim, budget)
    else:
        plan = IndexPlan(index_key, estimate_index_bytes(index_key, n, dim),
                         default_train_size(index_key, n, dim, budget // 4), "explicit index_key")
        new_index(index_key, dim)  # validate the key now, with a clear error
    if plan.estimated_bytes > budget:
        logger.warning("index %s for %d×%d needs about %s, more than max_index_memory=%s", plan.key, n, dim,
                       format_bytes(plan.estimated_bytes), format_bytes(budget))
    rows_per_batch = _batch_rows(dim, budget, batch_rows)
    parts = _metadata_parts(source, metadata)
    checksum = source.checksum()
    encoder = _encoder_of(source, encoder_info)
    tq_sig = None if tune_queries is None else EmbeddingSource.from_array(tune_queries).checksum()
    signature = _signature(dict(op="build", checksum=checksum, key=plan.key, train=plan.train_size,
                                target=target_recall, k=k, nq=n_tune_queries, tq=tq_sig, seed=seed,
                                batch=rows_per_batch, kind=kind, encoder=_without_device(encoder)))
    index_file = INDEX_FILES.get(kind, "image.index")

    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        existing = read_manifest(out_dir)
        if existing.get("build", {}).get("signature") == signature and not overwrite:
            shutil.rmtree(os.path.join(out_dir, WORK), ignore_errors=True)  # a crash right after the commit
            logger.info("%s: index already built with these arguments", out_dir)
            return existing
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already holds an index built from other embeddings or arguments "
                                  f"(use add_to_index to extend it, or overwrite=True)")
    os.makedirs(out_dir, exist_ok=True)
    job = _Job(out_dir, signature)
    if use_gpu and _gpu_count() == 0:
        warnings.warn("use_gpu=True but faiss sees no GPU (faiss-gpu not installed or no device): using the CPU",
                      stacklevel=2)
        use_gpu = False
    timings = job.state.setdefault("timings", {})
    index = helper = None

    if job.state["stage"] == "train":
        t0 = time.perf_counter()
        index = new_index(plan.key, dim)
        helper = _GpuHelper(index) if use_gpu else None
        if not index.is_trained:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=plan.train_size, replace=False))
            logger.info("training %s on %d vectors", plan.key, len(rows))
            xt = source.take(rows)
            (helper or index).train(xt)
            del xt
        timings["train_s"] = time.perf_counter() - t0
        job.checkpoint(index, "trained.index", stage="add", rows_done=0, timings=timings)
    exact = plan.key == "Flat"
    held = None if exact or tune_queries is not None else holdout_rows(n, n_tune_queries, seed)
    if job.state["stage"] == "add":
        t0 = time.perf_counter()
        if index is None:
            index = read_index(job.resume_path(job.path("trained.index")))
            helper = _GpuHelper(index) if use_gpu else None
        _populate(job, index, source, first_id=0, batch_rows=rows_per_batch, skip=held,
                  checkpoint_every_s=checkpoint_every_s, helper=helper, progress=progress)
        timings["add_s"] = timings.get("add_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        if exact:
            tuning = {"search_params": "", "recall": 1.0, "k": k, "n_queries": 0, "curve": []}
        else:
            queries = source.take(held) if held is not None else tune_queries
            tuning = tune_index(index, plan.key, source, queries, exclude=held, target_recall=target_recall, k=k,
                                batch_rows=rows_per_batch, progress=progress)
            tuning["queries"] = "held-out collection rows" if held is not None else "tune_queries"
            if held is not None:  # the held-out rows join the index now, under their own ids
                seed_levels(index, n)
                index.add_with_ids(queries, held)
        timings["tune_s"] = time.perf_counter() - t0
        write_index_atomic(index, job.path("final.index"))
        job.save(stage="commit", tuning=tuning, timings=timings)
    tuning = job.state["tuning"]
    size = _index_size(job, out_dir, index_file)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "index_file": index_file,
        "metric": "inner_product",
        "dim": dim,
        "index_key": plan.key,
        "index_choice": asdict(plan),
        "max_index_memory": budget,
        "search_params": tuning["search_params"],
        "tuning": {**{k_: v for k_, v in tuning.items() if k_ != "search_params"}, "target_recall": target_recall},
        "ntotal": n,
        "next_id": n,
        "removed": 0,
        "index_bytes": size,
        "bytes_per_vector": size / n,
        "encoder": encoder,
        "embeddings": [{"source": source.root or "array", "checksum": checksum, "count": n, "first_id": 0}],
        "metadata_files": [],
        "build": {"signature": signature, "timings": timings, "faiss_version": faiss.__version__},
    }
    if overwrite:
        shutil.rmtree(os.path.join(out_dir, "metadata"), ignore_errors=True)
    return _commit(out_dir, job, manifest, parts, 0, 0)


def _check_compatible(manifest: dict, source: EmbeddingSource, encoder_info: Optional[dict], where: str) -> None:
    if source.dim != manifest["dim"]:
        raise IndexMismatchError(f"{where}: index dim is {manifest['dim']} but the new embeddings have dim "
                                 f"{source.dim}")
    enc_new, enc_old = _encoder_of(source, encoder_info), manifest.get("encoder")
    if enc_new and enc_old and enc_new.get("name") != enc_old.get("name"):
        raise IndexMismatchError(f"{where}: index was built with encoder {enc_old.get('name')!r} but the new "
                                 f"embeddings come from {enc_new.get('name')!r}")


def add_to_index(out_dir: str, embeddings, metadata=None, *, kind: str = "img",
                 encoder_info: Optional[dict] = None, checkpoint_every_s: float = 300.0,
                 batch_rows: Optional[int] = None, use_gpu: bool = False, progress: bool = True) -> dict:
    """Append ``embeddings`` (folder or array, same dim and encoder) to an existing index without rebuilding.

    New ids continue after the largest id ever assigned, so ids stay unique and stable (also after removals).
    The tuned search parameters are kept. Resumable like :func:`build_index`; rerunning the add that was
    committed last (same checksum) is a no-op. Returns the updated manifest.
    """
    out_dir = os.fspath(out_dir)
    manifest = read_manifest(out_dir)
    source = EmbeddingSource.open(embeddings, kind)
    _check_compatible(manifest, source, encoder_info, out_dir)
    checksum = source.checksum()
    if manifest["embeddings"] and manifest["embeddings"][-1].get("checksum") == checksum:
        shutil.rmtree(os.path.join(out_dir, WORK), ignore_errors=True)
        logger.info("%s: these embeddings were the last ones added; nothing to do", out_dir)
        return manifest
    parts = _metadata_parts(source, metadata)
    first_id = manifest["next_id"]
    generation = len(manifest["embeddings"])
    rows_per_batch = _batch_rows(source.dim, manifest.get("max_index_memory", parse_memory("4G")), batch_rows)
    signature = _signature(dict(op="add", checksum=checksum, first_id=first_id, batch=rows_per_batch,
                                base=manifest["build"]["signature"], generation=generation))
    job = _Job(out_dir, signature)
    if job.state["stage"] == "train":  # nothing to train when adding
        job.save(stage="add", rows_done=0)
    if job.state["stage"] == "add":
        index = read_index(job.resume_path(os.path.join(out_dir, manifest["index_file"])))
        helper = _GpuHelper(index) if use_gpu and _gpu_count() > 0 else None
        _populate(job, index, source, first_id=first_id, batch_rows=rows_per_batch,
                  checkpoint_every_s=checkpoint_every_s, helper=helper, progress=progress)
        set_search_params(index, manifest.get("search_params", ""))
        write_index_atomic(index, job.path("final.index"))
        job.save(stage="commit", rows_done=source.count)
    new = dict(manifest)
    new["ntotal"] = manifest["ntotal"] + source.count
    new["next_id"] = first_id + source.count
    new["embeddings"] = manifest["embeddings"] + [{"source": source.root or "array", "checksum": checksum,
                                                   "count": source.count, "first_id": first_id}]
    size = _index_size(job, out_dir, manifest["index_file"])
    new.update(index_bytes=size, bytes_per_vector=size / new["ntotal"])
    return _commit(out_dir, job, new, parts, first_id, generation)


def remove_from_index(out_dir: str, ids: Sequence[int]) -> dict:
    """Remove ``ids`` from the index (IVF and Flat indexes; HNSW graphs cannot delete). Ids are never reused;
    their metadata rows stay on disk but are never returned."""
    out_dir = os.fspath(out_dir)
    manifest = read_manifest(out_dir)
    path = os.path.join(out_dir, manifest["index_file"])
    index = read_index(path)
    if not supports_remove(index):
        raise RetrievalError(f"{out_dir}: index {manifest['index_key']} does not support removing ids "
                             f"(HNSW graphs cannot delete); rebuild without those rows")
    ids = np.unique(np.asarray(list(ids), dtype=np.int64))
    removed = int(index.remove_ids(ids))
    write_index_atomic(index, path)
    size = os.path.getsize(path)
    manifest = dict(manifest, ntotal=int(index.ntotal), removed=manifest.get("removed", 0) + removed,
                    index_bytes=size, bytes_per_vector=size / max(index.ntotal, 1))
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def open_index(index_dir: str, *, mmap: bool = False):
    """``(faiss index with the tuned search parameters set, manifest)`` of a finished index folder."""
    index_dir = os.fspath(index_dir)
    manifest = read_manifest(index_dir)
    path = os.path.join(index_dir, manifest["index_file"])
    if not os.path.isfile(path):
        raise RetrievalError(f"{index_dir}: index file {manifest['index_file']} is missing")
    index = read_index(path, mmap=mmap)
    if index.ntotal != manifest["ntotal"] or index.d != manifest["dim"]:
        raise RetrievalError(f"{index_dir}: {manifest['index_file']} holds {index.ntotal}×{index.d} but the "
                             f"manifest says {manifest['ntotal']}×{manifest['dim']} (an add was interrupted: "
                             f"rerun it to finish)")
    set_search_params(index, manifest.get("search_params", ""))
    return index, manifest
