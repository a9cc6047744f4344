"""Embedding collections in clip-retrieval's layout: streaming reads, store-committed writes, checksums.

Layout (what ``clip-retrieval inference`` writes and ``autofaiss`` / ``clip-retrieval index`` read)::

    out/img_emb/img_emb_{N}.npy          float32 (rows, dim), one file per shard
    out/text_emb/text_emb_{N}.npy        (optional) caption embeddings, row-aligned with img_emb
    out/metadata/metadata_{N}.parquet    one row per embedding: id, path / image_path, caption, ...
    out/manifest.json                    (ours) the committed state: count, dims, checksums, files

Folders we write commit through :class:`internvit.store.Store` (the manifest is the commit point; a reader
only sees the shards the committed manifest lists). Folders written by other tools (clip-retrieval) have no
store manifest and are read as listed. Shards are ordered by the number in their name (zero-padded or not).
Rows are read shard by shard through ``np.load(mmap_mode='r')``, so memory stays bounded by the batch size.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from typing import ContextManager, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from internvit.store import Store, StoreError, committed_files, job_id, read_manifest

KINDS = {"img": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}
METADATA_DIR = "metadata"
#: a vector counts as unit length when its L2 norm is within this of 1
UNIT_TOLERANCE = 1e-3


class EmbeddingError(ValueError):
    """A collection that cannot be read: missing folder, mismatched shard shapes, non-finite values..."""


# --------------------------------------------------------------------------------------------- file helpers
def atomic_write(path: str, *, is_dir: bool = False) -> ContextManager[str]:
    """:func:`internvit.fileio.atomic_write` (single result files outside store folders, e.g. an HTML page)."""
    from internvit.fileio import atomic_write as _atomic_write

    return _atomic_write(path, is_dir=is_dir)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write one stand-alone file ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def save_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` to exactly ``path`` (no ``.npy`` appended to a temporary name)."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def shard_number(path: str) -> int:
    m = re.search(r"(\d+)(?=\.[^.]+$)", os.path.basename(path))
    return int(m.group(1)) if m else -1


def store_files(folder: str) -> Optional[set]:
    """The data files (relative paths) the committed store manifest of ``folder`` lists, or ``None`` when the
    folder was not written through the store (e.g. clip-retrieval's own output)."""
    try:
        m = read_manifest(folder)
    except StoreError as e:
        raise EmbeddingError(str(e)) from None
    if not m or "_store" not in m:
        return None
    return set(committed_files(m))


def _sorted_files(folder: str, prefix: str, suffix: str, root: Optional[str] = None) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix) and not n.startswith(".")]
    for base in (folder, root):  # a store folder: only what its committed manifest lists
        if base is None:
            continue
        listed = store_files(base)
        if listed is not None:
            rel = os.path.relpath(folder, base)
            names = [n for n in names if os.path.normpath(os.path.join(rel, n)) in listed]
            break
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: (shard_number(n), n))]


def find_shards(folder: str, kind: str = "img") -> list[str]:
    """The ``.npy`` shards of ``kind`` ('img' or 'text') in a collection folder, in shard order.

    ``folder`` may be the collection root (``img_emb/`` inside) or a folder of ``.npy`` files itself.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    folder = os.fspath(folder)
    sub, prefix = KINDS[kind]
    files = _sorted_files(os.path.join(folder, sub), prefix, ".npy", root=folder)
    if not files and kind == "img":
        files = _sorted_files(folder, "", ".npy")
    return files


def find_metadata(folder: str) -> list[str]:
    folder = os.fspath(folder)
    return _sorted_files(os.path.join(folder, METADATA_DIR), "", ".parquet", root=folder)


# --------------------------------------------------------------------------------------------- the reader
class EmbeddingSource:
    """A read-only, shard-streamed view of an embedding collection (clip-retrieval folder or in-memory array).

    ``count``/``dim`` come from the ``.npy`` headers; rows are read with ``mmap_mode='r'`` one batch at a time.
    With :attr:`normalize` set (see :meth:`normalized`) every row read is L2-normalised.
    """

    normalize: bool = False

    def __init__(self, shards: Sequence[Union[str, np.ndarray]], *, root: Optional[str] = None,
                 metadata_files: Sequence[str] = ()) -> None:
        if not shards:
            raise EmbeddingError(f"{root or 'embeddings'}: no embedding shards found")
        self.shards = list(shards)
        self.root = root
        self.metadata_files = list(metadata_files)
        self.counts: list[int] = []
        dims = set()
        for s in self.shards:
            arr = self._open(s)
            if arr.ndim != 2:
                raise EmbeddingError(f"{self._name(s)}: expected a 2-D (rows, dim) array, got shape {arr.shape}")
            if arr.dtype.kind != "f":
                raise EmbeddingError(f"{self._name(s)}: expected float embeddings, got dtype {arr.dtype}")
            self.counts.append(arr.shape[0])
            dims.add(arr.shape[1])
        if len(dims) != 1:
            raise EmbeddingError(f"{root or 'embeddings'}: shards have different dims {sorted(dims)}")
        self.dim = dims.pop()
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.count = int(self.offsets[-1])
        if self.count == 0:
            raise EmbeddingError(f"{root or 'embeddings'}: the collection has no rows")

    def _name(self, s) -> str:
        if not isinstance(s, str):
            i = next(j for j, x in enumerate(self.shards) if x is s)
            return "array" if len(self.shards) == 1 else f"array shard {i}"
        return os.path.relpath(s, self.root) if self.root and os.path.isdir(self.root) else s

    def shard_name(self, i: int) -> str:
        """How messages name shard ``i`` (its path relative to the collection)."""
        return self._name(self.shards[i])

    def locate(self, row: int) -> tuple[int, int]:
        """``(shard, row within the shard)`` of a global row."""
        i = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return i, int(row - self.offsets[i])

    def normalized(self, normalize: bool = True) -> "EmbeddingSource":
        """A view of the same collection whose rows are read L2-normalised (``normalize=True``)."""
        out = copy.copy(self)
        out.normalize = bool(normalize)
        return out

    @staticmethod
    def _open(s) -> np.ndarray:
        if isinstance(s, np.ndarray):
            return s
        try:
            return np.load(s, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EmbeddingError(f"{s}: not a readable .npy file ({e})") from None

    @classmethod
    def from_folder(cls, folder: str, kind: str = "img") -> "EmbeddingSource":
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise EmbeddingError(f"{folder}: embeddings folder does not exist")
        shards = find_shards(folder, kind)
        if not shards:
            sub = KINDS[kind][0]
            raise EmbeddingError(f"{folder}: no {sub}/{KINDS[kind][1]}*.npy shards found")
        return cls(shards, root=folder, metadata_files=find_metadata(folder))

    @classmethod
    def from_array(cls, array: np.ndarray) -> "EmbeddingSource":
        array = np.asarray(array)
        if array.ndim == 1:
            array = array[None]
        return cls([array])

    @classmethod
    def open(cls, embeddings, kind: str = "img") -> "EmbeddingSource":
        """A folder path, a ``.npy`` file, an array or an existing source."""
        if isinstance(embeddings, EmbeddingSource):
            return embeddings
        if isinstance(embeddings, (str, os.PathLike)):
            path = os.fspath(embeddings)
            if os.path.isfile(path) and path.endswith(".npy"):
                return cls([path], root=path)
            return cls.from_folder(path, kind)
        if isinstance(embeddings, np.ndarray) or hasattr(embeddings, "__array__"):
            return cls.from_array(np.asarray(embeddings))
        raise TypeError(f"embeddings must be a folder, a .npy path or an array, got {type(embeddings).__name__}")

    # -- reading
    def shard(self, i: int) -> np.ndarray:
        return self._open(self.shards[i])

    def iter_batches(self, batch_rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, float32 C-contiguous batch)`` from ``start`` on; batch boundaries are fixed
        multiples of ``batch_rows`` from row 0 (so a resumed pass sees the same batches)."""
        batch_rows = max(1, int(batch_rows))
        row = (start // batch_rows) * batch_rows
        if row != start:
            raise ValueError(f"start={start} is not a multiple of batch_rows={batch_rows}")
        while row < self.count:
            end = min(row + batch_rows, self.count)
            yield row, self.rows(row, end)
            row = end

    def rows(self, start: int, end: int) -> np.ndarray:
        """Rows ``[start, end)`` as one float32 array (crossing shard boundaries as needed)."""
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < end:
            lo = start - self.offsets[i]
            hi = min(end, self.offsets[i + 1]) - self.offsets[i]
            parts.append(np.asarray(self.shard(i)[lo:hi], dtype=np.float32))
            start = int(self.offsets[i] + hi)
            i += 1
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._finish(np.ascontiguousarray(out, dtype=np.float32))

    def _finish(self, x: np.ndarray) -> np.ndarray:
        if self.normalize and len(x):
            x = x / np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by global index (any order), gathered shard by shard."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        for i in np.unique(shard_of):
            sel = np.nonzero(shard_of == i)[0]
            local = sorted_rows[sel] - self.offsets[i]
            out[order[sel]] = np.asarray(self.shard(int(i))[local], dtype=np.float32)
        return self._finish(out)

    def normalize_rows(self, x: np.ndarray) -> np.ndarray:
        """``x`` (float32 ``(n, dim)`` rows read raw) as this view reads them: L2-normalised when
        :attr:`normalize` is set (the same arithmetic as :meth:`rows` / :meth:`take`)."""
        return self._finish(x)

    def checksum(self, batch_rows: int = 65536) -> str:
        """sha256 over the float32 little-endian rows as stored, streamed; identical for identical collections."""
        return self.scan(batch_rows)["checksum"]

    def scan(self, batch_rows: int = 65536) -> dict:
        """One streamed pass over the rows as stored: ``{'checksum', 'min_norm', 'max_norm', 'nonfinite',
        'zero'}``; ``nonfinite`` / ``zero`` are the first ``(shard name, row in shard)`` holding a NaN / inf
        or an all-zero vector (``None`` when there is none)."""
        raw = self.normalized(False)
        h = hashlib.sha256()
        h.update(f"{self.count}x{self.dim}:".encode())
        lo, hi, bad, zero = np.inf, 0.0, None, None
        for start, batch in raw.iter_batches(batch_rows):
            h.update(batch if batch.dtype.str == "<f4" else batch.astype("<f4"))  # no copy: the buffer itself
            f = row_facts(batch)
            if bad is None and f["nonfinite"] is not None:
                bad = self.locate(start + f["nonfinite"])
            if zero is None and f["zero"] is not None:
                zero = self.locate(start + f["zero"])
            lo, hi = min(lo, f["min_norm"]), max(hi, f["max_norm"])
        name = (lambda loc: None if loc is None else (self.shard_name(loc[0]), loc[1]))
        return {"checksum": "sha256:" + h.hexdigest(), "min_norm": float(lo), "max_norm": float(hi),
                "nonfinite": name(bad), "zero": name(zero)}

    def fingerprint(self) -> str:
        """What identifies this collection's content for resuming a job over it, without reading its rows.

        * A folder written through the store (:func:`write_embeddings`, ``FeatureExtractor.write``, or a
          sub-folder that is its own store folder, such as ``text_emb/``: the deepest one listing the shards): its data
          files are immutable while the committed manifest lists them, and a rewrite commits a new generation;
          so the content checksum that manifest recorded (``checksums[kind]``, the same value as
          :meth:`checksum`), or ``"content:"`` + a hash of the per-shard sha256 of the rows that
          ``FeatureExtractor.write`` recorded, or (a folder written before shards recorded it) ``"store:"`` + a
          hash of (generation, job id, each shard's name and size): identical for identical runs.
        * Any other folder or ``.npy`` file (e.g. clip-retrieval's output): ``"stat:"`` + a hash of each shard's
          name, size, inode and modification / status-change times (ns). Any write to a file, or replacing it,
          changes its status-change time, which no user tool can set back; copying a folder changes it too
          (then it counts as other content: safe, only a resume is refused).
        * An in-memory array: :meth:`checksum` (sha256 over its rows).
        """
        if any(not isinstance(s, str) for s in self.shards):
            return self.checksum()
        base, m = self._store_folder()
        listed = set(committed_files(m)) if m else set()
        rel = [os.path.relpath(s, base) for s in self.shards]
        if listed:
            recorded = m.get("checksums") if isinstance(m.get("checksums"), dict) else {}
            kind = next((k for k, (sub, _) in KINDS.items() if rel[0].startswith(sub + os.sep)), None)
            if (kind in recorded and m.get("count") == self.count
                    and (m.get("dims") or {}).get(kind) == self.dim):  # write_embeddings' own record
                return str(recorded[kind])
            content = {os.path.normpath(e["features"]): e["sha256"] for e in m.get("shards") or []
                       if isinstance(e, dict) and isinstance(e.get("features"), str) and e.get("sha256")}
            if all(os.path.normpath(r) in content for r in rel):  # FeatureExtractor.write's per-shard sha256
                facts = [self.count, self.dim] + [[r, content[os.path.normpath(r)]] for r in rel]
                return "content:" + hashlib.sha256(json.dumps(facts).encode()).hexdigest()
            st = m["_store"]  # a folder written before shards recorded their sha256
            facts = [st.get("generation"), st.get("job_id"), self.count, self.dim]
            facts += [[r, os.stat(s).st_size] for r, s in zip(rel, self.shards)]  # no times: two identical
            # runs (one process or torchrun ranks) commit the same record and must give the same index manifest
            prefix = "store:"
        else:
            facts = [self.count, self.dim]
            for r, s in zip(rel, self.shards):
                info = os.stat(s)
                facts.append([r, info.st_size, info.st_ino, info.st_mtime_ns, info.st_ctime_ns])
            prefix = "stat:"
        return prefix + hashlib.sha256(json.dumps(facts).encode()).hexdigest()

    # -- metadata
    def check_metadata_rows(self) -> int:
        """The metadata shards' row count (0 without metadata), read from the parquet footers and checked: it
        must equal :attr:`count`, and in clip-retrieval's numbered layout (``img_emb_N.npy`` with
        ``metadata_N.parquet``, two or more of each) every shard must have the metadata file of its number with
        as many rows: ``EmbeddingError`` naming the first shard that differs. Equal totals alone let a missing
        ``img_emb_5`` and a missing ``metadata_7`` (partial inference output) shift the captions and paths of
        shards 5 and 6 onto other vectors without a word. Rows-less files on either side need no partner."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        for f in self.metadata_files:
            try:
                rows.append(pq.ParquetFile(f).metadata.num_rows)
            except (pa.ArrowException, OSError) as e:
                raise EmbeddingError(f"{f}: not a readable parquet file ({str(e).splitlines()[0][:100]})") from None
        if not rows:
            return 0
        if sum(rows) != self.count:
            raise EmbeddingError(f"{self.root}: metadata has {sum(rows)} rows but the embeddings have {self.count}")
        shard_nums = [shard_number(s) if isinstance(s, str) else -1 for s in self.shards]
        meta_nums = [shard_number(f) for f in self.metadata_files]
        if min(len(shard_nums), len(meta_nums)) < 2 or min(shard_nums + meta_nums) < 0:
            return sum(rows)  # one metadata table for all shards (or the reverse), or files without numbers
        meta = {n: (f, r) for n, f, r in zip(meta_nums, self.metadata_files, rows) if r}
        shards = {n: (s, c) for n, s, c in zip(shard_nums, self.shards, self.counts) if c}
        for n in sorted(set(meta) | set(shards)):
            (s, c), (f, r) = shards.get(n, (None, 0)), meta.get(n, (None, 0))
            if c == r:
                continue
            if s is None or f is None:
                what = (f"{os.path.relpath(f, self.root)} ({r} rows) has no embedding shard {n}" if s is None else
                        f"{self._name(s)} ({c} rows) has no metadata file {n}")
            else:
                what = f"{self._name(s)} has {c} rows but {os.path.relpath(f, self.root)} has {r}"
            raise EmbeddingError(f"{self.root}: {what} (img_emb_N / text_emb_N go with metadata_N; the "
                                 f"totals agree, but the metadata would be attached to other rows)")
        return sum(rows)

    def metadata_table(self):
        """All metadata shards concatenated (a pyarrow Table) or None; rows checked against the shards
        (:meth:`check_metadata_rows`)."""
        if not self.metadata_files:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.check_metadata_rows()
        tables = [pq.read_table(f) for f in self.metadata_files]
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except TypeError:  # pyarrow < 14
            table = pa.concat_tables(tables, promote=True)
        return table

    def _store_folder(self) -> tuple[str, Optional[dict]]:
        """``(folder, its committed store manifest)`` of the store folder whose manifest lists every shard: the
        collection's root or a sub-folder that is its own store folder (``text_emb/``, written apart from the
        image shards), deepest first; ``(the root or the shards' folder, None)`` when no store folder lists
        them (the fingerprint then falls back to ``stat:``)."""
        if not (self.root and os.path.isdir(self.root)):
            return os.path.dirname(self.shards[0]), None
        root = os.path.abspath(self.root)
        folder, candidates = os.path.dirname(os.path.abspath(self.shards[0])), []
        while os.path.commonpath([folder, root]) == root:  # from the shards' folder up to the root
            candidates.append(folder)
            if folder == root:
                break
            folder = os.path.dirname(folder)
        for folder in candidates or [root]:
            try:
                m = read_manifest(folder)
            except StoreError as e:
                raise EmbeddingError(str(e)) from None
            if m and "_store" in m and all(os.path.normpath(os.path.relpath(os.path.abspath(s), folder))
                                           in set(committed_files(m)) for s in self.shards):
                return folder, m
        return self.root, None

    def manifest(self) -> Optional[dict]:
        """The collection's ``manifest.json`` (written by the embedding job), if any."""
        if self.root and os.path.isdir(self.root):
            try:
                return read_manifest(self.root)
            except StoreError as e:
                raise EmbeddingError(str(e)) from None
        return None


def row_facts(x: np.ndarray, tolerance: float = UNIT_TOLERANCE) -> dict:
    """What a build must know about raw float32 rows ``x`` ``(n, dim)``, in about one read of them:
    ``{'min_norm', 'max_norm'}`` (L2 norms over the finite rows, as ``np.linalg.norm`` computes them; ``inf`` /
    ``0.0`` when there is none) and the first local row that holds a NaN / inf (``'nonfinite'``), is all zeros
    (``'zero'``) or is finite but not unit length within ``tolerance`` (``'nonunit'``), each ``None`` when
    there is none."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _row_facts(x, tolerance)


def _row_facts(x: np.ndarray, tolerance: float) -> dict:
    sq = np.einsum("ij,ij->i", x, x)  # float32; NaN / inf rows give NaN / inf (so do finite rows that overflow)
    finite = np.isfinite(sq)
    first_bad = None
    if not finite.all():
        cand = np.flatnonzero(~finite)
        real = ~np.isfinite(x[cand]).all(axis=1)
        finite[cand[~real]] = True  # finite values whose square overflows: norm inf, as np.linalg.norm says
        if real.any():
            first_bad = int(cand[np.argmax(real)])
    norms = np.sqrt(sq)
    # rows near the tolerance edge or at the extremes: the exact np.linalg.norm value (einsum sums in another
    # order, a few ulp apart), so decisions and recorded norms are those of np.linalg.norm
    near = np.flatnonzero(finite & (np.abs(np.abs(norms - 1) - tolerance) <= 1e-5))
    if len(near):
        norms[near] = np.linalg.norm(x[near], axis=1)
    out = {"min_norm": np.inf, "max_norm": 0.0, "nonfinite": first_bad, "zero": None, "nonunit": None}
    fin = np.flatnonzero(finite)
    if len(fin):
        nf = norms[fin]
        ends = fin[[int(np.argmin(nf)), int(np.argmax(nf))]]
        exact = np.linalg.norm(x[ends], axis=1)
        out["min_norm"], out["max_norm"] = float(exact[0]), float(exact[1])
        zero = np.flatnonzero(finite & (sq == 0))
        out["zero"] = int(zero[0]) if len(zero) else None
        off = np.flatnonzero(finite & (np.abs(norms - 1) > tolerance))
        out["nonunit"] = int(off[0]) if len(off) else None
    return out


def to_table(metadata, n: Optional[int] = None):
    """Metadata as a pyarrow Table: a Table, a dict of columns, a list of row dicts, or a parquet path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if metadata is None:
        return None
    if isinstance(metadata, pa.Table):
        table = metadata
    elif isinstance(metadata, (str, os.PathLike)):
        table = pq.read_table(os.fspath(metadata))
    elif isinstance(metadata, Mapping):
        table = pa.table({k: list(v) for k, v in metadata.items()})
    elif isinstance(metadata, Sequence):
        table = pa.Table.from_pylist(list(metadata))
    else:
        raise TypeError(f"metadata must be a pyarrow Table, dict of columns, list of dicts or parquet path, "
                        f"got {type(metadata).__name__}")
    if n is not None and table.num_rows != n:
        raise EmbeddingError(f"metadata has {table.num_rows} rows but there are {n} embeddings")
    return table


def _table_digest(table) -> Optional[str]:
    if table is None:
        return None
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def write_embeddings(out_dir: str, img: Optional[np.ndarray] = None, text: Optional[np.ndarray] = None,
                     metadata=None, *, shard_size: int = 100_000, manifest_extra: Optional[dict] = None) -> dict:
    """Write ``(N, D)`` arrays (and ``N`` metadata rows) in clip-retrieval's layout through the store; returns
    the committed manifest.

    Rerunning with the same data after a kill finishes the job (same files); with the same data after it
    finished it is a no-op. A folder that already holds other embeddings raises ``FileExistsError``.
    Raises ``ValueError`` for bad shapes or ``shard_size``.
    """
    out_dir = os.fspath(out_dir)
    if isinstance(shard_size, bool) or int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in (("img", img), ("text", text)) if v is not None}
    if not arrays:
        raise ValueError("nothing to write: give img and/or text embeddings")
    for k, a in arrays.items():
        if a.ndim != 2:
            raise EmbeddingError(f"{k} embeddings must be a 2-D (rows, dim) array, got shape {a.shape}")
    n = {a.shape[0] for a in arrays.values()}
    if len(n) != 1:
        raise EmbeddingError(f"img and text embeddings have different row counts {sorted(n)}")
    n = n.pop()
    table = to_table(metadata, n)
    checksums = {k: EmbeddingSource.from_array(a).checksum() for k, a in arrays.items()}
    job = {"op": "write_embeddings", "checksums": checksums, "metadata": _table_digest(table),
           "shard_size": int(shard_size), "extra": manifest_extra or {}}
    existing = store_files(out_dir) is not None and read_manifest(out_dir)
    if existing:
        if existing["_store"].get("job_id") == job_id(job):
            return existing
        raise FileExistsError(f"{out_dir}: already holds other embeddings; write to a new folder")
    n_shards = max(1, -(-n // int(shard_size)))
    width = len(str(n_shards - 1))
    files = []
    with Store(out_dir, job=job, description="embeddings folder") as st:
        for s in range(n_shards):
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            for kind, arr in arrays.items():
                sub, prefix = KINDS[kind]
                name = f"{sub}/{prefix}{s:0{width}d}.npy"
                files.append(name)
                if name not in st.pending_files:
                    with st.open_file(name) as tmp:
                        save_npy(tmp, arr[lo:hi])
            if table is not None:
                import pyarrow.parquet as pq

                name = f"{METADATA_DIR}/metadata_{s:0{width}d}.parquet"
                files.append(name)
                if name not in st.pending_files:
                    with st.open_file(name) as tmp:
                        pq.write_table(table.slice(lo, hi - lo), tmp)
        manifest = {"count": n, "dims": {k: int(a.shape[1]) for k, a in arrays.items()}, "shards": n_shards,
                    "checksums": checksums}
        manifest.update(manifest_extra or {})
        return st.commit(manifest, files)
