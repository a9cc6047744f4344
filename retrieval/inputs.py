"""Image collections to index: a folder, a list file, a parquet of paths (+ captions), or webdataset tars.

:func:`image_inputs` returns ``(images, captions)`` where ``images`` is what
:meth:`internvit.FeatureExtractor.write` accepts (a list of paths, or a ``Dataset`` for tar members) and
``captions`` is a list (``None`` entries for images without one) or ``None``. Decoding always goes through
:func:`internvit.data.load_image`.
"""
from __future__ import annotations

import glob
import io
import itertools
import logging
import os
import re
import tarfile
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

from torch.utils.data import Dataset

from internvit.data import is_image_file, list_images, load_image

PATH_COLUMNS = ("path", "image_path", "filepath", "file_name", "filename", "image")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentence")

logger = logging.getLogger("retrieval")


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000..012}.tar`` / ``{a,b}.tar`` → the listed names (webdataset brace notation)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        width = len(r.group(1))
        options = [f"{i:0{width}d}" for i in range(int(r.group(1)), int(r.group(2)) + 1)]
    else:
        options = body.split(",")
    return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in options))


def _tar_files(source: str) -> list[str]:
    files = []
    for p in expand_braces(source):
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        files.extend(matches)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such tar file")
    if not files:
        raise FileNotFoundError(f"{source}: matches no tar files")
    return files


class TarImages(Dataset):
    """Images stored in webdataset tars (``key.jpg`` + optional ``key.txt`` caption), read by byte offset.

    Item ``i`` is ``transform(image)``; ``paths[i]`` is ``'shard.tar::member'``; ``captions[i]`` the text or None.
    At most ``max_open_files`` tars are open at a time (per process: each DataLoader worker has its own
    handles); the least recently read one is closed when another is needed, so any number of shards reads
    under a low open-files limit (``ulimit -n``).
    """

    def __init__(self, tar_files: Sequence[str], transform: Optional[Callable] = None, *,
                 max_open_files: int = 8) -> None:
        if int(max_open_files) < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.max_open_files = int(max_open_files)
        self.tar_files = [os.path.abspath(f) for f in tar_files]
        self.transform = transform
        self.members: list[tuple[int, int, int]] = []  # (tar index, data offset, size)
        self.paths: list[str] = []
        self.captions: list[Optional[str]] = []
        for t, path in enumerate(self.tar_files):
            images, texts = {}, {}
            try:
                with tarfile.open(path, mode="r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        base = os.path.basename(m.name)
                        key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                        if is_image_file(m.name) and key not in images:
                            images[key] = (m.offset_data, m.size, m.name)
                        elif m.name.endswith(".txt"):
                            f = tar.extractfile(m)
                            texts[key] = f.read().decode("utf-8-sig", errors="replace").strip() if f else None
            except tarfile.TarError as e:
                raise ValueError(f"{path}: not a readable (uncompressed) tar file ({e})") from None
            for key, (offset, size, name) in images.items():
                self.members.append((t, offset, size))
                self.paths.append(f"{path}::{name}")
                self.captions.append(texts.get(key))
        self._handles: OrderedDict[int, io.BufferedReader] = OrderedDict()

    def __len__(self) -> int:
        return len(self.members)

    def _handle(self, t: int) -> io.BufferedReader:
        f = self._handles.get(t)
        if f is not None:
            self._handles.move_to_end(t)
            return f
        while len(self._handles) >= self.max_open_files:
            _, old = self._handles.popitem(last=False)
            old.close()
        f = self._handles[t] = open(self.tar_files[t], "rb")  # noqa: SIM115 - an LRU of open tars
        return f

    def read_bytes(self, i: int) -> bytes:
        """The raw bytes of image ``i`` (raises ``OSError`` if its tar cannot be opened or is short)."""
        t, offset, size = self.members[i]
        f = self._handle(t)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.tar_files[t]}: truncated at member {self.paths[i]} "
                          f"({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        """Close every open tar (reading again reopens them)."""
        while self._handles:
            self._handles.popitem(last=False)[1].close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getitem__(self, i: int):
        img = load_image(io.BytesIO(self.read_bytes(i)))
        return self.transform(img) if self.transform is not None else img

    def __getstate__(self):  # DataLoader workers open their own handles
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state


def _sidecar_captions(paths: Sequence[str]) -> Optional[list[Optional[str]]]:
    caps, found = [], False
    for p in paths:
        txt = os.path.splitext(p)[0] + ".txt"
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8-sig", errors="replace") as f:  # a byte-order mark is not text
                caps.append(f.read().strip())
            found = True
        else:
            caps.append(None)
    return caps if found else None


def _parquet_inputs(path: str, path_column: Optional[str], caption_column: Optional[str]):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    cols = table.column_names
    pcol = path_column or next((c for c in PATH_COLUMNS if c in cols), None)
    if pcol is None or pcol not in cols:
        raise ValueError(f"{path}: no image path column (looked for {path_column or ', '.join(PATH_COLUMNS)}; "
                         f"columns are {', '.join(cols)})")
    ccol = caption_column or next((c for c in CAPTION_COLUMNS if c in cols), None)
    if caption_column and caption_column not in cols:
        raise ValueError(f"{path}: no caption column {caption_column!r} (columns are {', '.join(cols)})")
    base = os.path.dirname(os.path.abspath(path))
    raw = table.column(pcol).to_pylist()
    for row, p in enumerate(raw):
        if not isinstance(p, str) or not p.strip():
            what = "null" if p is None else "empty" if isinstance(p, str) else f"{p!r:.40} ({type(p).__name__})"
            raise ValueError(f"{path}: column {pcol!r} row {row} is {what}: image paths must be non-empty strings")
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in raw]
    caps = table.column(ccol).to_pylist() if ccol else None
    if caps is not None:
        caps = [_one_caption(c, path, ccol, row) for row, c in enumerate(caps)]
        dropped = sum(len(c) - 1 for c in table.column(ccol).to_pylist() if isinstance(c, list) and len(c) > 1)
        if dropped:  # one row per image (text_emb/ is row-aligned with img_emb/): its first caption is indexed
            logger.warning("%s: column %r holds lists of captions; each image keeps its first, %d other %s not "
                           "indexed (one row per caption: give one caption per parquet row)", path, ccol, dropped,
                           "caption is" if dropped == 1 else "captions are")
    return paths, caps


def _one_caption(c, path: str, column: str, row: int) -> Optional[str]:
    """A caption cell: a string, null (no caption), or a list of strings (its first is kept); ``ValueError``
    naming file, column and row for anything else."""
    items = c if isinstance(c, list) else [c]
    for item in items:
        if item is not None and not isinstance(item, str):
            raise ValueError(f"{path}: column {column!r} row {row} holds {item!r:.40} ({type(item).__name__}): "
                             f"captions must be strings, lists of strings or null")
    return items[0] if items else None


def image_inputs(source: Union[str, os.PathLike, Sequence[str]], *, path_column: Optional[str] = None,
                 caption_column: Optional[str] = None):
    """``(images, captions)`` of a folder / list file / parquet / tar pattern / list of paths.

    Captions: ``.txt`` files next to the images (clip-retrieval's convention), the parquet caption column,
    or the ``.txt`` members of webdataset tars; ``None`` when there are none. A parquet caption cell may be a
    string, null or a list of strings: one row per image, so a list gives its first caption and the others
    are counted in a warning.

    Raises ``FileNotFoundError`` for a missing parquet / tar file, ``ValueError`` for a source with no images,
    a parquet without the path (or the named caption) column, or a parquet cell of the wrong type (a null,
    empty or non-string path, a caption that is not a string / list of strings / null), naming file, column
    and row.
    """
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
        return paths, _sidecar_captions(paths)
    src = os.fspath(source)
    if src.endswith(".parquet"):
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src}: no such parquet file")
        return _parquet_inputs(src, path_column, caption_column)
    if src.endswith(".tar") or (".tar" in src and any(c in src for c in "{*?[")):
        ds = TarImages(_tar_files(src))
        if len(ds) == 0:
            raise ValueError(f"{src}: the tar files hold no images")
        return ds, (ds.captions if any(c is not None for c in ds.captions) else None)
    paths = list_images(src)
    if not paths:
        raise ValueError(f"{src}: no images found")
    return paths, _sidecar_captions(paths)
