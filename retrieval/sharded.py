"""Search several index folders as one collection: :class:`ShardedRetriever`.

A collection too large for one machine is indexed as several folders (one per machine or disk), each built
from a disjoint part of the collection. Their ids are made globally unique by the ``id_offset`` each folder's
manifest records (:func:`~retrieval.ondisk.build_ondisk_index` ``id_offset=``, or :func:`set_id_offset`
on an existing folder): the global id of a folder's id ``i`` is ``id_offset + i``, and the folders' ranges
``[id_offset, id_offset + next_id)`` must not overlap (refused otherwise, before any search).

Every query is searched in every folder (each with its own tuned search parameters; threads run the folders
in parallel, faiss releases the GIL), and the per-folder top-k lists are merged by score with
``faiss.ResultHeap`` (inner product: the largest scores are kept). With exact or exhaustive per-folder search
the result equals a single index over the union (same ids, same scores).

The folders must agree on what a query means: same dimension, metric, kind, normalisation and encoder
(model name and, when recorded in the same dtype, weights fingerprint); otherwise
:class:`~retrieval.faiss_ops.IndexMismatchError` names the first difference in one line.
"""
from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

import numpy as np

from internvit.store import Store, committed_files

from .faiss_ops import IndexMismatchError, as_id, as_ids, faiss_module, search_param_names, set_search_params
from .index_folder import check_id_offset, id_range, read_manifest
from .search import Retriever, _Queries

__all__ = ["ShardedRetriever", "check_shards", "set_id_offset", "id_range", "parse_group"]  # id_range: index_folder


def parse_group(spec: str) -> Optional[tuple[str, list[str]]]:
    """``(name, [folders])`` of a group spec ``NAME=DIR1,DIR2[,...]`` (the search service's and
    ``tools/serve.py``'s way to serve several folders as one collection), or ``None`` for anything else (a
    plain ``DIR`` or ``NAME=DIR``; an existing path is always one folder, even with ``,`` or ``=`` in its name).
    ``ValueError`` (one line) for a comma list without a name, an empty member, or a spec that names both an
    existing folder and a group."""
    spec = os.fspath(spec)
    name, sep, rest = spec.partition("=")
    if os.path.exists(spec) or "," not in (rest if sep else spec):
        return None
    if not sep or not name:
        raise ValueError(f"{spec}: no such folder; a group of index folders needs a name: NAME=DIR1,DIR2")
    parts = rest.split(",")
    if any(not p.strip() for p in parts):
        raise ValueError(f"{spec}: empty folder name in group {name!r} (write NAME=DIR1,DIR2, no spaces)")
    if os.path.exists(rest):
        if all(os.path.exists(p) for p in parts):
            raise ValueError(f"{spec}: ambiguous: {rest!r} is a folder and a list of folders; rename it")
        return None
    return name, parts


def check_shards(manifests: Sequence[dict], dirs: Sequence[str]) -> None:
    """Raise :class:`IndexMismatchError` (one line) unless the folders can be searched as one collection:
    same dim, metric, kind, normalisation, encoder; disjoint global id ranges; no folder twice."""
    if not manifests:
        raise ValueError("no index folders to search")
    real = [os.path.realpath(d) for d in dirs]
    for i, r in enumerate(real):
        if r in real[:i]:
            raise ValueError(f"{dirs[i]}: the same index folder is given twice")
    first, where = manifests[0], dirs[0]
    for m, d in zip(manifests[1:], dirs[1:]):
        for field, what in (("dim", "dimension"), ("metric", "metric"), ("kind", "kind"),
                            ("normalize", "query normalisation")):
            a, b = first.get(field, "img" if field == "kind" else None), m.get(field, "img" if field == "kind"
                                                                                else None)
            if a != b:
                raise IndexMismatchError(f"{d}: {what} {b!r} differs from {where}'s {a!r}; folders searched "
                                         f"together must answer the same queries")
        ea, eb = first.get("encoder") or {}, m.get("encoder") or {}
        if ea.get("name") != eb.get("name"):
            raise IndexMismatchError(f"{d}: built with encoder {eb.get('name')!r}, {where} with "
                                     f"{ea.get('name')!r}; folders searched together need the same model")
        fa, fb = ea.get("weights_fingerprint"), eb.get("weights_fingerprint")
        if fa and fb and fa != fb and ea.get("dtype") == eb.get("dtype"):
            raise IndexMismatchError(f"{d}: built with other weights of encoder {eb.get('name')!r} than {where}")
    ranges = sorted((id_range(m, d), d) for m, d in zip(manifests, dirs))
    for ((a0, a1), da), ((b0, b1), db) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise IndexMismatchError(f"{db}: ids {b0}..{b1 - 1} overlap {da}'s {a0}..{a1 - 1}; give each folder "
                                     f"its own id range (set_id_offset / --id-offset, e.g. the first row of its "
                                     f"part of the collection)")


def set_id_offset(index_dir: Union[str, os.PathLike], id_offset: int) -> dict:
    """Record ``id_offset`` (the global id of the folder's id 0) in an index folder's manifest, as a new
    committed generation (same data files); returns the manifest. ``ValueError`` for an offset that is not an
    integer >= 0 or puts the folder's last id (``id_offset + next_id - 1``) beyond ``2**63 - 1``.
    (:func:`~retrieval.index_build.build_index` / :func:`~retrieval.index_add.add_to_index` take
    ``id_offset=`` too, and record it in the same commit as the rows.)"""
    index_dir = os.fspath(index_dir)
    manifest = read_manifest(index_dir)
    id_offset = check_id_offset(id_offset, int(manifest["next_id"]), index_dir)
    if int(manifest.get("id_offset", 0)) == id_offset:
        return manifest
    with Store(index_dir, job={"op": "set_id_offset", "id_offset": id_offset}, description="index") as st:
        check_id_offset(id_offset, int(st.manifest["next_id"]), index_dir)  # the committed state may have grown
        new = dict(st.manifest, id_offset=id_offset)
        return st.commit(new, committed_files(st.manifest))


def _apply_params(retrievers: Sequence[Retriever], params: str) -> None:
    """Apply each ``name=value`` of ``params`` to the folders whose index has that parameter (an IVF folder
    takes ``nprobe``, an HNSW one ``efSearch``, a flat one neither); ``ValueError`` for one none of them has."""
    parts = [p.strip() for p in params.split(",") if p.strip()]
    used = set()
    for r in retrievers:
        names = search_param_names(r.index)
        mine = [p for p in parts if p.partition("=")[0].strip() in names]
        if mine:
            set_search_params(r.index, ",".join(mine))
            used.update(mine)
    unused = [p for p in parts if p not in used]
    if unused:
        raise ValueError(f"search params {params!r}: no index folder has {unused[0].partition('=')[0]!r}")


class ShardedRetriever(_Queries):
    """Several :class:`~retrieval.search.Retriever` folders searched as one collection (same API:
    ``search_embedding`` / ``search_text`` / ``search_image`` / ``metadata``; ids are global).

    >>> r = ShardedRetriever.load(["index_a/", "index_b/"])   # or Retriever.load([...])
    >>> r.search_text("a dog on a beach", k=5).ids
    """

    def __init__(self, retrievers: Sequence[Retriever]) -> None:
        self.retrievers = list(retrievers)
        dirs = [r.index_dir for r in self.retrievers]
        check_shards([r.manifest for r in self.retrievers], dirs)
        self.offsets = [r.id_offset for r in self.retrievers]
        self.index_dirs = dirs
        self._order = sorted(range(len(dirs)), key=lambda i: self.offsets[i])
        self._starts = [self.retrievers[i].id_offset for i in self._order]
        self._encoder = None
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(dirs))) if len(dirs) > 1 else None
        m = dict(self.retrievers[0].manifest)  # the folders' manifests do not change once loaded: built once
        m.update(ntotal=self.ntotal, shards=[{"index_dir": d, "id_offset": o, "ntotal": r.ntotal}
                                             for d, o, r in zip(self.index_dirs, self.offsets, self.retrievers)],
                 metadata_files=[], index_key=",".join(sorted({r.manifest["index_key"] for r in self.retrievers})))
        m.pop("id_offset", None)  # the members' offsets are in shards; the group's ids are global already
        self._manifest = m

    @classmethod
    def load(cls, index_dirs: Sequence[Union[str, os.PathLike]], encoder=None, *, device=None, dtype=None,
             tokenizer: Optional[str] = None, mmap: bool = False,
             search_params: Optional[str] = None) -> "ShardedRetriever":
        """Open every folder of ``index_dirs`` (arguments as :meth:`Retriever.load`, applied to each;
        ``search_params`` parameters go to the folders whose index has them). The
        manifests are checked against each other before any index file is read (one-line
        :class:`IndexMismatchError` / ``ValueError``); a folder that cannot be opened raises
        :class:`~retrieval.faiss_ops.RetrievalError` naming it."""
        dirs = [os.fspath(d) for d in index_dirs]
        check_shards([read_manifest(d) for d in dirs], dirs)
        retrievers = [Retriever.load(d, encoder, device=device, dtype=dtype, tokenizer=tokenizer, mmap=mmap)
                      for d in dirs]
        if search_params:
            _apply_params(retrievers, search_params)
        return cls(retrievers)

    # -- what the collection is -------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The first folder's manifest with the collection's totals (``ntotal``; ``shards``: each folder's
        ``index_dir``, ``id_offset``, ``ntotal``; ``index_key``: the folders' keys joined by ``,``)."""
        return self._manifest

    @property
    def ntotal(self) -> int:
        return sum(r.ntotal for r in self.retrievers)

    @property
    def index_dir(self) -> str:
        return os.pathsep.join(self.index_dirs)

    @property
    def encoder(self):
        """The query encoder (the first folder's, checked against every folder's manifest)."""
        if self._encoder is None:
            enc = self.retrievers[0].encoder
            for r in self.retrievers[1:]:
                enc.check_compatible(r.manifest, r.index_dir)
                r._encoder = enc
            self._encoder = enc
        return self._encoder

    # -- search -------------------------------------------------------------------------------------------
    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of every folder (threads: faiss releases the GIL), global ids (each folder's
        :meth:`Retriever._search` applies its offset), merged by score."""
        faiss = faiss_module()

        def one(i):
            return self.retrievers[i]._search(q, k)

        parts = list(self._pool.map(one, self._order)) if self._pool else [one(i) for i in self._order]
        heap = faiss.ResultHeap(len(q), k, keep_max=True)
        for scores, ids in parts:
            heap.add_result(np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
        heap.finalize()
        return heap.D, heap.I

    def _member(self, id_: int) -> Optional[Retriever]:
        """The folder whose global id range holds ``id_`` (``None``: none does)."""
        j = bisect.bisect_right(self._starts, id_) - 1
        if j < 0:
            return None
        r = self.retrievers[self._order[j]]
        return r if id_ < r.id_end else None

    def shard_of(self, id_: int) -> tuple[Retriever, int]:
        """``(the folder's Retriever, its local id)`` of a global id; ``KeyError`` when no folder's range holds
        it, ``ValueError`` for a non-integer id. (The folder's own methods take the global id.)"""
        id_ = as_id(id_)
        r = self._member(id_)
        if r is None:
            raise KeyError(f"id {id_} is in none of the folders' id ranges")
        return r, id_ - r.id_offset

    def holds(self, id_: int) -> bool:
        """Whether a folder holds the global id ``id_`` (in its range, neither removed nor skipped)."""
        r = self._member(as_id(id_))
        return r is not None and r.holds(id_)

    def stored_vector(self, id_: int) -> np.ndarray:
        """The indexed vector of a global id (search by id); ``KeyError`` when no folder holds it."""
        r = self._member(as_id(id_))
        if r is None:
            raise KeyError(int(id_))
        return r.stored_vector(id_)

    def open_metadata(self) -> None:
        """Open every metadata file of every folder now (see :meth:`Retriever.open_metadata`)."""
        for r in self.retrievers:
            r.open_metadata()

    def metadata(self, id_: int) -> dict:
        """The stored metadata row of a global id (empty dict when no folder holds it)."""
        return self.metadata_rows(np.array([as_id(id_)], np.int64))[int(id_)]

    def metadata_rows(self, ids) -> dict:
        """``{global id: metadata row}`` for many ids: one batched lookup per folder."""
        out: dict = {}
        by_member: dict = {}
        for id_ in np.unique(as_ids(ids)).tolist():
            r = self._member(id_)
            if r is None:
                out[id_] = {}
            else:
                by_member.setdefault(id(r), (r, []))[1].append(id_)
        for r, group in by_member.values():
            out.update(r.metadata_rows(np.asarray(group, np.int64)))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __repr__(self) -> str:
        return f"ShardedRetriever({self.index_dirs!r}, ntotal={self.ntotal})"
