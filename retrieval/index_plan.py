"""Planning an index: parse a faiss ``index_factory`` key, estimate its memory, choose one automatically, and
check before any work that a key can be built from the vectors at hand (one-line ``ValueError`` otherwise)."""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Optional, Union

# Automatic choice (see choose_index_key): below FLAT_MAX vectors exact search is fast enough; up to HNSW_MAX
# an HNSW graph gives the best speed/recall; past it IVF builds an order of magnitude faster on a few cores.
FLAT_MAX = 10_000
HNSW_MAX = 200_000
HNSW_M = 32
PQ_CHOICES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
#: faiss' k-means warns below 39 training points per centroid
MIN_POINTS_PER_CENTROID = 39


def parse_memory(value: Union[str, int, float]) -> int:
    """``'4G'``, ``'512M'``, ``'1.5GB'`` or a byte count → bytes (binary units, as autofaiss); > 0.

    Raises ``ValueError`` naming the value when it is not a size."""
    if isinstance(value, bool):
        raise ValueError(f"max_index_memory: expected a size such as 4G, got {value!r}")
    if isinstance(value, (int, float)):
        if not value >= 1 or value == float("inf"):
            raise ValueError(f"max_index_memory must be > 0 bytes, got {value!r}")
        return int(value)
    from internvit.cli import memory_size

    try:
        return memory_size(str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"max_index_memory: {e}") from None


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
    """The parts of an index_factory string that matter for memory, training and tuning."""
    info = {"pre_dim": None, "nlist": 0, "quantizer_hnsw": 0, "hnsw": 0, "code_bytes": None, "pq": 0,
            "pq_bits": 8, "opq": False}
    for part in str(key).split(","):
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
            info["pq_bits"] = int(m.group(2) or 8)
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


def needs_training(key: str) -> bool:
    p = _parse_key(key)
    return bool(p["nlist"] or p["pq"] or p["opq"] or p["pre_dim"] or isinstance(p["code_bytes"], tuple))


def default_train_size(key: str, n: int, dim: int, max_train_bytes: Optional[int] = None) -> int:
    """Training vectors for ``key``: 50 per inverted list (faiss wants 39…256), ≥ 10k for PQ codebooks;
    capped by ``n`` and by ``max_train_bytes``. 0 for indexes that need no training."""
    p = _parse_key(key)
    if not needs_training(key):
        return 0
    want = max(50 * p["nlist"], 256 * 39 if p["pq"] else 0, 1000)
    if max_train_bytes:
        want = min(want, max(1000, max_train_bytes // (4 * dim)))
    return int(min(n, want))


def minimum_training_vectors(key: str) -> int:
    """The fewest training vectors faiss accepts for ``key``: one per inverted list and ``2**nbits`` per
    (O)PQ codebook (0 when nothing is trained)."""
    p = _parse_key(key)
    need = p["nlist"]
    if p["pq"]:
        need = max(need, 2 ** p["pq_bits"])
    if p["opq"]:
        need = max(need, 256)  # OPQ trains its own 8-bit PQ, whatever the index's PQ uses
    if p["pre_dim"] and not p["opq"]:
        need = max(need, 1)
    return need


def check_index_key(key: str, n: int, dim: int) -> None:
    """Raise ``ValueError`` (one line, with a fix) unless ``key`` can be built over ``n`` vectors of ``dim``:
    faiss accepts the key at ``dim``, there are at least as many (training) vectors as inverted lists and as
    PQ centroids, and HNSW / its coarse quantizer have ``M >= 2``. Runs before anything is read or written."""
    from .faiss_ops import new_index

    key = str(key).strip()
    if not key:
        raise ValueError("index_key is empty")
    index = new_index(key, dim)  # "invalid index_key ..." when faiss cannot build it at this dim
    p = _parse_key(key)
    for name, m in (("HNSW", p["hnsw"]), ("the HNSW coarse quantizer", p["quantizer_hnsw"])):
        if m and m < 2:
            raise ValueError(f"index_key {key!r}: {name} needs M >= 2 links per vertex, got {m}")
    if p["nlist"] and n < p["nlist"]:
        fit = max(1, n // MIN_POINTS_PER_CENTROID)
        alt = f"IVF{fit},Flat" if fit >= 1 and n >= MIN_POINTS_PER_CENTROID else "Flat"
        raise ValueError(f"index_key {key!r}: {p['nlist']} inverted lists need at least {p['nlist']} vectors "
                         f"to train (faiss recommends {MIN_POINTS_PER_CENTROID} per list) but there are only {n}; "
                         f"use {alt} or omit --index-key")
    for what, need in training_needs(index):  # every k-means the faiss object runs when it is trained
        if n >= need:
            continue
        if what.startswith("PQ"):
            bits = int(math.log2(need))
            raise ValueError(f"index_key {key!r}: product quantisation with {bits}-bit codes needs at least "
                             f"{need} training vectors but there are only {n}; use Flat, SQ8 or fewer bits "
                             f"(e.g. PQ{p['pq'] or 4}x4)")
        raise ValueError(f"index_key {key!r}: {what} needs at least {need} training vectors but there are only "
                         f"{n}; use Flat, SQ8, a key without it, or omit --index-key")
    _check_adds_with_ids(index, key, dim)  # last: faiss crashes adding to some keys refused above (HNSW1)


def training_needs(index) -> list[tuple[str, int]]:
    """``(what, fewest training vectors)`` for every k-means that training the fresh faiss ``index`` runs
    (faiss' clustering refuses fewer points than centroids with a C++ assertion): the inverted lists, (O)PQ
    and residual-quantiser codebooks, through pre-transforms, id maps, refinement, HNSW storage and IVF
    encoders. Read from the faiss objects, not the key string, so a component the key names implicitly (the
    8-bit PQ that OPQ trains whatever the index's own PQ uses) is covered."""
    import faiss

    needs: list[tuple[str, int]] = []

    def codebooks(obj, name: str) -> None:
        pq = getattr(obj, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            needs.append((f"PQ{pq.M}x{pq.nbits} ({name})", int(pq.ksub)))
        quantizers = [getattr(obj, "rq", None)]
        prq = getattr(obj, "prq", None)
        if isinstance(prq, faiss.ProductResidualQuantizer):
            quantizers += [faiss.downcast_AdditiveQuantizer(prq.subquantizer(i)) for i in range(prq.nsplits)]
        bits = [max(int(q.nbits.at(i)) for i in range(q.nbits.size()))
                for q in quantizers if isinstance(q, faiss.ResidualQuantizer) and q.nbits.size()]
        if bits:  # residual quantisers run k-means per step (local-search ones need no minimum)
            needs.append((f"the residual quantiser of {name} ({max(bits)}-bit codebooks)", 2 ** max(bits)))

    def visit(ix) -> None:
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexPreTransform):
            for i in range(ix.chain.size()):
                vt = faiss.downcast_VectorTransform(ix.chain.at(i))
                if isinstance(vt, faiss.OPQMatrix) and not vt.is_trained:
                    bits = vt.pq.nbits if vt.pq is not None else 8  # faiss' OPQMatrix::train default: 8 bits
                    needs.append((f"the OPQ{vt.M} rotation (it trains {bits}-bit PQ codebooks)", 2 ** bits))
                elif isinstance(vt, faiss.PCAMatrix) and not vt.is_trained:  # n points give n components
                    needs.append((f"the PCA to {vt.d_out} dimensions", int(min(vt.d_out, vt.d_in))))
            visit(ix.index)
        elif isinstance(ix, faiss.IndexIVF):
            if not ix.is_trained:
                needs.append((f"{ix.nlist} inverted lists", int(ix.nlist)))
            visit(ix.quantizer)
            codebooks(ix, "the inverted lists' codes")
        elif isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            visit(ix.index)
        elif isinstance(ix, faiss.IndexRefine):
            visit(ix.base_index)
            visit(ix.refine_index)
        elif isinstance(ix, faiss.IndexHNSW):
            visit(ix.storage)
        else:
            codebooks(ix, type(ix).__name__)

    visit(index)
    return needs


def _check_adds_with_ids(index, key: str, dim: int) -> None:
    """``ValueError`` unless ``index`` (fresh from :func:`~retrieval.faiss_ops.new_index`) takes vectors with
    ids, as every build and add does: a key that faiss builds but cannot fill (an id map that only accepts
    plain adds, say) would otherwise fail mid-build with a raw faiss message. An index that needs training is
    not probed (it cannot add before training); its ids are the IVF's own or those of the id map that
    :func:`~retrieval.faiss_ops.new_index` keeps or adds."""
    import numpy as np

    from .faiss_ops import _faiss_message

    if not index.is_trained:
        return
    x = np.zeros((1, dim), dtype=np.float32)
    x[0, 0] = 1.0
    try:
        index.add_with_ids(x, np.zeros(1, dtype=np.int64))
    except RuntimeError as e:
        raise ValueError(f"index_key {key!r}: faiss builds this index but cannot add vectors with ids to it "
                         f"({_faiss_message(e)}); omit the id map from the key (ids are added for you)") from None


def choose_index_key(n: int, dim: int, max_index_memory: Union[str, int] = "4G") -> IndexPlan:
    """Pick an ``index_factory`` key for ``n`` vectors of ``dim`` under a memory budget.

    Flat (< 10k vectors, exact) → ``HNSW32`` (< 200k, M lowered to fit) → ``IVF{K},Flat`` (K from
    :func:`default_nlist`, HNSW coarse quantizer from 1M vectors) → when raw vectors do not fit:
    ``IVF{K},PQ{m}`` with the largest ``m`` that fits, rotated by OPQ when each sub-quantizer spans ≥ 8 dims
    (high compression, where OPQ's balancing pays). Raises ``ValueError`` when even the smallest fits not.
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
    nlist = min(default_nlist(n), max(16, n // MIN_POINTS_PER_CENTROID))
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


def plan_index(n: int, dim: int, index_key: Optional[str] = None, max_index_memory: Union[str, int] = "4G"
               ) -> IndexPlan:
    """The plan for ``n`` (trainable) vectors: :func:`choose_index_key`, or ``index_key`` checked by
    :func:`check_index_key`. All ``ValueError`` one-liners, raised before any work."""
    budget = parse_memory(max_index_memory)
    if index_key is None:
        return choose_index_key(n, dim, budget)
    check_index_key(index_key, n, dim)
    return IndexPlan(index_key, estimate_index_bytes(index_key, n, dim),
                     default_train_size(index_key, n, dim, budget // 4), "explicit index_key")
