"""The pieces behind the search service (:mod:`retrieval.serve`): request limits and errors, query-image
decoding, one index folder's committed state with hot reload (:class:`ServedIndex`), and the per-index
micro-batching worker (:class:`Batcher`). No web framework is imported here."""
from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import math
import os
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger("retrieval.serve")

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


# ------------------------------------------------------------------------------------------ request values
def parse_json_body(body: bytes) -> dict:
    """A request body as a JSON object. A body that is not UTF-8 (RFC 8259: JSON is UTF-8; a leading BOM is
    allowed) is a 422 naming the first bad byte; anything else the parser cannot turn into Python values is a
    400: invalid JSON, and nesting too deep for the parser (``RecursionError``) — never a 5xx; valid JSON that
    is not an object, or an object giving a field twice (``{"k": 5, "k": 500}``: which one counts would be the
    parser's choice), is a 422."""
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(422, f"the request body is not UTF-8 text (byte 0x{body[e.start]:02x} at offset {e.start}): "
                            f"send JSON encoded as UTF-8") from None
    try:
        obj = json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_unique_keys)
    except _RepeatedField as e:
        raise ApiError(422, f"field {e.name[:40]!r} is given more than once: give each field once") from None
    except Exception:  # noqa: BLE001 - ValueError, RecursionError (deep nesting), ...:
        raise ApiError(400, "the request body is not valid JSON") from None  # a bad body, never our error
    if not isinstance(obj, dict):
        raise ApiError(422, "the request body must be a JSON object")
    return obj


class _RepeatedField(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_keys(pairs: list) -> dict:
    """``json.loads``' object hook: the object, refusing a key given twice (:class:`_RepeatedField`)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise _RepeatedField(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def check_fields(q: dict, allowed: Sequence[str], where: str) -> None:
    """The service's one rule for a request's field names: a field ``where`` does not know (a typo such as
    ``"txt"`` or ``"K"``, which would otherwise be ignored and the query answered as if it were not sent) is a
    422 naming the unknown fields and the known ones."""
    unknown = [str(k) for k in q if k not in allowed]
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ApiError(422, f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {shown} (known: "
                            f"{', '.join(allowed)})")


_INT_TEXT = re.compile(r"-?[0-9]{1,30}")


def as_int(v: Any, name: str) -> int:
    """The service's one rule for integer fields (``k``, ``num_images``, ``num_result_ids``, ``id``, ``ids``, in
    JSON bodies and multipart forms alike): a JSON integer, or a string of ASCII decimal digits (what an HTML
    form sends), optionally with a leading ``-``. A boolean, a number with a fraction or exponent (``2.5``,
    ``5.0``), ``null`` or any other string is refused with a 422 naming the field."""
    if isinstance(v, str) and _INT_TEXT.fullmatch(v):
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        shown = repr(v) if isinstance(v, (str, float, bool)) or v is None else f"a JSON {_json_type(v)}"
        raise ApiError(422, f"{name} must be an integer, got {shown[:60]}")
    return v


MAX_ID = 2**63 - 1  # ids are faiss int64s


def as_id(v: Any, name: str = "id") -> int:
    """The service's one rule for ids (``/search``'s ``id``, ``/metadata``'s ``ids[i]``, the ``{id}`` of
    ``/image`` and ``/thumb``): :func:`as_int`'s integer, then 0 to 2**63 - 1. A 422 naming the field otherwise
    (a negative id: "must be >= 0"; beyond int64: "out of range")."""
    v = as_int(v, name)
    if v < 0:
        raise ApiError(422, f"{name} must be a non-negative integer, got {v}")
    if v > MAX_ID:
        raise ApiError(422, f"{name} {str(v)[:40]} is out of range (ids are 0 to 2**63 - 1 = {MAX_ID})")
    return v


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array"}.get(type(v), type(v).__name__)


# ------------------------------------------------------------------------------------------ host / images
def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address: ``localhost``, any of 127.0.0.0/8 or ``::1`` (also as an
    IPv4-mapped ``::ffff:127.x.y.z``)."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def check_host(host: str, allow_remote: bool) -> Optional[str]:
    """Refuse a non-loopback ``host`` unless ``allow_remote``; returns a warning line for an allowed one."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise ValueError(f"--host {host} is not a loopback address: the service has no authentication; pass "
                         f"--allow-remote to expose it anyway")
    return (f"warning: serving on {host}: anyone who can reach this address can query the index and read the "
            f"images its metadata references")


def open_image(data: bytes, max_pixels: int):
    """Bytes → a ``PIL.Image`` whose header is read and checked, no pixel decoded yet (:func:`decode_image`
    finishes it). Refuses more than ``max_pixels`` pixels (and PIL's own bomb limit, checked explicitly instead
    of changing or catching its process-wide warning). Raises :class:`ApiError` (413 too many pixels, 422 not an
    image). Thread-safe."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as e:
        raise ApiError(422, f"not a readable image ({type(e).__name__})") from None
    if w * h > max_pixels:
        raise ApiError(413, f"image is {w}x{h} = {w * h} pixels, more than the server's limit of {max_pixels} "
                            f"pixels (--max-pixels)")
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:  # what PIL only warns about
        raise ApiError(413, f"image too large: {w * h} pixels is over PIL's decompression-bomb limit of "
                            f"{Image.MAX_IMAGE_PIXELS}")
    if w < 1 or h < 1:
        raise ApiError(422, "image has no pixels")
    return im


def decode_image(data, max_pixels: int):
    """Bytes (or an image from :func:`open_image`) → RGB ``PIL.Image`` read as the index builder reads files
    (:func:`internvit.data.load_image`: EXIF orientation applied, first frame, every mode to 8-bit RGB),
    refusing more than ``max_pixels`` decoded pixels (checked from the header, before any pixel is decoded,
    without changing PIL's process-wide limit). Raises :class:`ApiError` (413 too many pixels, 422 not an
    image). Thread-safe: it runs in parallel in the decode pool, so it touches no process-wide state (no
    ``warnings.catch_warnings``, which is not thread-safe: PIL's own bomb limit is checked here explicitly
    instead)."""
    from PIL import Image, ImageOps

    from internvit.data import to_rgb

    im = open_image(data, max_pixels) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        im.seek(0)
        im.load()
        if im.getexif().get(0x0112, 1) not in (1, None):  # EXIF orientation
            im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as e:
        raise ApiError(422, f"not a readable image ({type(e).__name__})") from None


_PLAIN = frozenset({str, int, bool, type(None)})


def _jsonable(v: Any) -> Any:
    if type(v) in _PLAIN:  # the common case first (metadata strings, ids)
        return v
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
    #: why text queries are refused while image queries are served (the tokenizer cannot be read)
    text_error: Optional[str] = None
    transform: Any = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def manifest(self) -> dict:
        return self.retriever.manifest

    def stored_vector(self, id_: int) -> np.ndarray:
        """The indexed vector of the global id ``id_`` ``(D,)`` float32 (search by id): the retriever's own
        (:meth:`retrieval.search.Retriever.stored_vector`, a group's member that holds it). Raises ``KeyError``
        for an id the index does not hold."""
        return self.retriever.stored_vector(int(id_))


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


def _tokenizer_problem(retriever) -> Optional[str]:
    """Why the tokenizer the query encoder would use (``--tokenizer``, else the recorded one) cannot be read;
    ``None`` when there is none to use or it reads."""
    first = (getattr(retriever, "retrievers", None) or [retriever])[0]
    path = first.tokenizer or (first.manifest.get("encoder") or {}).get("tokenizer")
    if not path:
        return None
    from internvit import get_tokenizer

    try:
        get_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - missing, a folder without tokenizer.model, not a sentencepiece model
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        return msg if os.fspath(path) in msg else f"tokenizer {path}: {msg}"
    return None


def query_encoder(retriever) -> tuple:
    """``(encoder, text_error)`` of a Retriever (or a group's): its query encoder; when that cannot be built
    because its tokenizer cannot be read, the same model without a tokenizer (image queries only) and why
    text queries are refused. Other failures raise."""
    try:
        return retriever.encoder, None
    except Exception:
        problem = _tokenizer_problem(retriever)
        if problem is None:
            raise
    from .encoders import encoder_from_info

    members = getattr(retriever, "retrievers", None) or [retriever]
    first = members[0]
    info = {k: v for k, v in (first.manifest.get("encoder") or {}).items() if k != "tokenizer"}
    enc = encoder_from_info(info, device=first.device, dtype=first.dtype)
    if hasattr(enc, "tokenizer"):  # a model folder's own tokenizer.model is not the one asked for
        enc.tokenizer, enc.tokenizer_path = None, None
    for r in members:
        enc.check_compatible(r.manifest, r.index_dir)
        r._encoder = enc
    retriever._encoder = enc
    return enc, problem


class ServedIndex:
    """An index folder behind the service: its current :class:`IndexState`, hot reload, image files.

    ``index_dir`` may be a list of folders: a group searched as one collection (the loader gets the list;
    ``Retriever.load`` opens a :class:`~retrieval.sharded.ShardedRetriever`). A new commit of any member
    reloads the whole group; a group whose members fail to load together keeps its current state."""

    def __init__(self, name: str, index_dir: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], *,
                 loader: Callable[..., Any], device=None, dtype=None,
                 tokenizer: Optional[str] = None, image_root: Optional[str] = None, preload: bool = True) -> None:
        group = not isinstance(index_dir, (str, os.PathLike))
        self.members = [os.path.abspath(os.fspath(d)) for d in index_dir] if group else None
        self.name, self.dir = name, self.members if group else os.path.abspath(index_dir)
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

        before = self._signature()
        if before is None:
            missing = [d for d in self.members or [self.dir] if manifest_signature(d) is None]
            raise FileNotFoundError(f"{missing[0] if missing else self.dir}: no manifest.json (not a finished index)")
        kw = dict(device=self.device, dtype=self.dtype, tokenizer=self.tokenizer)
        encoder = previous.encoder if previous is not None else None
        try:
            retriever = self._loader(self.dir, encoder, **kw)
        except IndexMismatchError:  # rebuilt with another encoder: load that one
            encoder = None
            retriever = self._loader(self.dir, None, **kw)
        retriever.open_metadata()  # every metadata file of this commit, now: a later commit cannot retire them
        error = text_error = None
        if encoder is not None and previous is not None:
            text_error = previous.text_error
        if self.preload and encoder is None:
            try:
                encoder, text_error = query_encoder(retriever)
            except Exception as e:  # noqa: BLE001 - an index without a usable encoder still serves ids/vectors
                error = str(e).splitlines()[0] if str(e) else type(e).__name__
                logger.warning("%s: no query encoder (%s); text and image queries are refused", self.name, error)
            else:
                if text_error:
                    logger.warning("%s: %s; text queries are refused (image queries are served)", self.name,
                                   text_error)
        if self._signature() != before:
            raise _ChangedWhileLoading(f"{self.dir}: the index changed while it was being loaded")
        self._generation += 1
        return IndexState(retriever, before, self._generation, encoder, error, text_error)

    def reload_if_changed(self) -> bool:
        """Load and swap in a new committed state if the manifest changed; ``True`` when swapped. A failed load
        (files of the commit missing, a commit in progress) keeps the current state and is retried once the
        manifest changes again (a load that raced a commit is retried at the next check)."""
        sig = self._signature()
        if sig is None:  # the folder (or its manifest) was deleted or cannot be read: keep serving, say so
            missing = self._unreadable()
            if self._failed_signature != ("missing", missing):
                self._failed_signature = ("missing", missing)
                self.reload_error = (f"{missing}: the index folder is gone or cannot be read (no manifest.json); "
                                     f"still serving generation {self.state.generation}, as loaded")
                logger.warning("%s: %s", self.name, self.reload_error)
            return False
        if sig == self.state.signature:
            if self._failed_signature is not None and self._failed_signature[0] == "missing":
                self.reload_error, self._failed_signature = None, None  # back as it was
                logger.info("%s: the index folder is readable again", self.name)
            return False
        if sig == self._failed_signature:
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

    def _signature(self) -> Optional[tuple]:
        """The committed manifest's signature; a group's: its members' (``None`` when one is absent)."""
        if self.members is None:
            return manifest_signature(self.dir)
        sigs = tuple(manifest_signature(d) for d in self.members)
        return None if any(s is None for s in sigs) else sigs

    def _unreadable(self) -> str:
        """The first folder (of a group: member) whose manifest cannot be read now."""
        return next((d for d in self.members or [self.dir] if manifest_signature(d) is None), str(self.dir))

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
                "encoder_error": st.encoder_error, "reload_error": self.reload_error,
                **({"members": m.get("shards")} if self.members is not None else {})}

    def image_file(self, st: IndexState, id_: int) -> tuple:
        """``(open binary file, media type, os.stat_result)`` of the image file that id ``id_``'s metadata names
        (:func:`served_image`; the caller closes it), resolved (absolute, or relative to the image root, then the
        index folder, then its parent) to the regular file it is. Raises
        :class:`ApiError` 404 when there is none, when the name is a symlink that leads out of the folder the
        path names (e.g. an indexed PNG replaced by a link to ``/etc/passwd``), or when the file is not an
        image (its header is sniffed with PIL; the media type comes from the sniffed format, not the name)."""
        row = st.retriever.metadata(int(id_))
        if not row:
            raise ApiError(404, f"index {self.name!r} has no id {id_}")
        base = self.dir  # a group's relative paths: the folder of the member that holds the id
        if self.members is not None:
            base = os.path.abspath(st.retriever.shard_of(int(id_))[0].index_dir)
        path = row.get("image_path") or row.get("path")
        if not isinstance(path, str) or not path:
            raise ApiError(404, f"id {id_} has no image path in the metadata")
        if "::" in path:
            raise ApiError(404, f"id {id_} is a tar member; tar members are not served")
        candidates = [path] if os.path.isabs(path) else \
            [os.path.join(b, path) for b in (self.image_root, base, os.path.dirname(base))]
        for c in candidates:
            if os.path.splitext(c)[1].lower() in IMAGE_TYPES and os.path.isfile(c):
                return served_image(c, id_)
        raise ApiError(404, f"image of id {id_} not found ({os.path.basename(path)})")


#: PIL format → media type of the files /image serves
SERVED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
                  "BMP": "image/bmp", "TIFF": "image/tiff"}


def served_image(path: str, id_: int) -> tuple:
    """``(open binary file, media type, os.stat_result)`` of a stored image file that may be served: the regular
    file a name resolves to, inside the folder the name is in (a symlink to another image next to it is
    followed; one leading out of that folder is not), whose header PIL identifies as one of
    :data:`SERVED_FORMATS`. ``ApiError`` 404 otherwise (a server-side file that is not an image is no image of
    that id). The caller closes the file.

    The file is opened once and every check is made on that open file, whose bytes are then served: checking a
    path and opening it again to send it let a symlink swapped in between (an indexed image replaced by a link
    to ``/etc/passwd`` and back, in a loop) be sent as an image. The final name is opened without following a
    link (``O_NOFOLLOW``) or blocking (``O_NONBLOCK``: a FIFO), and where ``/proc/self/fd`` exists the opened
    file's own path must lie in the folder (a folder of the path swapped for a link)."""
    import stat

    from PIL import Image

    name = os.path.basename(path)
    try:  # realpath raises when a name changes between its islink and readlink (EINVAL)
        real = os.path.realpath(path)
        folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    except OSError:
        raise ApiError(404, f"image of id {id_} not found ({name} cannot be resolved)") from None

    def inside(p: str) -> bool:
        return os.path.commonpath([folder, p]) == folder

    if not inside(real):
        raise ApiError(404, f"image of id {id_} not found ({name} links out of its folder)")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise ApiError(404, f"image of id {id_} not found ({name} cannot be opened)") from None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        opened = f"/proc/self/fd/{fd}"
        if os.path.islink(opened) and not inside(os.path.realpath(opened)):
            raise ApiError(404, f"image of id {id_} not found ({name} links out of its folder)")
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(404, f"image of id {id_} not found ({name} is not a regular file)")
        try:
            with Image.open(f, formats=tuple(SERVED_FORMATS)) as im:
                fmt = im.format
        except Exception:  # noqa: BLE001 - unreadable / not an image: PIL raises many kinds
            fmt = None
        if fmt not in SERVED_FORMATS:
            raise ApiError(404, f"image of id {id_} not found ({name} is not an image file)")
        f.seek(0)
        return f, SERVED_FORMATS[fmt], st
    except BaseException:
        f.close()
        raise


# ------------------------------------------------------------------------------------------ batching
@dataclass
class _Query:
    kind: str  # 'text' | 'image' | 'vector' | 'id'
    payload: Any
    k: int
    future: asyncio.Future
    state: Optional[IndexState] = None
    #: (encoder, concurrent Future of the (3, H, W) tensor or the ApiError): an image being prepared in the decode
    #: pool while the worker was busy
    prepared: Optional[tuple] = None


_STOP = object()  # the worker's inbox: stop after the queries before it


class Batcher:
    """One inbox and one worker thread per index: the worker takes every waiting query, encodes them together
    (texts, images), searches grouped by ``k`` and hands each caller ``(rows, state)``.

    The loop thread puts a query in a :class:`queue.SimpleQueue` and the worker answers the whole batch with one
    ``loop.call_soon_threadsafe`` (no asyncio queue task, no executor futures). A lone query on an idle service
    runs inline on the loop thread instead when lone queries are fast (``inline_ms``, measured on the previous
    ones; 0: never) and its image small (``inline_pixels``): the loop is held for about that long at most.
    ``slots`` (a semaphore shared by the indexes) bounds how many batches run at once."""

    def __init__(self, served: ServedIndex, slots: Optional[threading.Semaphore] = None, *, max_batch: int = 32,
                 batch_wait_ms: float = 2.0, max_queue: int = 1024, max_pixels: int = 40_000_000,
                 decode_pool: Optional[ThreadPoolExecutor] = None, inline_ms: float = 20.0,
                 inline_pixels: int = 1 << 20) -> None:
        self.served, self.slots = served, slots
        self.inline_s, self.inline_pixels = max(0.0, inline_ms) / 1000.0, int(inline_pixels)
        self.lone_s: Optional[float] = None  # how long the last batch of one query took (seconds)
        self.inlined = 0  # queries answered on the event loop thread
        self.max_pixels, self.decode_pool = max_pixels, decode_pool
        self.max_batch, self.wait_s = max(1, int(max_batch)), max(0.0, batch_wait_ms) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0  # queries submitted and not answered (preparing, queued or in the running batch)
        self.busy = False  # a batch is running in the worker
        self.preparing = 0  # images being prepared ahead in the decode pool
        self.prepared_ahead = 0
        self._prep_lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread: Optional[threading.Thread] = None
        self.last_batch = 0
        self.batches = 0
        self.queries = 0
        self.largest_batch = 0

    def start(self) -> None:
        """Start the worker thread; answers go to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name=f"search-{self.served.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Let the worker finish the queries already queued, then exit (it does not wait for it)."""
        self.inbox.put(_STOP)

    async def submit(self, kind: str, payload: Any, k: int) -> tuple:
        """Queue one query; ``(rows, state)`` once its batch is done. Raises :class:`ApiError` (503 when
        ``max_queue`` queries are waiting, or the query's own error).

        A lone query on an idle service whose lone queries take at most ``inline_s`` (and, for an image, has at
        most ``inline_pixels`` pixels) runs right here, on the event loop thread: no thread hand-off, whose
        wake-ups cost more than the rest of the service's work on a small model. Anything else goes to the
        worker thread. An image query that arrives while the worker is busy starts being decoded and
        preprocessed at once, in the decode pool, in parallel with the running batch (its tensor is used if
        the state's encoder is still the one that prepared it, else it is prepared again)."""
        if self.pending >= self.max_queue:
            raise ApiError(503, f"index {self.served.name!r} is overloaded ({self.max_queue} queries "
                                f"waiting); retry later")
        self.pending += 1
        try:
            q = _Query(kind, payload, k, self._loop.create_future())
            if self._may_inline(kind, payload):
                if kind == "image":  # the header now (pixels bound the time the loop is held); decoded once
                    q.payload = open_image(payload, self.max_pixels)
                await asyncio.sleep(0)  # queries that arrived in the same loop turn reach submit first
                if self.pending == 1 and not self.busy and self.inbox.empty() and \
                        (kind != "image" or _pixels(q.payload) <= self.inline_pixels) and \
                        (self.slots is None or self.slots.acquire(blocking=False)):
                    try:
                        r = self._run_batch([q])[0]
                        self.inlined += 1
                    finally:
                        if self.slots is not None:
                            self.slots.release()
                    if isinstance(r, BaseException):
                        raise r
                    return r
            if kind == "image" and self.decode_pool is not None and self.preparing < self.max_batch and (
                    self.busy or self.last_batch > 1 or not self.inbox.empty()):  # bounded: may outlive its client
                st = self.served.current()
                if st.encoder is not None:
                    with self._prep_lock:
                        self.preparing += 1
                    q.prepared = (st.encoder, self.decode_pool.submit(self._prep_one, st, q.payload))
            self.inbox.put(q)
            return await q.future
        finally:
            self.pending -= 1

    def _may_inline(self, kind: str, payload: Any) -> bool:
        """Whether a query may run on the event loop thread: the service is idle (nothing pending but it,
        the previous batch was one query) and a lone query took at most ``inline_s`` the last time."""
        return (self.inline_s > 0 and self.pending == 1 and not self.busy and self.last_batch <= 1
                and self.lone_s is not None and self.lone_s <= self.inline_s
                and (kind != "image" or len(payload) <= 3 * self.inline_pixels))  # more bytes: not a small image

    def _prep_one(self, st: IndexState, data):
        """Image bytes (or an opened image) → the encoder's ``(3, H, W)`` input tensor, or the ApiError that
        answers it."""
        try:
            x = self._transform(st)(decode_image(data, self.max_pixels))
            with self._prep_lock:
                self.prepared_ahead += 1
            return x
        except ApiError as e:
            return e
        except Exception as e:  # noqa: BLE001 - isolate the query that fails
            return ApiError(422, f"could not encode the image query: {str(e).splitlines()[0]}")
        finally:
            with self._prep_lock:
                self.preparing -= 1

    def _take(self, first) -> tuple:
        """The batch that starts with ``first``: what is waiting (and, when the previous batch held more than
        one query, what arrives within ``wait_s``), at most ``max_batch``; ``(batch, stop)``."""
        batch, stop = [first], False
        deadline = time.monotonic() + self.wait_s if self.last_batch > 1 and self.wait_s > 0 else None
        while len(batch) < self.max_batch:
            try:
                if deadline is None:
                    q = self.inbox.get_nowait()
                else:
                    left = deadline - time.monotonic()
                    q = self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if q is _STOP:
                stop = True
                break
            batch.append(q)
        return batch, stop

    def _run(self) -> None:
        """The worker thread: batch, run, answer, until :meth:`stop`."""
        stop = False
        while not stop:
            first = self.inbox.get()
            if first is _STOP:
                break
            batch, stop = self._take(first)
            batch = [q for q in batch if not q.future.done()]  # the client went away
            if not batch:
                self.last_batch = 0
                continue
            if self.slots is not None:
                with self.slots:
                    results = self._run_batch(batch)
            else:
                results = self._run_batch(batch)
            try:
                self._loop.call_soon_threadsafe(self._answer, batch, results)
            except RuntimeError:  # the loop is closed: the server has stopped
                return

    def _run_batch(self, batch: list) -> list:
        """Run one batch (in the worker, or inline on the loop thread): a result or an error per query."""
        self.busy = True
        t0 = time.perf_counter()
        try:
            results = self._work(batch)
        except Exception as e:  # noqa: BLE001 - never let the worker die
            logger.exception("%s: batch failed", self.served.name)
            results = [ApiError(500, f"search failed: {type(e).__name__}")] * len(batch)
        finally:
            self.busy = False
        if len(batch) == 1:
            self.lone_s = time.perf_counter() - t0
        self.last_batch = len(batch)
        self.batches += 1
        self.queries += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        return results

    @staticmethod
    def _answer(batch: list, results: list) -> None:
        """In the loop thread: each caller's future gets its result or its error."""
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
        if st.encoder is None and st.encoder_error is None and any(q.kind in ("text", "image") for q in batch):
            try:  # preload=False: build it on first use
                st.encoder, st.text_error = query_encoder(st.retriever)
            except Exception as e:  # noqa: BLE001
                st.encoder_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        self._decode(batch, out, st)
        for kind in ("text", "image"):
            rows = [i for i, q in enumerate(batch) if q.kind == kind and out[i] is None]
            if not rows:
                continue
            if st.encoder is None:
                msg = st.encoder_error or "the index records no encoder"
                for i in rows:
                    out[i] = ApiError(422, f"index {self.served.name!r} cannot encode {kind} queries: {msg}")
                continue
            if kind == "text" and st.text_error:
                for i in rows:
                    out[i] = ApiError(422, f"index {self.served.name!r} cannot encode text queries: "
                                           f"{st.text_error}")
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
            try:
                res = st.retriever.search_embedding(np.stack([vecs[i] for i in rows]), k)
                for j, i in enumerate(rows):
                    out[i] = (res.rows[j], st)
            except ValueError:  # a query the Retriever refuses (all zeros, ...): isolate it, answer the others
                for i in rows:
                    try:
                        out[i] = (st.retriever.search_embedding(vecs[i][None], k).rows[0], st)
                    except ValueError as e:
                        out[i] = ApiError(422, str(e).splitlines()[0])
        return out

    def _decode(self, batch: list, out: list, st: Optional[IndexState] = None) -> None:
        """Decode the image queries' bytes in place and, given the state ``st`` with an image encoder, apply its
        preprocessing too: each payload becomes a ``(3, H, W)`` tensor. Images are independent, so a batch's
        are prepared in parallel (PIL and torch release the GIL); a lone one in this thread (no hop). A bad
        image gets its ApiError in ``out``."""
        rows = []
        for i, q in enumerate(batch):
            if q.kind == "image" and _undecoded(q.payload):
                if q.prepared is not None:
                    encoder, prepared = q.prepared
                    q.prepared = None
                    try:
                        x = prepared.result()  # prepared while the worker was busy (an ApiError: not an image)
                    except Exception:  # noqa: BLE001 - cancelled (the pool is shutting down): prepare it here
                        x = None
                    if isinstance(x, ApiError):
                        out[i] = x
                        continue
                    if x is not None and st is not None and encoder is st.encoder:  # this state's encoder
                        q.payload = x
                        continue
                rows.append(i)
        if not rows:
            return
        transform = self._transform(st) if st is not None and st.encoder is not None else None

        def prep(i):
            try:
                im = decode_image(batch[i].payload, self.max_pixels)
            except ApiError as e:
                return e
            if transform is None:
                return im
            try:
                return transform(im)
            except Exception as e:  # noqa: BLE001 - isolate the query that fails
                return ApiError(422, f"could not encode the image query: {str(e).splitlines()[0]}")

        if len(rows) > 1 and self.decode_pool is not None:
            images = list(self.decode_pool.map(prep, rows))
        else:
            images = [prep(i) for i in rows]
        for i, im in zip(rows, images):
            if isinstance(im, ApiError):
                out[i] = im
            else:
                batch[i].payload = im

    @staticmethod
    def _transform(st: IndexState) -> Callable:
        """The encoder's own preprocessing (PIL image → ``(3, H, W)`` tensor), built once per state."""
        if st.transform is None:
            pre = st.encoder.preprocess
            if callable(pre) and not isinstance(pre, dict):
                st.transform = pre
            else:
                from internvit.transforms import build_transform

                st.transform = build_transform(pre)
        return st.transform

    @classmethod
    def _encode(cls, st: IndexState, kind: str, payloads: list) -> np.ndarray:
        if kind == "text":
            return np.asarray(st.encoder.encode_texts(payloads), np.float32)
        import torch

        x = torch.stack([p if isinstance(p, torch.Tensor) else cls._transform(st)(p) for p in payloads])
        return st.encoder.encode_images(x).float().cpu().numpy()


def _undecoded(payload: Any) -> bool:
    """An image query's payload before :meth:`Batcher._decode`: bytes, or an image from :func:`open_image`
    (header only); afterwards it is the encoder's input tensor."""
    from PIL import Image

    return isinstance(payload, (bytes, bytearray, Image.Image))


def _pixels(im) -> int:
    w, h = im.size
    return w * h


def _dedup(st: IndexState, rows: list) -> list:
    """clip-retrieval's deduplication: results whose stored vectors are within cosine ``DEDUP_THRESHOLD`` form
    connected groups; each group keeps its best-ranked member. ``ApiError`` 422 when the index cannot return a
    result's stored vector (answering without deduplication would pass duplicates off as deduplicated)."""
    try:
        vecs = np.stack([st.stored_vector(int(r["id"])) for r in rows])
    except Exception as e:  # noqa: BLE001 - any failure of the index: named, never a silent "not deduplicated"
        raise ApiError(422, f"deduplicate: the index cannot return the stored vectors of its results "
                            f"({type(e).__name__}: {e}); ask without deduplicate") from None
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
