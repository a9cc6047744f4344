"""Search service: one or more index folders over HTTP (FastAPI on uvicorn), on top of :class:`Retriever`.

    app = create_app(["index_a/", "index_b/"])            # an ASGI app
    with background_server(app) as url: ...               # serve it on a free loopback port (tests, demos)

Endpoints (see docs/serve.md): ``/`` (the search page), ``GET /health``, ``GET /indices``, ``POST /search``
(JSON or a multipart image upload), ``GET /image/{index}/{id}``, ``GET /thumb/{index}/{id}``, and
clip-retrieval's back-end API ``GET /indices-list``, ``POST /knn-service``, ``POST /metadata``.

Every query runs through ``Retriever`` (encoder + ``search_embedding``): one search path. Concurrent queries to
one index are micro-batched: one worker per index takes every queued query, encodes the texts together and the
images together in a worker thread, searches, and fans the rows back out. When the previous batch held more
than one query (the service is under load) the worker also waits up to ``batch_wait_ms`` for more; an idle
service answers at once. Index folders are watched through their committed ``manifest.json``: a new commit
is loaded in the background and swapped in whole; a query sees either the old state or the new one.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import math
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("retrieval.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}
#: formats an uploaded query image may have (PIL decoders we accept; nothing exotic)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
DEDUP_THRESHOLD = 0.94  # clip-retrieval's back end: results closer than this (cosine) are duplicates


@dataclass
class ServeLimits:
    """Per-request bounds. Exceeding a size answers 413, a bad value 422, both with ``{"error": ...}``.

    ``max_k``: results per query; ``max_text_chars``: characters in a text query; ``max_upload_bytes``: bytes of
    an uploaded / base64 image (decoded); ``max_body_bytes``: bytes of a request body (default: room for a
    base64 upload); ``max_pixels``: decoded pixels of a query image (width × height, checked from the header
    before decoding); ``max_ids``: ids in one ``/metadata`` request; ``max_queue``: queries waiting per index
    (beyond it: 503).
    """

    max_k: int = 1000
    max_text_chars: int = 2000
    max_upload_bytes: int = 16 * 1024 * 1024
    max_body_bytes: Optional[int] = None
    max_pixels: int = 40_000_000
    max_ids: int = 1000
    max_queue: int = 1024

    def body_bytes(self) -> int:
        return self.max_body_bytes or (self.max_upload_bytes * 4) // 3 + 64 * 1024


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------------------------------ host / images
def check_host(host: str, allow_remote: bool) -> Optional[str]:
    """Refuse a non-loopback ``host`` unless ``allow_remote``; returns a warning line for an allowed one."""
    if host in LOOPBACK:
        return None
    if not allow_remote:
        raise ValueError(f"--host {host} is not a loopback address: the service has no authentication; pass "
                         f"--allow-remote to expose it anyway")
    return (f"warning: serving on {host}: anyone who can reach this address can query the index and read the "
            f"images its metadata references")


def decode_image(data: bytes, max_pixels: int):
    """Bytes → RGB ``PIL.Image`` read as the index builder reads files (:func:`internvit.data.load_image`: EXIF
    orientation applied, first frame, every mode to 8-bit RGB), refusing more than ``max_pixels`` decoded pixels
    (checked from the header, before any pixel is decoded, without changing PIL's process-wide limit). Raises
    :class:`ApiError` (413 too many pixels, 422 not an image)."""
    import warnings

    from PIL import Image, ImageOps

    from internvit.data import to_rgb

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            w, h = im.size
            if w * h > max_pixels:
                raise ApiError(413, f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
            if w < 1 or h < 1:
                raise ApiError(422, "image has no pixels")
            im.seek(0)
            im.load()
            if im.getexif().get(0x0112, 1) not in (1, None):  # EXIF orientation
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as e:
        raise ApiError(422, f"not a readable image ({type(e).__name__})") from None


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (np.generic,)):
        return _jsonable(v.item())
    if isinstance(v, bytes):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


# ------------------------------------------------------------------------------------------ index state
@dataclass
class IndexState:
    """One committed state of an index folder: its Retriever and the manifest signature it was loaded from."""

    retriever: Any
    signature: tuple
    generation: int
    encoder: Any = None
    encoder_error: Optional[str] = None
    transform: Any = None
    loaded_at: float = field(default_factory=time.time)
    _id_pos: Optional[np.ndarray] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def manifest(self) -> dict:
        return self.retriever.manifest

    def stored_vector(self, id_: int) -> np.ndarray:
        """The indexed vector of ``id_`` ``(D,)`` float32, reconstructed from the faiss index (exact for Flat
        and HNSW-Flat storage, the decoded code for PQ/SQ). Raises ``KeyError`` for an unknown id."""
        import faiss

        index = self.retriever.index
        top = faiss.downcast_index(index)
        with self._lock:
            if isinstance(top, faiss.IndexIDMap):
                if self._id_pos is None:
                    ids = faiss.vector_to_array(top.id_map)
                    order = np.argsort(ids, kind="stable")
                    self._id_pos = np.stack([ids[order], order])
                ids, order = self._id_pos
                j = int(np.searchsorted(ids, id_))
                if j >= len(ids) or ids[j] != id_:
                    raise KeyError(id_)
                return np.asarray(faiss.downcast_index(top.index).reconstruct(int(order[j])), np.float32)
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map(True)  # hash map: ids need not be contiguous
            try:
                return np.asarray(index.reconstruct(int(id_)), np.float32)
            except RuntimeError:
                raise KeyError(id_) from None


class _ChangedWhileLoading(RuntimeError):
    """The manifest changed during a load: the loaded pieces may belong to two commits; discard and retry."""


def manifest_signature(index_dir: str) -> Optional[tuple]:
    """``(inode, size, mtime_ns)`` of the committed manifest (``None`` when absent). Every commit replaces the
    file by an atomic rename, so a new commit always changes the inode."""
    try:
        st = os.stat(os.path.join(index_dir, "manifest.json"))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ServedIndex:
    """An index folder behind the service: its current :class:`IndexState`, hot reload, image files."""

    def __init__(self, name: str, index_dir: str, *, loader: Callable[..., Any], device=None, dtype=None,
                 tokenizer: Optional[str] = None, image_root: Optional[str] = None, preload: bool = True) -> None:
        self.name, self.dir = name, os.path.abspath(index_dir)
        self._loader, self.device, self.dtype, self.tokenizer = loader, device, dtype, tokenizer
        self.image_root = os.path.abspath(image_root) if image_root else os.getcwd()
        self.preload = preload
        self._swap = threading.Lock()
        self._generation = 0
        self.reload_error: Optional[str] = None
        self._failed_signature: Optional[tuple] = None
        self.state = self._load(None)

    # -- loading --------------------------------------------------------------------------------------
    def _load(self, previous: Optional[IndexState]) -> IndexState:
        """Load the committed state; raises ``_ChangedWhileLoading`` if the manifest changed meanwhile."""
        from . import IndexMismatchError

        before = manifest_signature(self.dir)
        if before is None:
            raise FileNotFoundError(f"{self.dir}: no manifest.json (not a finished index)")
        kw = dict(device=self.device, dtype=self.dtype, tokenizer=self.tokenizer)
        encoder = previous.encoder if previous is not None else None
        try:
            retriever = self._loader(self.dir, encoder, **kw)
        except IndexMismatchError:  # rebuilt with another encoder: load that one
            encoder = None
            retriever = self._loader(self.dir, None, **kw)
        for entry in retriever.manifest.get("metadata_files", []):  # open every metadata file of this commit now
            if entry.get("count"):
                retriever.metadata(entry["first_id"])
        error = None
        if self.preload and encoder is None:
            try:
                encoder = retriever.encoder
            except Exception as e:  # noqa: BLE001 - an index without a usable encoder still serves ids/vectors
                error = str(e).splitlines()[0] if str(e) else type(e).__name__
                logger.warning("%s: no query encoder (%s); text and image queries are refused", self.name, error)
        if manifest_signature(self.dir) != before:
            raise _ChangedWhileLoading(f"{self.dir}: the index changed while it was being loaded")
        self._generation += 1
        return IndexState(retriever, before, self._generation, encoder, error)

    def reload_if_changed(self) -> bool:
        """Load and swap in a new committed state if the manifest changed; ``True`` when swapped. A failed load
        (files of the commit missing, a commit in progress) keeps the current state and is retried once the
        manifest changes again (a load that raced a commit is retried at the next check)."""
        sig = manifest_signature(self.dir)
        if sig is None or sig == self.state.signature or sig == self._failed_signature:
            return False
        try:
            new = self._load(self.state)
        except _ChangedWhileLoading:
            return False  # retried at the next check, against the newer commit
        except Exception as e:  # noqa: BLE001 - missing files, a half-written folder, a bad manifest: keep serving
            self._fail(sig, e)
            return False
        with self._swap:
            self.state = new
        self.reload_error, self._failed_signature = None, None
        logger.info("%s: reloaded (generation %d, %d vectors)", self.name, new.generation, new.retriever.ntotal)
        return True

    def _fail(self, sig: tuple, e: BaseException) -> None:
        self._failed_signature = sig
        self.reload_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.warning("%s: could not load the new commit (%s); still serving generation %d", self.name,
                       self.reload_error, self.state.generation)

    def current(self) -> IndexState:
        with self._swap:
            return self.state

    # -- description / files --------------------------------------------------------------------------
    def describe(self) -> dict:
        st = self.current()
        m = st.manifest
        enc = m.get("encoder") or {}
        text_ok = st.encoder is not None and bool(getattr(st.encoder, "supports_text", False))
        return {"name": self.name, "kind": {"img": "image"}.get(m.get("kind", "img"), m.get("kind")),
                "model": enc.get("name"), "dim": m.get("dim"), "ntotal": m.get("ntotal"),
                "index_key": m.get("index_key"), "text_queries": text_ok,
                "image_queries": st.encoder is not None, "generation": st.generation,
                "encoder_error": st.encoder_error, "reload_error": self.reload_error}

    def image_file(self, st: IndexState, id_: int) -> str:
        """The image file that id ``id_``'s metadata names, resolved (absolute, or relative to the image root,
        then the index folder, then its parent). Raises :class:`ApiError` 404 when there is none."""
        row = st.retriever.metadata(int(id_))
        if not row:
            raise ApiError(404, f"index {self.name!r} has no id {id_}")
        path = row.get("image_path") or row.get("path")
        if not isinstance(path, str) or not path:
            raise ApiError(404, f"id {id_} has no image path in the metadata")
        if "::" in path:
            raise ApiError(404, f"id {id_} is a tar member; tar members are not served")
        candidates = [path] if os.path.isabs(path) else \
            [os.path.join(b, path) for b in (self.image_root, self.dir, os.path.dirname(self.dir))]
        for c in candidates:
            if os.path.splitext(c)[1].lower() in IMAGE_TYPES and os.path.isfile(c):
                return c
        raise ApiError(404, f"image of id {id_} not found ({os.path.basename(path)})")


# ------------------------------------------------------------------------------------------ batching
@dataclass
class _Query:
    kind: str  # 'text' | 'image' | 'vector' | 'id'
    payload: Any
    k: int
    future: asyncio.Future
    state: Optional[IndexState] = None


class Batcher:
    """One queue and one worker per index: queries are encoded together (texts, images) and searched grouped
    by ``k`` in a worker thread; each caller's future gets ``(rows, state)``."""

    def __init__(self, served: ServedIndex, executor: ThreadPoolExecutor, *, max_batch: int = 32,
                 batch_wait_ms: float = 2.0, max_queue: int = 1024, max_pixels: int = 40_000_000,
                 decode_pool: Optional[ThreadPoolExecutor] = None) -> None:
        self.served, self.executor = served, executor
        self.max_pixels, self.decode_pool = max_pixels, decode_pool
        self.max_batch, self.wait_s = max(1, int(max_batch)), max(0.0, batch_wait_ms) / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.task: Optional[asyncio.Task] = None
        self.last_batch = 0
        self.batches = 0
        self.queries = 0
        self.largest_batch = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, kind: str, payload: Any, k: int) -> tuple:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Query(kind, payload, k, fut))
        except asyncio.QueueFull:
            raise ApiError(503, f"index {self.served.name!r} is overloaded ({self.queue.maxsize} queries "
                                f"waiting); retry later") from None
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            if self.last_batch > 1 and self.wait_s > 0:  # under load: let a batch fill for a few ms
                deadline = loop.time() + self.wait_s
                while len(batch) < self.max_batch:
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                    except asyncio.TimeoutError:
                        break
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [q for q in batch if not q.future.done()]  # the client went away
            self.last_batch = len(batch)
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._work, batch)
            except Exception as e:  # noqa: BLE001 - never let the worker die
                logger.exception("%s: batch failed", self.served.name)
                results = [ApiError(500, f"search failed: {type(e).__name__}")] * len(batch)
            self.batches += 1
            self.queries += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            for q, r in zip(batch, results):
                if q.future.done():
                    continue
                if isinstance(r, BaseException):
                    q.future.set_exception(r)
                else:
                    q.future.set_result(r)

    def _work(self, batch: list) -> list:
        """Encode + search one batch against one state (never a mix): a result or an ApiError per query."""
        st = self.served.current()
        out: list = [None] * len(batch)
        vecs: dict[int, np.ndarray] = {}
        self._decode(batch, out)
        for kind in ("text", "image"):
            rows = [i for i, q in enumerate(batch) if q.kind == kind and out[i] is None]
            if not rows:
                continue
            if st.encoder is None and st.encoder_error is None:  # preload=False: build it on first use
                try:
                    st.encoder = st.retriever.encoder
                except Exception as e:  # noqa: BLE001
                    st.encoder_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            if st.encoder is None:
                msg = st.encoder_error or "the index records no encoder"
                for i in rows:
                    out[i] = ApiError(422, f"index {self.served.name!r} cannot encode {kind} queries: {msg}")
                continue
            if kind == "text" and not getattr(st.encoder, "supports_text", False):
                for i in rows:
                    out[i] = ApiError(422, f"index {self.served.name!r}: encoder {st.encoder.name!r} is image-only "
                                           f"(no text queries)")
                continue
            try:
                emb = self._encode(st, kind, [batch[i].payload for i in rows])
                vecs.update({i: emb[j] for j, i in enumerate(rows)})
            except Exception:  # noqa: BLE001 - isolate the query that fails
                for i in rows:
                    try:
                        vecs[i] = self._encode(st, kind, [batch[i].payload])[0]
                    except Exception as e:  # noqa: BLE001
                        out[i] = ApiError(422, f"could not encode the {kind} query: {str(e).splitlines()[0]}")
        dim = st.manifest["dim"]
        for i, q in enumerate(batch):
            if q.kind == "vector":
                v = q.payload
                if v.shape != (dim,):
                    out[i] = ApiError(422, f"embedding has {v.shape[0]} values; index {self.served.name!r} has "
                                           f"dim {dim}")
                else:
                    vecs[i] = v
            elif q.kind == "id":
                try:
                    vecs[i] = st.stored_vector(q.payload)
                except KeyError:
                    out[i] = ApiError(404, f"index {self.served.name!r} has no id {q.payload}")
                except Exception as e:  # noqa: BLE001
                    out[i] = ApiError(422, f"index {self.served.name!r} cannot return stored vectors: {e}")
        for k in sorted({batch[i].k for i in vecs}):
            rows = [i for i in vecs if batch[i].k == k]
            res = st.retriever.search_embedding(np.stack([vecs[i] for i in rows]), k)
            for j, i in enumerate(rows):
                out[i] = (res.rows[j], st)
        return out

    def _decode(self, batch: list, out: list) -> None:
        """Decode the image queries' bytes in place (in parallel when there are several); a bad one gets its
        ApiError in ``out``. Decoding here, not in the event loop, saves a thread hop per query."""
        rows = [i for i, q in enumerate(batch) if q.kind == "image" and isinstance(q.payload, bytes)]

        def dec(i):
            try:
                return decode_image(batch[i].payload, self.max_pixels)
            except ApiError as e:
                return e

        if len(rows) > 1 and self.decode_pool is not None:
            images = list(self.decode_pool.map(dec, rows))
        else:
            images = [dec(i) for i in rows]
        for i, im in zip(rows, images):
            if isinstance(im, ApiError):
                out[i] = im
            else:
                batch[i].payload = im

    @staticmethod
    def _encode(st: IndexState, kind: str, payloads: list) -> np.ndarray:
        if kind == "text":
            return np.asarray(st.encoder.encode_texts(payloads), np.float32)
        import torch

        if st.transform is None:  # the encoder's own preprocessing, built once per state
            pre = st.encoder.preprocess
            if callable(pre) and not isinstance(pre, dict):
                st.transform = pre
            else:
                from internvit.transforms import build_transform

                st.transform = build_transform(pre)
        x = torch.stack([st.transform(im) for im in payloads])
        return st.encoder.encode_images(x).float().cpu().numpy()


# ------------------------------------------------------------------------------------------ the app
def _index_names(index_dirs) -> dict:
    if isinstance(index_dirs, dict):
        return {str(k): os.fspath(v) for k, v in index_dirs.items()}
    if isinstance(index_dirs, (str, os.PathLike)):
        index_dirs = [index_dirs]
    names: dict = {}
    for d in index_dirs:
        d = os.fspath(d)
        name, sep, path = d.partition("=")
        if not sep or not name or os.path.exists(d):
            name, path = os.path.basename(os.path.normpath(d)) or "index", d
        base, n = name, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names[name] = path
    if not names:
        raise ValueError("no index folders given")
    return names


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
]


class _Guard:
    """ASGI middleware: bound the request head (``max_header_bytes``: 431) and body (``max_bytes``: 413, from
    Content-Length before reading, and while streaming a chunked body), and add the security headers to every
    response. Errors are JSON ``{"error": ...}``."""

    def __init__(self, app, max_bytes: int, max_header_bytes: int = 16 * 1024) -> None:
        self.app, self.max_bytes, self.max_header_bytes = app, int(max_bytes), int(max_header_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        started = False

        async def guarded_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                msg = dict(msg, headers=list(msg.get("headers", [])) + SECURITY_HEADERS)
            await send(msg)

        if sum(len(k) + len(v) for k, v in headers) + len(scope.get("raw_path") or b"") > self.max_header_bytes:
            return await _send_json(guarded_send, 431, {"error": f"request head over {self.max_header_bytes} bytes"})
        for k, v in headers:
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await _send_json(guarded_send, 400, {"error": "invalid Content-Length"})
                if n > self.max_bytes:
                    return await _send_json(guarded_send, 413, {"error": f"request body of {n} bytes is over the "
                                                                         f"limit of {self.max_bytes} bytes"})
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, f"request body is over the limit of {self.max_bytes} bytes")
            return msg

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ApiError as e:
            if not started:
                await _send_json(guarded_send, e.status, {"error": e.message})


async def _send_json(send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(index_dirs: Union[Sequence[Union[str, os.PathLike]], dict, str], *, device=None, dtype=None,
               tokenizer: Optional[str] = None, limits: Optional[ServeLimits] = None, batch_wait_ms: float = 2.0,
               max_batch: int = 32, reload_interval_s: float = 1.0, image_root: Optional[str] = None,
               loader: Optional[Callable[..., Any]] = None, preload: bool = True, threads: int = 2):
    """The ASGI app (FastAPI) serving ``index_dirs``: a list of folders (named by their base name; ``NAME=DIR``
    names one) or a ``{name: folder}`` dict.

    Each index is loaded now with ``loader(dir, encoder, device=, dtype=, tokenizer=)`` (default
    ``Retriever.load``) and its query encoder built (``preload``), so a broken folder fails here, not at the first
    query. ``device`` / ``dtype`` / ``tokenizer``: as for ``Retriever.load``. ``reload_interval_s``: how often the
    manifests are checked (0: never). ``image_root``: base of relative image paths (default: the current
    folder). ``threads``: worker threads for encoding and search. Raises ``RetrievalError`` / ``OSError`` for
    an unusable index folder, ``ValueError`` for bad arguments.
    """
    from . import Retriever

    limits = limits or ServeLimits()
    if loader is None:
        def loader(d, enc, **kw):
            return Retriever.load(d, enc, **kw)
    names = _index_names(index_dirs)
    served = {n: ServedIndex(n, d, loader=loader, device=device, dtype=dtype, tokenizer=tokenizer,
                             image_root=image_root, preload=preload) for n, d in names.items()}
    batchers: dict[str, Batcher] = {}
    decode_slots = threading.BoundedSemaphore(max(1, int(threads)))
    thumbs: OrderedDict = OrderedDict()
    thumbs_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app):  # worker threads live as long as the server (an app can be served again)
        executor = ThreadPoolExecutor(max_workers=max(1, int(threads)), thread_name_prefix="search")
        decode_pool = ThreadPoolExecutor(max_workers=max(1, int(threads)), thread_name_prefix="decode")
        for n, s in served.items():
            batchers[n] = Batcher(s, executor, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                  max_queue=limits.max_queue, max_pixels=limits.max_pixels,
                                  decode_pool=decode_pool)
            batchers[n].start()
        watcher = asyncio.get_running_loop().create_task(_watch()) if reload_interval_s > 0 else None
        try:
            yield
        finally:
            for t in [b.task for b in batchers.values()] + [watcher]:
                if t is not None:
                    t.cancel()
            executor.shutdown(wait=False, cancel_futures=True)
            decode_pool.shutdown(wait=False, cancel_futures=True)

    async def _watch():
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(reload_interval_s)
            for s in served.values():
                try:
                    await loop.run_in_executor(None, s.reload_if_changed)
                except Exception:  # noqa: BLE001 - the watcher must survive anything
                    logger.exception("%s: reload check failed", s.name)

    app = FastAPI(title="internvit retrieval", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.served, app.state.batchers, app.state.limits = served, batchers, limits

    def err(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return err(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return err(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return err(422, "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        logger.exception("unexpected error")
        return err(500, f"internal error ({type(e).__name__})")

    # -- helpers --------------------------------------------------------------------------------------
    def get_index(name: Optional[str]) -> ServedIndex:
        if name is None or name == "":
            if len(served) == 1:
                return next(iter(served.values()))
            raise ApiError(422, f"several indexes are served ({', '.join(served)}): name one with 'index'")
        if not isinstance(name, str) or name not in served:
            raise ApiError(404, f"no index named {str(name)[:100]!r} (served: {', '.join(served)})")
        return served[name]

    def check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            if isinstance(k, str) and k.strip().isdigit():
                k = int(k.strip())
            else:
                raise ApiError(422, "k must be an integer")
        if not 1 <= k <= limits.max_k:
            raise ApiError(422, f"k must be between 1 and {limits.max_k}, got {k}")
        return k

    def check_text(t: Any) -> str:
        if not isinstance(t, str) or not t.strip():
            raise ApiError(422, "text must be a non-empty string")
        if len(t) > limits.max_text_chars:
            raise ApiError(413, f"text query of {len(t)} characters is over the limit of {limits.max_text_chars}")
        return t

    def b64_image(s: Any) -> bytes:
        if not isinstance(s, str) or not s:
            raise ApiError(422, "image must be a base64 string")
        if s.startswith("data:"):
            s = s.partition(",")[2]
        if len(s) > (limits.max_upload_bytes * 4) // 3 + 8:
            raise ApiError(413, f"image is over the limit of {limits.max_upload_bytes} bytes")
        try:
            return base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "image is not valid base64") from None

    def check_vector(v: Any) -> np.ndarray:
        if not isinstance(v, list) or not v or len(v) > 65536:
            raise ApiError(422, "embedding must be a non-empty list of numbers")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
            raise ApiError(422, "embedding must be a list of numbers")
        arr = np.asarray(v, np.float32)
        if not np.isfinite(arr).all():
            raise ApiError(422, "embedding contains NaN or inf")
        return arr

    def check_id(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62:
            raise ApiError(422, "id must be a non-negative integer")
        return v

    def check_image_bytes(data: bytes) -> bytes:
        if len(data) > limits.max_upload_bytes:
            raise ApiError(413, f"image of {len(data)} bytes is over the limit of {limits.max_upload_bytes}")
        if not data:
            raise ApiError(422, "empty image")
        return data  # decoded by the index's batch worker (decode_image: pixel limit, formats)

    async def read_json(request: Request) -> dict:
        body = await request.body()  # the body-limit middleware bounds this
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ApiError(422, "the request body must be a JSON object")
        return obj

    def result_rows(s: ServedIndex, rows: list) -> list:
        out = []
        for r in rows:
            d = {k: _jsonable(v) for k, v in r.items()}
            p = r.get("image_path") or r.get("path")
            if isinstance(p, str) and p and "::" not in p:
                d["image_url"] = f"/image/{s.name}/{r['id']}"
                d["thumb_url"] = f"/thumb/{s.name}/{r['id']}"
            out.append(d)
        return out

    async def run_query(s: ServedIndex, kind: str, payload: Any, k: int) -> tuple:
        if kind == "image":
            payload = check_image_bytes(payload)
        return await batchers[s.name].submit(kind, payload, k)

    # -- our API --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "indices": {n: s.current().generation for n, s in served.items()}}

    @app.get("/indices")
    async def indices():
        return {"indices": [s.describe() for s in served.values()]}

    @app.post("/search")
    async def search(request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
            except ApiError:
                raise
            except Exception:  # noqa: BLE001 - malformed multipart
                raise ApiError(400, "malformed multipart body") from None
            fields = {k: v for k, v in form.multi_items()}
            upload = fields.get("image")
            q: dict = {"index": fields.get("index"), "k": fields.get("k", 10)}
            if upload is not None and not isinstance(upload, str):
                data = await upload.read(limits.max_upload_bytes + 1)
                await form.close()
                q["_bytes"] = data
            elif "text" in fields:
                q["text"] = fields["text"]
            elif "id" in fields:
                try:
                    q["id"] = int(fields["id"])
                except ValueError:
                    raise ApiError(422, "id must be an integer") from None
        else:
            q = await read_json(request)
        s = get_index(q.get("index"))
        k = check_k(q.get("k", 10))
        given = [f for f in ("text", "image", "embedding", "id", "_bytes") if q.get(f) is not None]
        if len(given) != 1:
            raise ApiError(422, "give exactly one of text, image, embedding or id")
        f = given[0]
        if f == "text":
            rows, st = await run_query(s, "text", check_text(q["text"]), k)
        elif f in ("image", "_bytes"):
            data = q["_bytes"] if f == "_bytes" else b64_image(q["image"])
            rows, st = await run_query(s, "image", data, k)
        elif f == "embedding":
            rows, st = await run_query(s, "vector", check_vector(q["embedding"]), k)
        else:
            rows, st = await run_query(s, "id", check_id(q["id"]), k)
        return {"index": s.name, "generation": st.generation, "k": k, "results": result_rows(s, rows)}

    async def _image_path(index: str, id_: int) -> tuple:
        s = get_index(index)
        if id_ < 0:
            raise ApiError(404, f"index {index!r} has no id {id_}")
        st = s.current()
        path = await asyncio.get_running_loop().run_in_executor(None, s.image_file, st, id_)
        return s, path

    @app.get("/image/{index}/{id_}")
    async def image(index: str, id_: int):
        _, path = await _image_path(index, id_)
        return FileResponse(path, media_type=IMAGE_TYPES[os.path.splitext(path)[1].lower()],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/thumb/{index}/{id_}")
    async def thumb(index: str, id_: int, size: int = 256):
        if not 16 <= size <= 1024:
            raise ApiError(422, "size must be between 16 and 1024")
        s, path = await _image_path(index, id_)
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size, size)
        with thumbs_lock:
            data = thumbs.get(key)
            if data is not None:
                thumbs.move_to_end(key)
        if data is None:
            def make() -> bytes:
                from PIL import Image

                with decode_slots:
                    with open(path, "rb") as fh:
                        raw = fh.read(limits.max_upload_bytes * 4 + 1)
                    im = decode_image(raw, limits.max_pixels * 4)
                im.thumbnail((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
                return buf.getvalue()
            data = await asyncio.get_running_loop().run_in_executor(None, make)
            with thumbs_lock:
                thumbs[key] = data
                while len(thumbs) > 512:
                    thumbs.popitem(last=False)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    # -- clip-retrieval's back-end API ------------------------------------------------------------------
    @app.get("/indices-list")
    async def indices_list():
        return list(served)

    @app.post("/knn-service")
    async def knn_service(request: Request):
        q = await read_json(request)  # clip-retrieval's client posts JSON without a content type
        s = get_index(q.get("indice_name"))
        modality = q.get("modality", "image")
        kind = {"img": "image"}.get(s.current().manifest.get("kind", "img"), "text")
        if modality not in ("image", "text"):
            raise ApiError(422, "modality must be 'image' or 'text'")
        if modality != kind:
            raise ApiError(422, f"index {s.name!r} holds {kind} embeddings; query it with modality={kind!r}")
        if q.get("use_mclip"):
            raise ApiError(422, "use_mclip is not supported: queries are encoded with the index's own encoder")
        if q.get("image_url"):
            raise ApiError(422, "image_url is not supported (the service never fetches URLs): send the image "
                                "as base64 in 'image'")
        num_images = check_k(q.get("num_images", 100))
        num_ids = q.get("num_result_ids")
        num_ids = num_images if num_ids is None else check_k(num_ids)
        dedup = bool(q.get("deduplicate", False))
        search_k = min(limits.max_k, max(num_images, num_ids))
        text, img, emb = q.get("text"), q.get("image"), q.get("embedding_input")
        if text not in (None, ""):
            rows, st = await run_query(s, "text", check_text(text), search_k)
        elif img is not None:
            rows, st = await run_query(s, "image", b64_image(img), search_k)
        elif emb is not None:
            rows, st = await run_query(s, "vector", check_vector(emb), search_k)
        else:
            raise ApiError(422, "must fill one of text, image and embedding_input")
        if dedup and len(rows) > 1:
            rows = await asyncio.get_running_loop().run_in_executor(None, _dedup, st, rows)
        out = []
        base = str(request.base_url).rstrip("/")
        for r in rows[:num_images]:
            d = {k: _jsonable(v) for k, v in r.items() if k not in ("id", "score")}
            p = r.get("image_path") or r.get("path")
            if "url" not in d and isinstance(p, str) and p and "::" not in p:
                d["url"] = f"{base}/image/{s.name}/{r['id']}"
            d["id"], d["similarity"] = int(r["id"]), float(r["score"])
            out.append(d)
        return out

    @app.post("/metadata")
    async def metadata(request: Request):
        q = await read_json(request)
        s = get_index(q.get("indice_name"))
        ids = q.get("ids")
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ApiError(422, "ids must be a list of integers")
        if len(ids) > limits.max_ids:
            raise ApiError(413, f"{len(ids)} ids is over the limit of {limits.max_ids}")
        st = s.current()

        def work():
            return [{"id": i, "metadata": {k: _jsonable(v) for k, v in
                                           (st.retriever.metadata(i) if i >= 0 else {}).items()}} for i in ids]
        return await asyncio.get_running_loop().run_in_executor(None, work)

    # -- the page ---------------------------------------------------------------------------------------
    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_Guard, max_bytes=limits.body_bytes())
    return app


def _dedup(st: IndexState, rows: list) -> list:
    """clip-retrieval's deduplication: results whose stored vectors are within cosine ``DEDUP_THRESHOLD`` form
    connected groups; each group keeps its best-ranked member."""
    try:
        vecs = np.stack([st.stored_vector(int(r["id"])) for r in rows])
    except Exception:  # noqa: BLE001 - an index that cannot return vectors is not deduplicated
        return rows
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    close = vecs @ vecs.T >= DEDUP_THRESHOLD
    group = list(range(len(rows)))

    def root(i):
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(close, 1))):
        a, b = root(int(i)), root(int(j))
        if a != b:
            group[max(a, b)] = min(a, b)
    return [r for i, r in enumerate(rows) if root(i) == i]


# ------------------------------------------------------------------------------------------ running it
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 60.0,
                      log_level: str = "warning", **uvicorn_kw) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port``) once it
    accepts connections, and stops it on exit. ``port=0`` picks a free port."""
    import uvicorn

    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", **uvicorn_kw)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
