"""Embedding collections in clip-retrieval's layout: streaming reads, atomic writes, checksums.

Layout (what ``clip-retrieval inference`` writes and ``autofaiss`` / ``clip-retrieval index`` read)::

    out/img_emb/img_emb_{N}.npy          float32 (rows, dim), one file per shard
    out/text_emb/text_emb_{N}.npy        (optional) caption embeddings, row-aligned with img_emb
    out/metadata/metadata_{N}.parquet    one row per embedding: id, path / image_path, caption, ...

Shards are ordered by the number in their name (zero-padded or not). Rows are read shard by shard through
``np.load(mmap_mode='r')``, so memory stays bounded by the batch size, never by the collection size.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import ContextManager, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

KINDS = {"img": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}
METADATA_DIR = "metadata"


class EmbeddingError(ValueError):
    """A collection that cannot be read: missing folder, mismatched shard shapes, non-finite values..."""


# --------------------------------------------------------------------------------------------- file helpers
def atomic_write(path: str, *, is_dir: bool = False) -> ContextManager[str]:
    """:func:`internvit.fileio.atomic_write`, imported on first use: ``import internvit`` loads torch, and
    the embedding / index modules stay torch-free until something is written."""
    from internvit.fileio import atomic_write as _atomic_write

    return _atomic_write(path, is_dir=is_dir)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def atomic_write_parquet(path: str, table) -> None:
    import pyarrow.parquet as pq

    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def shard_number(path: str) -> int:
    m = re.search(r"(\d+)(?=\.[^.]+$)", os.path.basename(path))
    return int(m.group(1)) if m else -1


def _sorted_files(folder: str, prefix: str, suffix: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix) and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: (shard_number(n), n))]


def find_shards(folder: str, kind: str = "img") -> list[str]:
    """The ``.npy`` shards of ``kind`` ('img' or 'text') in a collection folder, in shard order.

    ``folder`` may be the collection root (``img_emb/`` inside) or a folder of ``.npy`` files itself.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    sub, prefix = KINDS[kind]
    files = _sorted_files(os.path.join(folder, sub), prefix, ".npy")
    if not files and kind == "img":
        files = _sorted_files(folder, "", ".npy")
    return files


def find_metadata(folder: str) -> list[str]:
    return _sorted_files(os.path.join(folder, METADATA_DIR), "", ".parquet")


# --------------------------------------------------------------------------------------------- the reader
class EmbeddingSource:
    """A read-only, shard-streamed view of an embedding collection (clip-retrieval folder or in-memory array).

    ``count``/``dim`` come from the ``.npy`` headers; rows are read with ``mmap_mode='r'`` one batch at a time.
    """

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

    @staticmethod
    def _name(s) -> str:
        return s if isinstance(s, str) else "array"

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
        return np.ascontiguousarray(out, dtype=np.float32)

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
        return out

    def checksum(self, batch_rows: int = 65536) -> str:
        """sha256 over the float32 little-endian rows, streamed; identical for identical collections."""
        h = hashlib.sha256()
        h.update(f"{self.count}x{self.dim}:".encode())
        for _, batch in self.iter_batches(batch_rows):
            h.update(batch.astype("<f4", copy=False).tobytes())
        return "sha256:" + h.hexdigest()

    # -- metadata
    def metadata_table(self):
        """All metadata shards concatenated (a pyarrow Table) or None; row count must equal ``count``."""
        if not self.metadata_files:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(f) for f in self.metadata_files]
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except TypeError:  # pyarrow < 14
            table = pa.concat_tables(tables, promote=True)
        if table.num_rows != self.count:
            raise EmbeddingError(f"{self.root}: metadata has {table.num_rows} rows but the embeddings have "
                                 f"{self.count}")
        return table

    def manifest(self) -> Optional[dict]:
        """The collection's ``manifest.json`` (written by the embedding job), if any."""
        if self.root and os.path.isdir(self.root):
            path = os.path.join(self.root, "manifest.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
        return None


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


def write_embeddings(out_dir: str, img: Optional[np.ndarray] = None, text: Optional[np.ndarray] = None,
                     metadata=None, *, shard_size: int = 100_000, manifest_extra: Optional[dict] = None) -> dict:
    """Write arrays (and metadata) in clip-retrieval's layout, every file atomically. Returns the manifest."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in (("img", img), ("text", text)) if v is not None}
    if not arrays:
        raise ValueError("nothing to write: give img and/or text embeddings")
    n = {a.shape[0] for a in arrays.values()}
    if len(n) != 1:
        raise EmbeddingError(f"img and text embeddings have different row counts {sorted(n)}")
    n = n.pop()
    table = to_table(metadata, n)
    n_shards = max(1, -(-n // shard_size))
    width = len(str(n_shards - 1))
    for s in range(n_shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        for kind, arr in arrays.items():
            sub, prefix = KINDS[kind]
            atomic_save_npy(os.path.join(out_dir, sub, f"{prefix}{s:0{width}d}.npy"), arr[lo:hi])
        if table is not None:
            atomic_write_parquet(os.path.join(out_dir, METADATA_DIR, f"metadata_{s:0{width}d}.parquet"),
                                 table.slice(lo, hi - lo))
    manifest = {"count": n, "dims": {k: int(a.shape[1]) for k, a in arrays.items()}, "shards": n_shards,
                "checksums": {k: EmbeddingSource.from_array(a).checksum() for k, a in arrays.items()}}
    manifest.update(manifest_extra or {})
    atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest
