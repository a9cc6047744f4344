"""The one place retrieval imports faiss, and the small faiss operations the index modules share.

faiss's loader logs which SIMD build it tried ("Could not load library with AVX512 support ...") at import;
that notice is about faiss's packaging, not the user's input, so :func:`faiss_module` silences the
``faiss.loader`` logger around the import.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Optional

import numpy as np

_FAISS = None


class RetrievalError(RuntimeError):
    """An index folder that cannot be used: missing, half-written, corrupt, or an unsupported operation."""


class IndexMismatchError(RetrievalError):
    """The index and the query encoder / new embeddings disagree (model, dimension or kind)."""


def faiss_module():
    """``import faiss`` with its loader's SIMD notices silenced; ``ImportError`` says how to install it."""
    global _FAISS
    if _FAISS is None:
        loader = logging.getLogger("faiss.loader")
        level, propagate = loader.level, loader.propagate
        loader.setLevel(logging.ERROR)
        loader.propagate = False
        try:
            import faiss
        except ImportError as e:  # pragma: no cover - faiss is a declared extra
            raise ImportError("retrieval needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
        finally:
            loader.setLevel(level)
            loader.propagate = propagate
        _FAISS = faiss
    return _FAISS


def new_index(key: str, dim: int):
    """An empty inner-product index for ``key``, with sequential-id support (IVF natively, others IDMap).

    Raises ``ValueError`` naming the key when faiss cannot build it at ``dim``."""
    faiss = faiss_module()
    try:
        index = faiss.index_factory(int(dim), str(key), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid index_key {key!r} for dim {dim}: {_faiss_message(e)}") from None
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False  # search never uses Hamming thresholds; this training is slow
    return index if _native_ids(index) or _has_id_map(index) else faiss.IndexIDMap(index)


def _has_id_map(index) -> bool:
    """Whether ``index`` already holds an id map that ``add_with_ids`` reaches (a key such as ``IDMap,Flat`` or
    ``PCA8,IDMap2,Flat``): wrapping it in another would make the outer map call the inner one's plain ``add``,
    which faiss refuses."""
    faiss = faiss_module()
    return any(isinstance(layer, faiss.IndexIDMap) for layer in _layers(index))


#: up to this many lists an add assigns vectors by brute force over the centroids; beyond, through the HNSW
#: quantizer at efSearch >= :data:`ADD_EF_SEARCH` (at 2**17 lists both cost about the same, measured below)
EXACT_ASSIGN_MAX_NLIST = 1 << 17
ADD_EF_SEARCH = 128


def add_vectors(index, x: np.ndarray, ids: np.ndarray) -> None:
    """``index.add_with_ids(x, ids)``, with every vector of an IVF index put in its nearest list.

    An IVF whose coarse quantizer is HNSW (``IVF{K}_HNSW32,...``, chosen from 16,384 lists) would assign
    added vectors with the quantizer's approximate search at its stored ``efSearch`` (faiss's default 16).
    Measured on 10M x 256 clustered vectors with 16,384 lists (2 cores): at efSearch 16 only 51 % of the vectors
    land in their nearest list (10.1k vectors/s), 82 % at 64 (3.1k/s), 93 % at 128 (1.7k/s), 98 % at 256
    (1.0k/s); a vector filed far from its nearest list is lost to every search, whatever ``nprobe``. A
    brute-force assignment over the centroids (the HNSW index's own flat ``storage``, BLAS-batched) is exact
    and ran at 10.2k vectors/s, and its cost grows with K where HNSW's does not: so up to
    :data:`EXACT_ASSIGN_MAX_NLIST` lists the add is exact (no slower than HNSW at efSearch 128), beyond it goes
    through HNSW at efSearch >= :data:`ADD_EF_SEARCH`. Searches keep the HNSW quantizer and its own efSearch.
    x: (n, d) float32; ids: (n,) int64."""
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    hnsw = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if not isinstance(hnsw, faiss.IndexHNSW):
        index.add_with_ids(x, ids)
        return
    if ivf.nlist > EXACT_ASSIGN_MAX_NLIST:
        ef = hnsw.hnsw.efSearch
        hnsw.hnsw.efSearch = max(ef, ADD_EF_SEARCH)
        try:
            index.add_with_ids(x, ids)
        finally:
            hnsw.hnsw.efSearch = ef
        return
    own = ivf.own_fields
    ivf.own_fields = False  # the swap below must never free the HNSW quantizer
    ivf.quantizer = hnsw.storage
    try:
        index.add_with_ids(x, ids)
    finally:
        ivf.quantizer = hnsw
        ivf.own_fields = own


def _native_ids(index) -> bool:
    """Whether ``index`` stores given ids itself: an IVF, bare or under pre-transforms only."""
    faiss = faiss_module()
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVF):
            return True
        if not isinstance(layer, faiss.IndexPreTransform):
            return False
    return False


def _faiss_message(e: BaseException) -> str:
    """The useful part of a faiss C++ exception (``Error in ... at file:line: message`` → ``message``)."""
    text = " ".join(str(e).split())
    m = re.search(r"(?:Error: )?'[^']*' failed: (.*)$", text) or re.search(r"\.cpp:\d+: (.*)$", text)
    return (m.group(1) if m else text).strip()


def serialize(index) -> bytes:
    return faiss_module().serialize_index(index).tobytes()


def deserialize(data: bytes, where: str = "index"):
    """An index from its serialized bytes; ``RetrievalError`` (one line) when they are not a faiss index."""
    faiss = faiss_module()
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise RetrievalError(f"{where}: not a readable faiss index, truncated or corrupt "
                             f"({_faiss_message(e)[:120]})") from None


def read_index(path: str, mmap: bool = False):
    """Read an index file; ``RetrievalError`` (one line) when it is truncated or not a faiss index."""
    faiss = faiss_module()
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:
        raise RetrievalError(f"{path}: not a readable faiss index, truncated or corrupt "
                             f"({_faiss_message(e)[:120]})") from None


def write_index(index, path: str) -> None:
    """Write ``index`` to the file ``path``, fsynced; ``OSError`` when it cannot be written whole.

    The bytes go through a Python file (``faiss.PyCallbackIOWriter``): faiss' own file writer reports a failed
    final ``fclose`` (the last buffered block not written: a full disk) only as a line on stderr and returns
    normally, so a short index file was committed as complete and the index could not be opened again."""
    faiss = faiss_module()
    with open(path, "wb") as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        try:
            faiss.write_index(index, writer)
        finally:
            del writer
        f.flush()
        os.fsync(f.fileno())


def index_bytes(index) -> int:
    """Serialized size of an index (what it occupies on disk, close to its RAM)."""
    return int(faiss_module().serialize_index(index).nbytes)


def _layers(index):
    """``index`` and the indexes it wraps (IDMap, pre-transforms, refinement), outermost first."""
    faiss = faiss_module()
    inner = faiss.downcast_index(index)
    while inner is not None:
        yield inner
        if isinstance(inner, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, faiss.IndexRefine):
            inner = faiss.downcast_index(inner.base_index)
        else:
            inner = None


def search_param_names(index) -> list[str]:
    """The search parameters ``index`` accepts (``nprobe``, ``efSearch``, ``quantizer_efSearch``, ...)."""
    faiss = faiss_module()
    names = []
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexRefine):
            names.append("k_factor_rf")  # faiss's name for IndexRefine's k_factor ("k_factor" is IVFPQR's)
        if isinstance(layer, faiss.IndexIVFPQR):
            names.append("k_factor")
        if isinstance(layer, faiss.IndexIVF):
            names += ["nprobe", "max_codes"]
            if hnsw_of(layer.quantizer) is not None:
                names.append("quantizer_efSearch")
        if getattr(layer, "hnsw", None) is not None:
            names.append("efSearch")
    return names


#: the C++ type behind each search parameter, as ``ParameterSpace.set_index_parameter`` stores it: ``int``
#: (``nprobe``, ``efSearch``, the quantizer's ``efSearch``, IndexRefine's ``k_factor_rf``), ``float``
#: (IndexIVFPQR's ``k_factor``) or ``size_t`` from a ``double`` (``max_codes``, 0 = no limit). A value beyond
#: the type's range would wrap (``efSearch=4294967297`` became 1), so it is refused instead.
INT_MAX = 2**31 - 1
SEARCH_PARAM_RANGES = {
    "nprobe": (1, INT_MAX, "int"),
    "efSearch": (1, INT_MAX, "int"),
    "quantizer_efSearch": (1, INT_MAX, "int"),
    "k_factor_rf": (1, INT_MAX, "int"),
    "k_factor": (1, 2**24, "float, exact integers up to 2**24"),
    "max_codes": (0, 2**53, "size_t set through a double, exact up to 2**53"),
}


def _param_value(text: str) -> Optional[int]:
    """An integer written as ``64`` or ``64.0`` / ``1e3`` (exact: big values are parsed as integers, not
    through a double); ``None`` when it is not one."""
    text = text.strip()
    try:
        return int(text, 10)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        return None
    return int(v) if math.isfinite(v) and v == int(v) else None


def check_search_params(index, params: str) -> str:
    """Validate a ``name=value,...`` string against ``index``; ``ValueError`` naming the bad part: a parameter
    the index does not have or that is given twice, a value that is not an integer, or one outside the range
    of the C++ field faiss stores it in (:data:`SEARCH_PARAM_RANGES`). The one validator behind
    ``Retriever.load(search_params=)``, ``tools/search.py --params``, ``tools/eval_retrieval.py --params`` and
    the tuned parameters of a manifest."""
    params = (params or "").strip()
    if not params:
        return ""
    allowed = search_param_names(index)
    seen = set()
    for part in params.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"search params {params!r}: expected name=value[,name=value...], got {part!r}")
        if name in seen:  # faiss would apply both, the last one winning without a word
            raise ValueError(f"search params {params!r}: {name} is given twice; give each parameter once")
        seen.add(name)
        if name not in allowed:
            hint = ", ".join(allowed) if allowed else "none: it is searched exhaustively"
            raise ValueError(f"search params {params!r}: this index does not have {name!r} (it accepts {hint})")
        v = _param_value(value)
        low, high, ctype = SEARCH_PARAM_RANGES.get(name, (1, INT_MAX, "int"))
        if v is None:
            try:
                float(value)
            except ValueError:
                raise ValueError(f"search params {params!r}: {name} must be a number, got {value!r}") from None
            raise ValueError(f"search params {params!r}: {name} must be an integer, got {value.strip()!r}")
        if not low <= v <= high:
            raise ValueError(f"search params {params!r}: {name} must be an integer from {low} to {high} "
                             f"(faiss stores it as {ctype}), got {value.strip()}")
    return params


def set_search_params(index, params: str) -> None:
    """Apply ``'nprobe=16'`` / ``'efSearch=64'`` style parameters (validated: ``ValueError`` names a bad one)."""
    params = check_search_params(index, params)
    if params:
        faiss_module().ParameterSpace().set_index_parameters(index, params)


def hnsw_of(index):
    """The ``HNSW`` structure of an HNSW index (under an IDMap / pre-transform), else ``None``."""
    return next((layer.hnsw for layer in _layers(index) if getattr(layer, "hnsw", None) is not None), None)


def seed_levels(index, value: int) -> None:
    """Reseed the HNSW level generator from the first id of a batch: faiss does not save that generator, so
    without this a resumed build would draw other levels than an uninterrupted one."""
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.rng = faiss_module().RandomGenerator(int(value) % (2**31 - 1))


def supports_remove(index) -> bool:
    """IVF indexes (bare or under pre-transforms) and Flat indexes under an id map can remove ids."""
    faiss = faiss_module()
    if _native_ids(index):
        return True
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        return isinstance(faiss.downcast_index(inner.index), faiss.IndexFlat)
    return isinstance(inner, faiss.IndexFlat)


#: the largest id faiss can hold (``idx_t`` is int64); a folder's global ids ``id_offset + i`` must stay below it
MAX_ID = 2**63 - 1


def as_ids(ids, what: str = "ids") -> np.ndarray:
    """``ids`` (one id, or a sequence / array of them) as a 1-d int64 array, checked: every element must be an
    integer (Python ``int`` or a numpy integer; not ``bool``, ``float`` such as ``1.5`` or ``1.0``, ``str`` or
    ``None``) within int64. ``ValueError('ids must be integers ...')`` otherwise: a lossy
    ``np.asarray(ids, np.int64)`` would turn ``1.5`` and ``True`` into id 1 and act on another id."""
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integers, got an array of {ids.dtype}")
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) > MAX_ID:
            raise ValueError(f"{what} must be integers from {-MAX_ID - 1} to {MAX_ID}, got {int(ids.max())}")
        return ids.astype(np.int64).reshape(-1)
    items = [ids] if isinstance(ids, (str, bytes, int, np.integer, float, np.floating, bool, np.bool_)) \
        or ids is None or not hasattr(ids, "__iter__") else list(ids)
    out = []
    for v in items:
        if isinstance(v, np.ndarray) and v.ndim == 0:
            v = v[()]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{what} must be integers, got {v!r}")
        if not -MAX_ID - 1 <= int(v) <= MAX_ID:
            raise ValueError(f"{what} must be integers from {-MAX_ID - 1} to {MAX_ID}, got {int(v)}")
        out.append(int(v))
    return np.array(out, dtype=np.int64)


def as_id(id_, what: str = "id") -> int:
    """One id as an ``int``, checked like :func:`as_ids` (``ValueError`` for ``1.5``, ``True``, ``'3'``, beyond
    int64)."""
    if isinstance(id_, np.ndarray) and id_.ndim == 0:
        id_ = id_[()]
    if isinstance(id_, (bool, np.bool_)) or not isinstance(id_, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {id_!r}")
    if not -MAX_ID - 1 <= int(id_) <= MAX_ID:
        raise ValueError(f"{what} must be an integer from {-MAX_ID - 1} to {MAX_ID} (int64), got {int(id_)}")
    return int(id_)


def stored_ids(index) -> np.ndarray:
    """Every id ``index`` holds (sorted int64): from the id map, or from the inverted lists
    (``faiss.contrib.inspect_tools.get_invlist``). ``None`` for index types that keep no ids."""
    faiss = faiss_module()
    from faiss.contrib.inspect_tools import get_invlist

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        return np.sort(faiss.vector_to_array(inner.id_map).astype(np.int64))
    if _native_ids(index):
        ivf = faiss.try_extract_index_ivf(index)
        parts = [get_invlist(ivf.invlists, lst)[0] for lst in range(ivf.nlist)]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return None


def gpu_count() -> int:
    faiss = faiss_module()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _pretransforms(index) -> tuple[list, object]:
    """``(the IndexPreTransform wrappers of index, outermost first; the index they wrap)``."""
    faiss = faiss_module()
    wrappers, inner = [], faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        wrappers.append(inner)
        inner = faiss.downcast_index(inner.index)
    return wrappers, inner


class GpuHelper:
    """Train IVF k-means and assign vectors to lists on the GPU(s); the index itself stays a CPU index.

    Vectors are added with :func:`faiss.contrib.ivf_tools.add_preassigned` straight into the IVF (also under
    OPQ / PCA pre-transforms, whose ``ntotal`` is kept in step); other indexes add through themselves."""

    def __init__(self, index) -> None:
        faiss = faiss_module()
        self.faiss = faiss
        self.ivf = faiss.try_extract_index_ivf(index)
        self.index = index
        self._assigner = None
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
        from faiss.contrib.ivf_tools import add_preassigned

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
        _, assign = self._assigner.search(xt, 1)
        add_preassigned(ivf, xt, np.ascontiguousarray(assign.ravel(), dtype=np.int64),
                        np.ascontiguousarray(ids, dtype=np.int64))
        for w in self._wrappers:  # add_core bypasses the wrappers' ntotal
            w.ntotal = ivf.ntotal


def maybe_gpu(index, use_gpu: bool) -> Optional[GpuHelper]:
    return GpuHelper(index) if use_gpu and gpu_count() > 0 else None
