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
The index state, limits, image decoding and the batching worker live in :mod:`retrieval.serve_core`.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence, Union
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .serve_core import (  # noqa: F401 - re-exported: the service's public names live here
    DEDUP_THRESHOLD,
    IMAGE_TYPES,
    LOOPBACK,
    ApiError,
    Batcher,
    IndexState,
    ServedIndex,
    ServeLimits,
    _dedup,
    _json_type,
    _jsonable,
    as_id,
    as_int,
    check_fields,
    check_host,
    decode_image,
    manifest_signature,
    parse_json_body,
)

logger = logging.getLogger("retrieval.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

#: the fields of each request body (anything else is a 422 naming it: a typo is never silently ignored)
SEARCH_FIELDS = ("index", "k", "text", "image", "embedding", "id")
FORM_FIELDS = ("index", "k", "text", "image", "id")
#: clip-retrieval's ClipClient and front end send all of these (the filters they name are not implemented:
#: use_mclip and image_url are refused when set; the safety / violence / aesthetic options are accepted and ignored)
KNN_FIELDS = ("text", "image", "image_url", "embedding_input", "deduplicate", "use_safety_model",
              "use_violence_detector", "indice_name", "use_mclip", "aesthetic_score", "aesthetic_weight", "modality",
              "num_images", "num_result_ids", "verbose")
METADATA_FIELDS = ("indice_name", "ids")


class _NotUtf8(Exception):
    """A multipart text field that is not UTF-8 (Starlette would decode it as latin-1: mojibake searched)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _strict_form_parser():
    """Starlette's multipart parser with text fields decoded as UTF-8 strictly (:class:`_NotUtf8` otherwise)."""
    from starlette.formparsers import MultiPartParser

    class StrictForm(MultiPartParser):
        def on_part_end(self) -> None:
            part = self._current_part
            if part.file is None:
                try:
                    bytes(part.data).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _NotUtf8(f"form field {part.field_name[:40]!r} is not UTF-8 text (byte "
                                   f"0x{part.data[e.start]:02x} at offset {e.start})") from None
            super().on_part_end()

    return StrictForm


# ------------------------------------------------------------------------------------------ the app
def _index_names(index_dirs) -> dict:
    """``{name: folder, or [folders] of a group}`` from create_app's ``index_dirs`` (a group: a list value, or
    ``NAME=DIR1,DIR2``; :func:`retrieval.sharded.parse_group`)."""
    from .sharded import parse_group

    if isinstance(index_dirs, dict):
        out = {str(k): os.fspath(v) if isinstance(v, (str, os.PathLike)) else [os.fspath(x) for x in v]
               for k, v in index_dirs.items()}
        for name in out:
            check_index_name(name, name)
        if not out:
            raise ValueError("no index folders given")
        return out
    if isinstance(index_dirs, (str, os.PathLike)):
        index_dirs = [index_dirs]
    names: dict = {}
    given: dict = {}
    for d in index_dirs:
        d = os.fspath(d)
        name, sep, path = d.partition("=")
        group = parse_group(d)
        if group is not None:
            name, path = group
        elif not sep or not name or os.path.exists(d):  # named by the folder (".": the current folder's name)
            name, path = os.path.basename(os.path.abspath(d)) or "index", d
        check_index_name(name, d)
        if not path:
            raise ValueError(f"index argument {d!r}: no folder after {name + '=' if sep else ''!r} (give NAME=DIR)")
        if name in names:  # a renamed duplicate would serve one of them under a name nobody chose
            raise ValueError(f"two indexes are named {name!r} ({given[name]} and {d}): give each its own name "
                             f"with NAME=DIR")
        names[name], given[name] = path, d
    if not names:
        raise ValueError("no index folders given")
    return names


def check_index_name(name: str, given: str) -> None:
    """Refuse an index name the service cannot route (``ValueError`` naming the argument ``given``): empty,
    ``.`` / ``..`` (clients resolve them away in ``/image/{index}/{id}``), or holding ``/`` (a path separator even
    when percent-encoded) or a control character. Every other name works: URLs carry it percent-encoded
    (:func:`index_url`)."""
    why = ("is empty" if not name else "is '.' or '..'" if name in (".", "..") else
           "contains '/'" if "/" in name else
           "contains a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name) else None)
    if why:
        raise ValueError(f"index argument {given!r}: the index name {name!r} {why}, so it cannot appear in the "
                         f"service's URLs; give another name with NAME=DIR")


def check_public_url(url: str) -> str:
    """``url`` (the address clients reach the service at, behind a proxy) without its trailing ``/``, checked:
    ``http`` or ``https``, a host (and a valid port), no user name, query or fragment. ``ValueError`` saying what is
    wrong otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the public URL is empty")
    parts = urlsplit(url.strip())
    why = None
    if parts.scheme not in ("http", "https"):
        why = "must start with http:// or https://"
    elif not parts.hostname:
        why = "has no host name"
    elif parts.username is not None or parts.password is not None:
        why = "must not hold a user name or password"
    elif parts.query or parts.fragment or "?" in url or "#" in url:
        why = "must not hold a query (?) or fragment (#)"
    elif any(c.isspace() or ord(c) < 32 for c in url.strip()):
        why = "must not hold spaces or control characters"
    if why is None:
        try:
            parts.port  # noqa: B018 - raises for a port that is not a number 0..65535
        except ValueError:
            why = "has an invalid port"
    if why:
        raise ValueError(f"public URL {url!r} {why} (e.g. https://example.org/search/)")
    return url.strip().rstrip("/")


def index_url(route: str, name: str, id_: int) -> str:
    """The path ``/{route}/{name}/{id}`` of an index's item, the name percent-encoded (a name may hold spaces,
    ``#``, ``?``, ``%`` or non-ASCII letters)."""
    from urllib.parse import quote

    return f"/{route}/{quote(name, safe='')}/{int(id_)}"


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
        problem = query_problem(scope.get("path", ""), scope.get("query_string") or b"")
        if problem:
            return await _send_json(guarded_send, 422, {"error": problem})
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


#: the query-string parameters each API route reads (the page and its static files take any: links may carry some)
QUERY_PARAMS = {"/thumb/": ("size",)}


def query_problem(path: str, query_string: bytes) -> Optional[str]:
    """Why the query string of a request to ``path`` is refused, else ``None``: a parameter the route does not
    read (``POST /search?k=5`` would be answered with the default k as if it were not sent) or one given twice
    (``?size=64&size=512``: which one counts would be the framework's choice)."""
    if not query_string or path == "/" or path.startswith("/static/"):
        return None
    from urllib.parse import parse_qsl

    names = [k for k, _ in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)]
    allowed = next((v for p, v in QUERY_PARAMS.items() if path.startswith(p)), ())
    unknown = [k for k in names if k not in allowed]
    if unknown:
        return (f"unknown query parameter {unknown[0][:40]!r} for {path[:60]} (" +
                (f"it reads {', '.join(allowed)}" if allowed else "it takes no query parameters; a query's fields "
                 "go in the request body") + ")")
    dup = [k for k, c in collections.Counter(names).items() if c > 1]
    return f"query parameter {dup[0][:40]!r} is given more than once: give each parameter once" if dup else None


def is_multipart(content_type: Union[str, bytes]) -> bool:
    """Whether a Content-Type header names a multipart form (media types are case-insensitive: RFC 9110)."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.strip().lower().startswith("multipart/form-data")


def json_bytes(obj: Any) -> bytes:
    """``obj`` (already JSON-safe: :func:`_jsonable`) as compact UTF-8 JSON, as Starlette's ``JSONResponse``
    writes it. Raises ``ValueError`` for a NaN or infinity."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def json_response(obj: Any, status: int = 200) -> Response:
    """A JSON answer written directly: the hot endpoints skip FastAPI's response validation and
    ``jsonable_encoder`` (a recursive walk that cost more than the HTTP handling itself)."""
    return Response(json_bytes(obj), status_code=status, media_type="application/json")


class _FastJson:
    """ASGI middleware: the JSON query endpoints (``POST /search`` with a JSON body, ``POST /knn-service``)
    answered directly, without FastAPI's routing, dependency and exception layers (per-request overhead that a
    one-client query pays in full). Same handlers, same answers and ``{"error": ...}`` errors as the routes,
    which still serve everything else (the multipart upload, other methods)."""

    def __init__(self, app, routes: dict, parse: Callable[[bytes], dict]) -> None:
        self.app, self.routes, self.parse = app, routes, parse

    async def __call__(self, scope, receive, send):
        handler = self.routes.get(scope.get("path")) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if handler is None or (scope["path"] == "/search" and any(
                k == b"content-type" and is_multipart(v) for k, v in scope["headers"])):
            return await self.app(scope, receive, send)
        chunks = []
        while True:  # the body limit is enforced by the receive the guard hands in
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        try:
            body = json_bytes(await handler(self.parse(b"".join(chunks)), scope))
            status = 200
        except ApiError as e:
            body, status = json_bytes({"error": e.message}), e.status
        except Exception as e:  # noqa: BLE001 - as the app's own handler of unexpected errors
            logger.exception("unexpected error")
            body, status = json_bytes({"error": f"internal error ({type(e).__name__})"}), 500
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()),
                                (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _ServiceApp(FastAPI):
    """The FastAPI app behind the service's own outer layers: ``front`` (the :class:`_Guard` around the
    :class:`_FastJson` path) sees every request first, so a JSON query goes from uvicorn to its handler without
    passing through FastAPI's and Starlette's middleware stack (whose error, telemetry and routing layers cost
    a one-client query more than its HTTP parsing); everything else continues into FastAPI."""

    front: Optional[Callable] = None

    async def __call__(self, scope, receive, send) -> None:
        if self.front is None:
            return await super().__call__(scope, receive, send)
        return await self.front(scope, receive, send)

    async def framework(self, scope, receive, send) -> None:
        """FastAPI's own ASGI entry (the routes, its middleware and exception handlers)."""
        return await super().__call__(scope, receive, send)


async def _send_json(send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(index_dirs: Union[Sequence[Union[str, os.PathLike]], dict, str], *, device=None, dtype=None,
               tokenizer: Optional[str] = None, limits: Optional[ServeLimits] = None, batch_wait_ms: float = 2.0,
               max_batch: int = 32, reload_interval_s: float = 1.0, image_root: Optional[str] = None,
               loader: Optional[Callable[..., Any]] = None, preload: bool = True, threads: int = 2,
               inline_ms: float = 20.0, public_url: Optional[str] = None):
    """The ASGI app (FastAPI) serving ``index_dirs``: a list of folders (named by their base name; ``NAME=DIR``
    names one; ``NAME=DIR1,DIR2`` is a group) or a ``{name: folder or [folders]}`` dict. A group of folders is
    served as one index (a :class:`~retrieval.sharded.ShardedRetriever`: global ids, results merged by score).

    Each index is loaded now with ``loader(dir, encoder, device=, dtype=, tokenizer=)`` (default
    ``Retriever.load``) and its query encoder built (``preload``), so a broken folder fails here, not at the first
    query. ``device`` / ``dtype`` / ``tokenizer``: as for ``Retriever.load``. ``reload_interval_s``: how often the
    manifests are checked (0: never). ``image_root``: base of relative image paths (default: the current
    folder). ``threads``: batches encoded and searched at once (each index has one worker thread), and the
    threads that decode query images in parallel. ``inline_ms``: a lone query on an idle index runs on the event
    loop thread (no thread hand-off) while lone queries take at most this long (0: always in the worker thread;
    :class:`~retrieval.serve_core.Batcher`). ``public_url``: the URL clients reach the service at when it runs
    behind a reverse proxy (``https://example.org/search/``; :func:`check_public_url`): ``/knn-service`` result
    ``url`` values start with it (default: the URL the request came to), and ``/search``'s ``image_url`` /
    ``thumb_url`` start with its path. Raises ``RetrievalError`` / ``OSError`` for an unusable index folder,
    ``ValueError`` for bad arguments.
    """
    from . import Retriever

    limits = limits or ServeLimits()
    public_url = check_public_url(public_url) if public_url is not None else None
    prefix = urlsplit(public_url).path if public_url else ""  # the proxy's path in front of ours
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
        slots = threading.BoundedSemaphore(max(1, int(threads)))  # batches running at once, all indexes
        decode_pool = ThreadPoolExecutor(max_workers=max(1, int(threads)), thread_name_prefix="decode")
        for n, s in served.items():
            batchers[n] = Batcher(s, slots, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                  max_queue=limits.max_queue, max_pixels=limits.max_pixels,
                                  decode_pool=decode_pool, inline_ms=inline_ms)
            batchers[n].start()
        watcher = asyncio.get_running_loop().create_task(_watch()) if reload_interval_s > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            for b in batchers.values():
                b.stop()
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

    app = _ServiceApp(title="internvit retrieval", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.served, app.state.batchers, app.state.limits = served, batchers, limits

    def err(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return err(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):  # its headers too: a 405 says what is allowed (Allow)
        return err(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        try:  # name the field: ("query", "size") -> "size"
            loc = [str(x) for x in e.errors()[0]["loc"] if x not in ("body", "query", "path")]
        except (IndexError, KeyError, TypeError):
            loc = []
        return err(422, f"invalid {'.'.join(loc)}" if loc else "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        logger.exception("unexpected error")
        return err(500, f"internal error ({type(e).__name__})")

    # -- helpers --------------------------------------------------------------------------------------
    def get_index(name: Optional[str], field: str = "index") -> ServedIndex:
        if name is not None and not isinstance(name, str):
            shown = repr(name)[:40] if isinstance(name, (int, float)) else "a JSON " + _json_type(name)
            raise ApiError(422, f"{field} must be a string (an index name), got {shown}")
        if name is None or name == "":
            if len(served) == 1:
                return next(iter(served.values()))
            raise ApiError(422, f"several indexes are served ({', '.join(served)}): name one with {field!r}")
        if not isinstance(name, str) or name not in served:
            raise ApiError(404, f"no index named {str(name)[:100]!r} (served: {', '.join(served)})")
        return served[name]

    def check_k(k: Any, name: str = "k") -> int:
        k = as_int(k, name)  # the one integer rule (serve_core.as_int): JSON and form fields alike
        if not 1 <= k <= limits.max_k:
            raise ApiError(422, f"{name} must be between 1 and {limits.max_k}, got {k}")
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
        if any(c in s for c in " \t\r\n"):  # MIME base64 (and many encoders) break lines every 76 characters
            s = "".join(s.split())
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

    def check_id(v: Any, name: str = "id") -> int:
        return as_id(v, name)  # the one id rule of every endpoint (serve_core.as_id)

    def check_image_bytes(data: bytes) -> bytes:
        if len(data) > limits.max_upload_bytes:
            raise ApiError(413, f"image of {len(data)} bytes is over the limit of {limits.max_upload_bytes}")
        if not data:
            raise ApiError(422, "empty image")
        return data  # decoded by the index's batch worker (decode_image: pixel limit, formats)

    async def read_json(request: Request) -> dict:
        return parse_json(await request.body())  # the body-limit middleware bounds the body

    parse_json = parse_json_body  # every JSON body (both paths, /search, /knn-service, /metadata) parses here

    def result_rows(s: ServedIndex, rows: list) -> list:
        out = []
        for r in rows:
            d = {k: _jsonable(v) for k, v in r.items()}
            d["id_str"] = str(int(r["id"]))  # exact in JavaScript too (a JSON number above 2**53 is rounded)
            p = r.get("image_path") or r.get("path")
            if isinstance(p, str) and p and "::" not in p:
                d["image_url"] = prefix + index_url("image", s.name, r["id"])
                d["thumb_url"] = prefix + index_url("thumb", s.name, r["id"])
            out.append(d)
        return out

    async def run_query(s: ServedIndex, kind: str, payload: Any, k: int) -> tuple:
        if kind == "image":
            payload = check_image_bytes(payload)
        return await batchers[s.name].submit(kind, payload, k)

    # -- our API --------------------------------------------------------------------------------------
    def get_route(path: str):  # GET routes answer HEAD too (FastAPI's own routes answer GET only)
        return app.api_route(path, methods=["GET", "HEAD"])

    @get_route("/health")
    async def health():
        errors = {n: s.reload_error for n, s in served.items() if s.reload_error}
        return {"status": "degraded" if errors else "ok",
                "indices": {n: s.current().generation for n, s in served.items()},
                **({"reload_errors": errors} if errors else {})}

    @get_route("/indices")
    async def indices():
        return {"indices": [s.describe() for s in served.values()],
                "limits": {"max_k": limits.max_k, "max_text_chars": limits.max_text_chars,
                           "max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels}}

    @app.post("/search")
    async def search(request: Request):
        if is_multipart(request.headers.get("content-type", "")):
            return json_response(await search_query(*await read_form(request)))
        return json_response(await search_query(await read_json(request)))

    async def read_form(request: Request) -> tuple:
        """A multipart ``/search`` form as ``(fields, image file bytes or None)``: the JSON body it stands for,
        checked by the same rules in :func:`search_query` (one query, known fields, limits)."""
        # a text field may hold max_text_chars characters of up to 4 UTF-8 bytes: longer is a 413 below
        part_limit = max(64 * 1024, 4 * limits.max_text_chars + 1024)
        parser = _strict_form_parser()(request.headers, request.stream(), max_files=2, max_fields=8,
                                       max_part_size=part_limit)
        try:  # 2 files: a second image is refused by name below (the body limit bounds both)
            form = await parser.parse()
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - malformed multipart
            detail = str(getattr(e, "message", "") or e).splitlines()[0][:100] if str(e) else ""
            if "files" in detail.lower():
                raise ApiError(422, "more than one file was sent: send one image in the field 'image'") from None
            if "exceeded maximum size" in detail:
                raise ApiError(413, f"a form field is over the limit of {part_limit} bytes (text queries: "
                                    f"{limits.max_text_chars} characters)") from None
            if isinstance(e, _NotUtf8):
                raise ApiError(422, detail) from None
            raise ApiError(400, "malformed multipart body" + (f" ({detail})" if detail else "")) from None
        try:
            items = form.multi_items()
            counts = collections.Counter(k for k, _ in items)
            repeated = sorted(k for k, c in counts.items() if c > 1)
            if repeated:
                what = ("two images were sent in the field 'image'" if repeated == ["image"] else
                        f"field {repeated[0]!r} was given {counts[repeated[0]]} times")
                raise ApiError(422, f"{what}: give each field once")
            files = [k for k, v in items if not isinstance(v, str)]
            if len(files) > 1:
                raise ApiError(422, f"two images were sent (fields {', '.join(map(repr, files))}): send one image "
                                    f"in the field 'image'")
            fields = dict(items)
            check_fields(fields, FORM_FIELDS, "the search form")
            if files and files[0] != "image":
                raise ApiError(422, f"a file was sent in the field {files[0]!r}: send the image in the field 'image'")
            upload = fields.pop("image", None)
            if isinstance(upload, str):
                raise ApiError(422, "the field 'image' must be a file upload (or send base64 in a JSON body)")
            data = None if upload is None else await upload.read(limits.max_upload_bytes + 1)
            return fields, data  # text, id, index, k: checked as the JSON fields are
        finally:
            await form.close()

    async def search_query(q: dict, upload: Optional[bytes] = None) -> dict:
        """``POST /search``'s answer to a parsed body (``upload``: the image file of a multipart form). The one
        place of /search's rules: known fields only, exactly one query, the limits."""
        check_fields(q, SEARCH_FIELDS, "/search")
        s = get_index(q.get("index"))
        k = check_k(q.get("k", 10))
        given = [f for f in ("text", "image", "embedding", "id") if q.get(f) is not None or
                 (f == "image" and upload is not None)]
        if len(given) != 1:
            raise ApiError(422, "give exactly one of text, image, embedding or id" +
                           (f" (got {' and '.join(given)})" if given else ""))
        f = given[0]
        if f == "text":
            rows, st = await run_query(s, "text", check_text(q["text"]), k)
        elif f == "image":
            data = upload if upload is not None else b64_image(q["image"])
            rows, st = await run_query(s, "image", data, k)
        elif f == "embedding":
            rows, st = await run_query(s, "vector", check_vector(q["embedding"]), k)
        else:
            rows, st = await run_query(s, "id", check_id(q["id"]), k)
        return {"index": s.name, "generation": st.generation, "k": k, "results": result_rows(s, rows)}

    async def _image_file(index: str, id_: str) -> tuple:
        """``(open file, media type, stat)`` of the image of ``id_`` (:meth:`ServedIndex.image_file`)."""
        s = get_index(index)
        id_ = check_id(id_)  # the id rule of /search and /metadata: "3.0", "abc", -1, 2**63 are a 422 naming id
        st = s.current()
        return await asyncio.get_running_loop().run_in_executor(None, s.image_file, st, id_)

    @get_route("/image/{index}/{id_}")
    async def image(index: str, id_: str):
        f, media, st = await _image_file(index, id_)

        def chunks():  # the bytes of the file that was checked (never the path opened again)
            with f:
                while True:
                    block = f.read(1 << 16)
                    if not block:
                        return
                    yield block

        return StreamingResponse(chunks(), media_type=media, headers={"Cache-Control": "no-cache"})

    @get_route("/thumb/{index}/{id_}")
    async def thumb(index: str, id_: str, size: str = "256"):
        size = as_int(size, "size")
        if not 16 <= size <= 1024:
            raise ApiError(422, "size must be between 16 and 1024")
        f, _, st = await _image_file(index, id_)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, size)
        with thumbs_lock:
            data = thumbs.get(key)
            if data is not None:
                thumbs.move_to_end(key)
        if data is None:
            def make() -> bytes:
                from PIL import Image

                with decode_slots, f:
                    raw = f.read(limits.max_upload_bytes * 4 + 1)
                    try:
                        im = decode_image(raw, limits.max_pixels * 4)
                    except ApiError as e:  # the stored file, not the request, is bad: no client error
                        raise ApiError(404, f"image of id {id_} cannot be read ({e.message})") from None
                im.thumbnail((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
                return buf.getvalue()
            data = await asyncio.get_running_loop().run_in_executor(None, make)
            with thumbs_lock:
                thumbs[key] = data
                while len(thumbs) > 512:
                    thumbs.popitem(last=False)
        else:
            f.close()
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    # -- clip-retrieval's back-end API ------------------------------------------------------------------
    @get_route("/indices-list")
    async def indices_list():
        return list(served)

    @app.post("/knn-service")
    async def knn_service(request: Request):
        q = await read_json(request)  # clip-retrieval's client posts JSON without a content type
        return json_response(await knn_query(q, str(request.base_url)))

    async def knn_query(q: dict, base_url: str) -> list:
        """``POST /knn-service``'s answer to a parsed body; result urls start with ``base_url``."""
        check_fields(q, KNN_FIELDS, "/knn-service")
        s = get_index(q.get("indice_name"), "indice_name")
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
        # clip-retrieval's default (100), within this service's k limit: a client that sends none gets the most
        # it may have, not a 422 about a value it never sent
        num_images = check_k(q["num_images"], "num_images") if q.get("num_images") is not None else \
            min(100, limits.max_k)
        num_ids = q.get("num_result_ids")
        num_ids = num_images if num_ids is None else check_k(num_ids, "num_result_ids")
        dedup = q.get("deduplicate")
        if dedup is not None and not isinstance(dedup, bool):
            raise ApiError(422, "deduplicate must be true or false")
        # clip-back: knn_search(..., num_result_ids), then map_to_metadata(..., num_images) keeps at most
        # num_images of them, so the answer holds at most min(num_images, num_result_ids) results
        search_k = min(limits.max_k, num_ids)
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
        base = public_url or base_url.rstrip("/")
        for r in rows[:num_images]:
            d = {k: _jsonable(v) for k, v in r.items() if k not in ("id", "score")}
            p = r.get("image_path") or r.get("path")
            if "url" not in d and isinstance(p, str) and p and "::" not in p:
                d["url"] = base + index_url("image", s.name, r["id"])
            d["id"], d["id_str"] = int(r["id"]), str(int(r["id"]))
            d["similarity"] = _jsonable(float(r["score"]))
            out.append(d)
        return out

    @app.post("/metadata")
    async def metadata(request: Request):
        q = await read_json(request)
        check_fields(q, METADATA_FIELDS, "/metadata")
        s = get_index(q.get("indice_name"), "indice_name")
        ids = q.get("ids")
        if not isinstance(ids, list):
            raise ApiError(422, "ids must be a list of integers")
        if len(ids) > limits.max_ids:
            raise ApiError(413, f"{len(ids)} ids is over the limit of {limits.max_ids}")
        ids = [check_id(v, f"ids[{j}]") for j, v in enumerate(ids)]
        st = s.current()

        def work():
            return [{"id": i, "id_str": str(i), "metadata": {k: _jsonable(v) for k, v in
                                           st.retriever.metadata(i).items()}} for i in ids]
        return await asyncio.get_running_loop().run_in_executor(None, work)

    # -- the page ---------------------------------------------------------------------------------------
    @get_route("/")
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    async def fast_search(q: dict, scope) -> dict:
        return await search_query(q)

    async def fast_knn(q: dict, scope) -> list:
        return await knn_query(q, str(Request(scope).base_url))

    # outermost: limits and headers for every route; then the JSON queries' direct path; then FastAPI
    app.front = _Guard(_FastJson(app.framework, routes={"/search": fast_search, "/knn-service": fast_knn},
                                 parse=parse_json), max_bytes=limits.body_bytes())
    return app


# ------------------------------------------------------------------------------------------ running it
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 60.0,
                      log_level: str = "warning", **uvicorn_kw) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port``) once it
    accepts connections, and stops it on exit. ``port=0`` picks a free port. Responses leave in one send each
    (:func:`retrieval.serve_http.http_protocol`) unless ``http=`` is given. The process's logging is left as it
    is (``log_config=None`` unless given): uvicorn's default ``dictConfig`` closes every handler in the process,
    e.g. the log file of an mmengine runner, whose next write then fails."""
    import uvicorn

    from .serve_http import http_protocol

    uvicorn_kw.setdefault("http", http_protocol())
    uvicorn_kw.setdefault("log_config", None)
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
