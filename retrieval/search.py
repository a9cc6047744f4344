"""Search a built index by text, image or embedding: :class:`Retriever`."""
from __future__ import annotations

import bisect
import numbers
import os
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from internvit.file_reads import first_line

from .faiss_ops import IndexMismatchError, RetrievalError, as_id, as_ids, faiss_module, set_search_params, stored_ids
from .index_folder import id_range, open_index


@dataclass
class SearchResult:
    """Top-``k`` hits per query: ``ids`` / ``scores`` ``(Q, k)`` (id -1 = no hit) and ``rows[q]``, the
    metadata dicts of the hits (``id``, ``score`` and the stored columns: ``path``, ``caption``, ...)."""

    ids: np.ndarray
    scores: np.ndarray
    rows: list[list[dict]] = field(default_factory=list)
    queries: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def to_records(self) -> list[dict]:
        """Flat list of ``{'query', 'rank', 'id', 'score', ...metadata}``."""
        out = []
        for q, hits in enumerate(self.rows):
            for rank, row in enumerate(hits, 1):
                label = self.queries[q] if q < len(self.queries) else q
                # a metadata column of an index built before such columns were refused (index_source.RESULT_FIELDS)
                # never replaces the hit's own query and rank
                out.append(dict({"query": label, "rank": rank, **row}, query=label, rank=rank))
        return out


_KINDS = {"i": "integers", "u": "unsigned integers", "b": "booleans", "c": "complex numbers"}


def check_query_dtype(embeddings, source: Optional[str] = None) -> np.ndarray:
    """The one rule for query vectors' values (the search CLI's ``--embedding`` file, ``Retriever`` and
    ``index_quality`` queries): floating point of any width (float16/32/64, a float torch tensor), returned as
    float32. Refused with a ``ValueError`` naming ``source`` (a file; else "query embeddings") and the dtype:
    integers or booleans (ids or labels saved by mistake would be searched as directions), complex numbers
    (the imaginary part would be dropped), strings / objects, and NaN or infinity (also values beyond float32's
    range, which become infinity)."""
    where = f"{os.fspath(source)}: " if source is not None else ""
    if hasattr(embeddings, "detach") and callable(getattr(embeddings, "is_floating_point", None)) \
            and embeddings.is_floating_point():
        embeddings = embeddings.detach().float().cpu().numpy()  # bf16 has no numpy dtype
    try:
        q = np.asarray(embeddings)
    except (ValueError, TypeError) as e:  # ragged lists
        raise ValueError(f"{where}query embeddings are not an array of numbers ({first_line(e)[:80]})") from None
    if q.dtype.kind not in "fiucb":
        raise ValueError(f"{where}not an {'.npy ' if source is not None else ''}array of query vectors (it holds "
                         f"{q.dtype} values, not numbers)")
    if q.dtype.kind != "f":
        what = _KINDS.get(q.dtype.kind, "values")
        hint = {"i": "; if they really are vectors, convert them with .astype('float32')",
                "u": "; if they really are vectors, convert them with .astype('float32')",
                "c": ": the imaginary part would be dropped"}.get(q.dtype.kind, "")
        raise ValueError(f"{where}query embeddings must be floating-point numbers, got {q.dtype} ({what}){hint}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = q.astype(np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0]) if out.ndim else 0
        cause = "values beyond float32's range" if np.isfinite(q).all() else "NaN or inf"
        raise ValueError(f"{where}query embeddings contain {cause} ({q.dtype}, row {row})")
    return out


class _Queries:
    """What every searcher shares: query validation, text / image encoding and the result rows. A subclass
    provides ``manifest``, ``encoder``, ``metadata_rows(ids)`` and ``_search(q, k) -> (scores, ids)``."""

    manifest: dict

    def _prepare(self, embeddings, k) -> tuple[np.ndarray, int]:
        """``(Q, D)`` float32 contiguous queries (L2-normalised when the index was) and ``k`` as an int.

        Raises ``ValueError`` for an empty, non-finite or all-zero query or ``k < 1``,
        :class:`IndexMismatchError` for another dim."""
        q = check_query_dtype(embeddings)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[0] == 0:
            raise ValueError(f"query embeddings must be a non-empty (Q, D) array, got shape {q.shape}")
        dim = self.manifest["dim"]
        if q.shape[1] != dim:
            raise IndexMismatchError(f"{self.index_dir}: query dim {q.shape[1]} != index dim {dim}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms == 0).any():  # every score would be 0 (inner product) or the ranking its distance to 0 (L2)
            raise ValueError("a query embedding is all zeros: it has no direction to search for")
        if self.manifest.get("normalize"):
            q = q / norms
        # faiss pads a list beyond the index's vectors with -1: never ask for more than there are, so memory is
        # bounded by the index (k=10**9 on 30 vectors returns 30 results, not a (Q, 10**9) array)
        total = getattr(self, "ntotal", None)
        k = int(k) if total is None else min(int(k), int(total))  # 0 for an index emptied by removals
        return np.ascontiguousarray(q, dtype=np.float32), k

    def search_embedding(self, embeddings, k: int = 10, *, queries: Optional[list] = None) -> SearchResult:
        """Nearest ids of ``(Q, D)`` (or ``(D,)``) float query vectors: ``ids`` / ``scores`` ``(Q, k')`` with
        ``k' = min(k, vectors in the index)`` (id -1 = fewer hits than that, e.g. an IVF search that probed too few
        lists) and the hits' metadata rows. ``k`` is an integer >= 1 (not a float or bool).

        When the index normalised its vectors at build time (manifest ``normalize``), queries are L2-normalised
        too. Raises ``ValueError`` for an empty, non-finite or all-zero query or ``k < 1``,
        :class:`IndexMismatchError` for another dim."""
        q, k = self._prepare(embeddings, k)
        if k == 0:  # nothing to find (faiss would answer one id -1 per query)
            scores, ids = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        else:
            scores, ids = self._search(q, k)
        meta = self.metadata_rows(ids[ids >= 0])
        rows = [[dict(meta[int(i)], id=int(i), score=float(s)) for i, s in zip(id_row, s_row) if i >= 0]
                for id_row, s_row in zip(ids, scores)]
        return SearchResult(ids=ids, scores=scores, rows=rows, queries=list(queries or range(len(q))))

    def search_text(self, texts: Union[str, Sequence[str]], k: int = 10) -> SearchResult:
        """Text queries (text → image over an image index, text → text over a caption index), encoded once.
        Raises ``ValueError`` for an empty text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("empty text query")
        return self.search_embedding(self.encoder.encode_texts(texts), k, queries=texts)

    def search_image(self, images, k: int = 10) -> SearchResult:
        """Image queries: paths (or PIL images), read through the encoder's preprocessing, encoded once
        (image → image over an image index, image → text over a caption index). Raises ``FileNotFoundError``
        for a missing path, ``ValueError`` for an empty list."""
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("empty image query")
        for p in images:
            if isinstance(p, (str, os.PathLike)) and not os.path.isfile(p):
                raise FileNotFoundError(f"{os.fspath(p)}: no such image file")
        res = self.encoder.embed_images(images, strict=True)
        labels = [os.fspath(p) if isinstance(p, (str, os.PathLike)) else f"image[{i}]" for i, p in enumerate(images)]
        return self.search_embedding(res.features, k, queries=labels)


class Retriever(_Queries):
    """A loaded index folder plus (lazily) the encoder it was built with.

    Ids are global everywhere (results, :meth:`metadata`, :meth:`metadata_rows`, :meth:`stored_vector`): a
    folder's local id ``i`` (its row number in the faiss index and metadata) is the global id
    ``id_offset + i``, with ``id_offset`` from the manifest (0 unless set with ``--id-offset`` /
    :func:`~retrieval.sharded.set_id_offset`). :meth:`_search` and :meth:`_local` are the one place the offset
    is applied; a :class:`~retrieval.sharded.ShardedRetriever` only routes global ids to its folders.

    >>> r = Retriever.load("index/")
    >>> res = r.search_text(["a dog on a beach"], k=5)
    >>> res.rows[0][0]["path"], res.scores[0, 0]
    """

    def __init__(self, index, manifest: dict, index_dir: str, encoder=None, *, device=None, dtype=None,
                 tokenizer: Optional[str] = None) -> None:
        self.index = index
        self.manifest = manifest
        self.index_dir = index_dir
        self.id_offset, self.id_end = id_range(manifest, index_dir)
        self.device, self.dtype, self.tokenizer = device, dtype, tokenizer
        self._encoder = encoder
        self._tables: dict[str, object] = {}
        files = sorted(manifest.get("metadata_files", []), key=lambda e: e["first_id"])
        self._meta_starts = [e["first_id"] for e in files]
        self._meta_files = files
        self._present: Optional[np.ndarray] = None  # sorted local ids in the index, when some rows are not
        self._id_pos: Optional[tuple] = None  # (sorted ids, positions) of an id map, for stored_vector
        self._lock = threading.Lock()
        if encoder is not None:
            encoder.check_compatible(manifest, index_dir)

    @classmethod
    def load(cls, index_dir: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], encoder=None, *,
             device=None, dtype=None, tokenizer: Optional[str] = None, mmap: bool = False,
             search_params: Optional[str] = None) -> "Retriever":
        """Open ``index_dir``. ``encoder``: an :class:`~retrieval.encoders.Encoder` (checked against the
        manifest: same model and dim, else :class:`IndexMismatchError`), or ``None`` to rebuild the recorded
        one on the first text / image query, in the recorded dtype and device unless ``dtype`` / ``device``
        are given (a recorded ``cuda`` falls back to the CPU where there is none); ``tokenizer`` overrides the
        recorded tokenizer. ``search_params`` overrides the tuned ones (e.g. ``'nprobe=64'``; a parameter the
        index does not have, or a bad value, raises ``ValueError``). ``mmap`` maps the index file instead of
        reading it (IVF indexes). Raises :class:`RetrievalError` (one line) for a missing, unfinished,
        truncated or corrupt index folder (index file or metadata), or a recorded ``id_offset`` out of range.

        A list of folders opens them as one collection (:class:`~retrieval.sharded.ShardedRetriever`: global
        ids from each manifest's ``id_offset``, results merged by score)."""
        if isinstance(index_dir, (list, tuple)):
            from .sharded import ShardedRetriever

            return ShardedRetriever.load(index_dir, encoder, device=device, dtype=dtype, tokenizer=tokenizer,
                                         mmap=mmap, search_params=search_params)
        index_dir = os.fspath(index_dir)
        index, manifest = open_index(index_dir, mmap=mmap)
        if search_params:
            set_search_params(index, search_params)
        return cls(index, manifest, index_dir, encoder, device=device, dtype=dtype, tokenizer=tokenizer)

    # -- encoder ------------------------------------------------------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            from .encoders import encoder_from_info

            enc = encoder_from_info(self.manifest.get("encoder") or {}, device=self.device, dtype=self.dtype,
                                    tokenizer=self.tokenizer)
            enc.check_compatible(self.manifest, self.index_dir)
            self._encoder = enc
        return self._encoder

    # -- ids ----------------------------------------------------------------------------------------------
    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of the index, as global ids (-1 = no hit)."""
        scores, ids = self.index.search(q, k)
        if self.id_offset:
            ids = np.where(ids >= 0, ids + self.id_offset, -1)
        return scores, ids

    def _local(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(local ids, held)`` of global int64 ids: ``held`` is False where the id is outside this folder's
        range, or its row is not in the index (removed, or a skipped empty caption)."""
        local = ids - self.id_offset if self.id_offset else ids.copy()
        inside = (ids >= self.id_offset) & (local < self.id_end - self.id_offset)
        present = self._present_ids()
        if present is not None and len(present):
            inside &= present[np.minimum(np.searchsorted(present, local), len(present) - 1)] == local
        elif present is not None:
            inside[:] = False
        return local, inside

    def _present_ids(self) -> Optional[np.ndarray]:
        """Sorted local ids the index holds, when that is not every id below ``next_id`` (rows removed or
        skipped); ``None`` when it is. Read once from the index (its id map or inverted lists)."""
        m = self.manifest
        if not int(m.get("removed", 0)) and int(m.get("ntotal", 0)) == int(m["next_id"]):
            return None
        with self._lock:
            if self._present is None:
                ids = stored_ids(self.index)  # None: an index type that keeps no ids (every row counts)
                self._present = np.arange(int(m["next_id"]), dtype=np.int64) if ids is None else ids
            return self._present

    def holds(self, id_: int) -> bool:
        """Whether the global id ``id_`` is in the index (assigned here, neither removed nor skipped)."""
        return bool(self._local(np.array([as_id(id_)], np.int64))[1][0])

    def stored_vector(self, id_: int) -> np.ndarray:
        """The indexed vector of the global id ``id_`` ``(D,)`` float32 (search by id), reconstructed from the
        index (exact for Flat / HNSW storage, the decoded code for PQ / SQ). ``KeyError`` for an id the folder
        does not hold (outside its range, removed, skipped), ``ValueError`` for a non-integer id."""
        id_ = as_id(id_)
        local, held = self._local(np.array([id_], np.int64))
        if not held[0]:
            raise KeyError(id_)
        local = int(local[0])
        faiss = faiss_module()
        top = faiss.downcast_index(self.index)
        with self._lock:
            if isinstance(top, faiss.IndexIDMap):
                if self._id_pos is None:
                    ids = faiss.vector_to_array(top.id_map)
                    order = np.argsort(ids, kind="stable")
                    self._id_pos = (ids[order], order)
                ids, order = self._id_pos
                j = int(np.searchsorted(ids, local))
                if j >= len(ids) or ids[j] != local:
                    raise KeyError(id_)
                return np.asarray(faiss.downcast_index(top.index).reconstruct(int(order[j])), np.float32)
            ivf = faiss.try_extract_index_ivf(self.index)
            if ivf is not None and ivf.direct_map.type != faiss.DirectMap.Hashtable:
                # a hash table: removals leave gaps in the ids (make_direct_map(True) is an *array* map, which
                # faiss refuses for non-sequential ids, and a failed one stayed set: every id then read as absent)
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            try:
                return np.asarray(self.index.reconstruct(local), np.float32)
            except RuntimeError as e:  # the id is held (checked above): the index failed, not a missing id
                raise RetrievalError(f"{self.index_dir}: cannot reconstruct the stored vector of id {id_} "
                                     f"({first_line(e)})") from None

    # -- metadata -----------------------------------------------------------------------------------------
    def _table(self, entry: dict):
        t = self._tables.get(entry["file"])
        if t is None:
            import pyarrow.parquet as pq

            path = os.path.join(self.index_dir, entry["file"])
            if not os.path.isfile(path):
                raise RetrievalError(f"{self.index_dir}: metadata file {entry['file']} is missing")
            t = self._tables[entry["file"]] = pq.read_table(path, memory_map=True)
        return t

    def open_metadata(self) -> None:
        """Open every metadata file of the loaded commit now (a server does, so a later commit that retires
        files cannot break lookups in this state)."""
        for entry in self._meta_files:
            self._table(entry)

    def metadata(self, id_: int) -> dict:
        """The stored metadata row of a global id: at least ``{'id': id}`` for an id the index holds (rows added
        without metadata have nothing else), an empty dict when the index does not hold it (never assigned
        here, removed, or a skipped empty caption); ``ValueError`` for a non-integer id."""
        return self.metadata_rows(np.array([as_id(id_)], np.int64))[int(id_)]

    def metadata_rows(self, ids) -> dict:
        """``{global id: metadata row}`` for many ids at once (``{'id': id}`` at least for an id the index holds,
        an empty dict for one it does not): one ``take`` per metadata file (what a search needs). ``ValueError``
        for non-integer ids."""
        wanted = np.unique(as_ids(ids))
        local, held = self._local(wanted)
        out: dict = {int(i): ({"id": int(i)} if h else {}) for i, h in zip(wanted, held)}
        by_file: dict = {}
        for g, id_ in zip(wanted[held].tolist(), local[held].tolist()):
            j = bisect.bisect_right(self._meta_starts, id_) - 1
            if j >= 0 and id_ < self._meta_files[j]["first_id"] + self._meta_files[j]["count"]:
                by_file.setdefault(j, []).append((g, id_))
        for j, group in by_file.items():
            entry = self._meta_files[j]
            rows = self._table(entry).take([i - entry["first_id"] for _, i in group]).to_pylist()
            out.update((g, dict(row, id=g) if "id" in row else row) for (g, _), row in zip(group, rows))
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Retriever({self.index_dir!r}, {m['index_key']}, ntotal={m['ntotal']}, dim={m['dim']}, "
                f"params={m.get('search_params')!r})")


#: characters that would break a table row (line breaks of str.splitlines, tabs, other controls), escaped
_CELL_ESCAPES = {**{c: f"\\x{c:02x}" for c in range(32)}, 0x7f: "\\x7f", ord("\n"): "\\n", ord("\r"): "\\r",
                 ord("\t"): "\\t", 0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029", ord("\\"): "\\\\"}


def _cell(value) -> str:
    """``value`` as one table cell: newlines and other control characters escaped (``\\n``), so a caption
    spanning lines stays on its row."""
    return str(value).translate(_CELL_ESCAPES)


def format_table(result: SearchResult, columns: Sequence[str] = ("path", "caption"), width: int = 60) -> str:
    """A plain-text table of a :class:`SearchResult` (what ``tools/search.py`` prints): one line per hit, with
    line breaks and other control characters inside cells (and query labels) escaped."""
    lines = []
    for q, hits in enumerate(result.rows):
        label = result.queries[q] if q < len(result.queries) else q
        lines.append(f"query {q}: {_cell(label)}")
        present = [c for c in columns if any(c in h and h[c] not in (None, "") for h in hits)]
        lines.append("  " + "  ".join([f"{'rank':>4}", f"{'id':>8}", f"{'score':>7}"] + [c for c in present]))
        for rank, h in enumerate(hits, 1):
            cells = [f"{rank:>4}", f"{h['id']:>8}", f"{h['score']:7.4f}"]
            for c in present:
                v = _cell(h.get(c, "") or "")
                cells.append(v if len(v) <= width else "…" + v[-(width - 1):])
            lines.append("  " + "  ".join(cells))
        if not hits:
            lines.append("  (no results)")
    return "\n".join(lines)
