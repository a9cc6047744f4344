"""Search a built index by text, image or embedding: :class:`Retriever`."""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from .faiss_ops import IndexMismatchError, RetrievalError, set_search_params
from .index_folder import open_index


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
                out.append({"query": self.queries[q] if q < len(self.queries) else q, "rank": rank, **row})
        return out


class _Queries:
    """What every searcher shares: query validation, text / image encoding and the result rows. A subclass
    provides ``manifest``, ``encoder``, ``metadata_rows(ids)`` and ``_search(q, k) -> (scores, ids)``."""

    manifest: dict

    def _prepare(self, embeddings, k) -> tuple[np.ndarray, int]:
        """``(Q, D)`` float32 contiguous queries (L2-normalised when the index was) and ``k`` as an int.

        Raises ``ValueError`` for an empty, non-finite or all-zero query or ``k < 1``,
        :class:`IndexMismatchError` for another dim."""
        q = np.asarray(embeddings, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[0] == 0:
            raise ValueError(f"query embeddings must be a non-empty (Q, D) array, got shape {q.shape}")
        dim = self.manifest["dim"]
        if q.shape[1] != dim:
            raise IndexMismatchError(f"{self.index_dir}: query dim {q.shape[1]} != index dim {dim}")
        if not np.isfinite(q).all():
            raise ValueError("query embeddings contain NaN or inf")
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"k must be an integer >= 1, got {k}")
        if self.manifest.get("normalize"):
            norms = np.linalg.norm(q, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ValueError("a query embedding is all zeros: it has no direction to search for")
            q = q / norms
        return np.ascontiguousarray(q, dtype=np.float32), int(k)

    def search_embedding(self, embeddings, k: int = 10, *, queries: Optional[list] = None) -> SearchResult:
        """Nearest ids of ``(Q, D)`` (or ``(D,)``) float query vectors: ``ids`` / ``scores`` ``(Q, k)`` (id -1 =
        fewer than ``k`` hits) and the hits' metadata rows.

        When the index normalised its vectors at build time (manifest ``normalize``), queries are L2-normalised
        too. Raises ``ValueError`` for an empty, non-finite or all-zero query or ``k < 1``,
        :class:`IndexMismatchError` for another dim."""
        q, k = self._prepare(embeddings, k)
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

    >>> r = Retriever.load("index/")
    >>> res = r.search_text(["a dog on a beach"], k=5)
    >>> res.rows[0][0]["path"], res.scores[0, 0]
    """

    def __init__(self, index, manifest: dict, index_dir: str, encoder=None, *, device=None, dtype=None,
                 tokenizer: Optional[str] = None) -> None:
        self.index = index
        self.manifest = manifest
        self.index_dir = index_dir
        self.device, self.dtype, self.tokenizer = device, dtype, tokenizer
        self._encoder = encoder
        self._tables: dict[str, object] = {}
        files = sorted(manifest.get("metadata_files", []), key=lambda e: e["first_id"])
        self._meta_starts = [e["first_id"] for e in files]
        self._meta_files = files
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
        truncated or corrupt index folder (index file or metadata).

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

    # -- search -------------------------------------------------------------------------------------------
    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(q, k)

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

    def metadata(self, id_: int) -> dict:
        """The stored metadata row of an id (empty dict when the index has no metadata for it)."""
        j = bisect.bisect_right(self._meta_starts, id_) - 1
        if j < 0:
            return {}
        entry = self._meta_files[j]
        if id_ >= entry["first_id"] + entry["count"]:
            return {}
        table = self._table(entry)
        return table.slice(id_ - entry["first_id"], 1).to_pylist()[0]

    def metadata_rows(self, ids) -> dict:
        """``{id: metadata row}`` for many ids at once: one ``take`` per metadata file (what a search needs)."""
        wanted = sorted({int(i) for i in np.asarray(ids).reshape(-1)})
        out: dict = {}
        by_file: dict = {}
        for id_ in wanted:
            j = bisect.bisect_right(self._meta_starts, id_) - 1
            if j < 0 or id_ >= self._meta_files[j]["first_id"] + self._meta_files[j]["count"]:
                out[id_] = {}
            else:
                by_file.setdefault(j, []).append(id_)
        for j, group in by_file.items():
            entry = self._meta_files[j]
            rows = self._table(entry).take([i - entry["first_id"] for i in group]).to_pylist()
            out.update(zip(group, rows))
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Retriever({self.index_dir!r}, {m['index_key']}, ntotal={m['ntotal']}, dim={m['dim']}, "
                f"params={m.get('search_params')!r})")


def format_table(result: SearchResult, columns: Sequence[str] = ("path", "caption"), width: int = 60) -> str:
    """A plain-text table of a :class:`SearchResult` (what ``tools/search.py`` prints)."""
    lines = []
    for q, hits in enumerate(result.rows):
        label = result.queries[q] if q < len(result.queries) else q
        lines.append(f"query {q}: {label}")
        present = [c for c in columns if any(c in h and h[c] not in (None, "") for h in hits)]
        lines.append("  " + "  ".join([f"{'rank':>4}", f"{'id':>8}", f"{'score':>7}"] + [c for c in present]))
        for rank, h in enumerate(hits, 1):
            cells = [f"{rank:>4}", f"{h['id']:>8}", f"{h['score']:7.4f}"]
            for c in present:
                v = str(h.get(c, "") or "")
                cells.append(v if len(v) <= width else "…" + v[-(width - 1):])
            lines.append("  " + "  ".join(cells))
        if not hits:
            lines.append("  (no results)")
    return "\n".join(lines)
