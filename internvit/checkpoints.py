"""Checkpoint reading, key families and loading — the only place that knows checkpoint formats.

* Reading never executes code: safetensors (read tensor by tensor into memory), or for ``.pth`` / ``.bin`` a
  pickle whose globals are vetted from its opcodes before ``torch.load(weights_only=True, mmap=True)``, and
  whose result is checked to be plain data (:func:`safe_torch_load`). Loaded tensors own their memory: the
  file may be overwritten afterwards.
* :data:`VIT_KEY_TABLE` is THE rename table between the original InternVL key family and ours (the
  Hugging Face names). A new family is a new row plus a detection rule in :func:`detect_family`.
* :func:`load_into` fills a model built on the ``meta`` device tensor by tensor, so loading never
  holds a second full copy of the weights, and reports missing / unexpected / mis-shaped keys by name.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import mmap as mmap_module
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

#: (original InternVL family, Hugging Face family) — first matching row wins. ``{i}`` is a block index,
#: ``{rest}`` the remainder of a key.
VIT_KEY_TABLE: list[tuple[str, str]] = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
    ("blocks.{i}.ls1.gamma", "encoder.layers.{i}.ls1"),
    ("blocks.{i}.ls2.gamma", "encoder.layers.{i}.ls2"),
    ("blocks.{i}.{rest}", "encoder.layers.{i}.{rest}"),
    # text tower of the PyTorch InternVL-C checkpoint (a HF LlamaModel) ↔ the QLLaMA decoder of InternVL-14B
    ("transformer.{rest}", "qllama.model.{rest}"),
]

#: Known heads that may sit next to the ViT in a vision checkpoint: reported, never fatal.
KNOWN_EXTRA_PREFIXES: tuple[str, ...] = (
    "clip_projector.", "clip_projector2.", "qllama.", "query_tokens", "text_projection", "logit_scale",
    "itm_head.", "transformer.", "mlp1.", "language_model.", "head.", "norm.", "fc_norm.", "attn_pooling.",
)

#: Wrappers around a state dict, unwrapped in this order (DeepSpeed, mmengine, classification heads).
WRAPPER_KEYS = ("module", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the keys or the file."""


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(pattern + "$")


_TO_HF = [(_template_regex(orig), hf) for orig, hf in VIT_KEY_TABLE]
_TO_ORIGINAL = [(_template_regex(hf), orig) for orig, hf in VIT_KEY_TABLE]


def _rename(key: str, rules) -> str:
    for rx, target in rules:
        m = rx.match(key)
        if m:
            return target.format(**m.groupdict())
    return key


def original_to_hf_key(key: str) -> str:
    return _rename(key, _TO_HF)


def hf_to_original_key(key: str) -> str:
    return _rename(key, _TO_ORIGINAL)


def detect_family(keys: Iterable[str]) -> str:
    """``'hf'`` (``embeddings.*``, ``encoder.layers.*``) or ``'original'`` (``cls_token``, ``blocks.*``)."""
    keys = list(keys)
    hf = any(k.startswith(("embeddings.", "encoder.layers.")) for k in keys)
    orig = any(k in ("cls_token", "pos_embed") or k.startswith(("blocks.", "patch_embed.")) for k in keys)
    if hf and orig:
        raise CheckpointError("checkpoint mixes the original (blocks.*) and HF (encoder.layers.*) key families")
    if hf:
        return "hf"
    if orig:
        return "original"
    sample = ", ".join(keys[:5])
    raise CheckpointError(f"no InternViT keys found (neither embeddings.*/encoder.layers.* nor "
                          f"cls_token/blocks.*); first keys: {sample}")


# ---------------------------------------------------------------------------------------------------
# Reading: never runs code, never leaves weights tied to the file
# ---------------------------------------------------------------------------------------------------
#: ``module name`` globals that a weight file written by ``torch.save`` of tensors / parameters / dicts
#: references, besides the ``torch`` dtypes (``torch float16``). Checked in the pickle's opcodes *before*
#: anything is unpickled; ``torch.load(weights_only=True)`` is the second line of defence.
_TENSOR_GLOBALS = re.compile(
    r"^(collections OrderedDict|_codecs encode|torch Size"
    r"|torch\._utils _rebuild_(tensor|tensor_v2|tensor_v3|parameter)"
    r"|torch(\.cuda)? \w+Storage)$"
)
#: opcodes whose global cannot be read off the opcode itself (torch.save never writes them)
_UNVETTABLE_OPCODES = ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4")


def is_tensor_global(spec: str) -> bool:
    """Whether a pickled global (``'module name'``, as the GLOBAL opcode spells it) is tensor plumbing."""
    if _TENSOR_GLOBALS.match(spec):
        return True
    module, _, name = spec.partition(" ")
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _globals_of_pickle(ops, path: str, found: list) -> None:
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            found.append(arg)
        elif op.name in _UNVETTABLE_OPCODES:
            raise CheckpointError(f"{path}: refusing to load: its pickle uses {op.name}, whose target cannot be "
                                  f"checked before loading (torch.save never writes it)")


def pickled_globals(path: str) -> tuple[list[str], bool]:
    """The ``'module name'`` globals a torch checkpoint's pickles reference, read without unpickling.

    Returns ``(globals, is_zip)``. Zip checkpoints (``torch.save`` since 1.6): every ``*.pkl`` entry; legacy
    files: the five pickles before the raw storage bytes. Raises :class:`CheckpointError` for files that are
    neither, for the legacy tar format and for pickles that cannot be vetted.
    """
    import pickletools
    import zipfile

    found: list[str] = []
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
            if not is_zip:
                f.seek(0)
                for _ in range(5):  # magic number, protocol, system info, the object, storage keys
                    _globals_of_pickle(pickletools.genops(f), path, found)
                return found, False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkls = [n for n in names if n.endswith(".pkl")]
            if len(names) != len(set(names)) or not pkls:
                raise CheckpointError(f"{path}: not a torch checkpoint (zip archive "
                                      f"{'with duplicate entries' if pkls else 'without data.pkl'})")
            for name in pkls:
                _globals_of_pickle(pickletools.genops(z.read(name)), path, found)
        return found, True
    except CheckpointError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        if isinstance(e, OSError) and not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such weight file") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def refuse_globals(path: str, globals_: Iterable[str], allowed: Callable[[str], bool]) -> None:
    """Raise :class:`CheckpointError` naming the first global that ``allowed`` refuses."""
    refused = sorted({g for g in globals_ if not allowed(g)})
    if refused:
        names = ", ".join(g.replace(" ", ".").replace("__builtin__.", "builtins.") for g in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise CheckpointError(f"{path}: refusing to load: it references {names}{more}, which is not tensor or "
                              f"array data (unpickling it could run code)")


@contextlib.contextmanager
def only_safe_globals(objects: Iterable = ()):
    """``torch.load(weights_only=True)`` accepts exactly torch's defaults plus ``objects`` inside the block.

    Globals that anything else added process-wide (``torch.serialization.add_safe_globals``) are set aside
    for the block and restored afterwards, and ``objects`` are gone again after it: nothing outlives the
    one load. (torch keeps this list per process, so a ``torch.load`` in another thread during the block
    sees the same list.) Uses ``torch.serialization.safe_globals`` where it exists (torch >= 2.5).
    """
    ser = torch.serialization
    unpickler = getattr(torch, "_weights_only_unpickler", None)
    get = getattr(ser, "get_safe_globals", None) or unpickler._get_safe_globals
    clear = getattr(ser, "clear_safe_globals", None) or unpickler._clear_safe_globals
    add = getattr(ser, "add_safe_globals", None) or unpickler._add_safe_globals
    before = list(get())
    clear()
    try:
        if hasattr(ser, "safe_globals"):
            with ser.safe_globals(list(objects)):
                yield
        else:  # torch 2.4
            add(list(objects))
            yield
    finally:
        clear()
        add(before)


_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.Size)


def check_plain_data(obj, path: str, allowed_types: tuple = ()) -> None:
    """Raise :class:`CheckpointError` unless ``obj`` is made only of plain data.

    Plain data: dicts (``OrderedDict`` with at most a ``_metadata`` attribute), lists, tuples, strings, numbers,
    ``None``, torch dtypes / sizes, tensors and parameters without hooks or attributes, numpy arrays, scalars
    and dtypes without Python objects inside, and instances of ``allowed_types`` (vetted by the caller).
    """
    import numpy as np

    stack, seen = [(obj, "")], set()
    while stack:
        o, where = stack.pop()
        if isinstance(o, _PLAIN) or id(o) in seen:
            continue
        seen.add(id(o))
        kind = type(o)
        if kind in (dict, OrderedDict):
            extra = vars(o) if kind is OrderedDict else {}
            if set(extra) - {"_metadata"} or not all(isinstance(k, _PLAIN) for k in o):
                bad = "attributes" if set(extra) - {"_metadata"} else "keys"
                raise CheckpointError(f"{path}: refusing to load: {where or 'the top level'} is a mapping with "
                                      f"non-data {bad}")
            stack.extend((v, f"{where}/{k}") for k, v in o.items())
            stack.extend((v, f"{where}/{k}") for k, v in extra.items())
        elif kind in (list, tuple):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(o))
        elif kind in (torch.Tensor, torch.nn.Parameter):
            if o._backward_hooks or vars(o):
                raise CheckpointError(f"{path}: refusing to load: tensor {where} carries hooks or attributes")
        elif kind is np.ndarray or isinstance(o, (np.generic, np.dtype)):
            if (o if isinstance(o, np.dtype) else o.dtype).hasobject:
                raise CheckpointError(f"{path}: refusing to load: numpy value {where} holds Python objects")
        elif not (allowed_types and isinstance(o, allowed_types)):
            raise CheckpointError(f"{path}: refusing to load: {where or 'the top level'} is a "
                                  f"{kind.__module__}.{kind.__qualname__}, not tensor or array data")


def safe_torch_load(path: str, *, map_location="cpu", mmap: bool = False,
                    allowed: Callable[[str], bool] = is_tensor_global, safe_globals: Iterable = (),
                    allowed_types: tuple = ()):
    """``torch.load`` that never runs code: the pickle's globals are vetted first (``allowed``), then
    ``weights_only=True`` with torch's default allow-list plus ``safe_globals`` for this one load, then the
    result is checked to be plain data (:func:`check_plain_data`).

    ``mmap=True`` memory-maps zip checkpoints (ignored for the legacy format). Raises :class:`CheckpointError`
    with one line naming the file and what was refused or unreadable.
    """
    path = os.fspath(path)
    found, is_zip = pickled_globals(path)
    refuse_globals(path, found, allowed)
    try:
        with only_safe_globals(safe_globals):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=bool(mmap and is_zip))
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the user gets one line naming the file
        text = str(e)
        if "WeightsUnpickler error:" in text:  # torch's refusal: keep its reason, not its advice
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation of torch.load")[0]
        detail = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())[:300]
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {detail})") from None
    check_plain_data(obj, path, allowed_types)
    return obj


def torch_load_weights(path: str, *, mmap: bool = True) -> dict:
    """A weight file's contents, read without running code (:func:`safe_torch_load`): tensors, dicts and
    numbers only. Zip checkpoints are memory-mapped (``mmap=True``): copy what you keep (``TensorSource``
    does) before the file may change."""
    return safe_torch_load(path, map_location="cpu", mmap=mmap)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    **{k: getattr(torch, v) for k, v in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                          ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, v)},
}


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """``({key: {dtype, shape, data_offsets}}, offset of the data section)`` of a safetensors file, checked
    against the file size (a truncated file is refused here, not at the first tensor access)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 * 1024**2):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        for key, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            shape, (begin, end) = info["shape"], info["data_offsets"]
            if dtype is None:
                raise ValueError(f"tensor {key}: unsupported dtype ({info!r:.60})")
            numel = 1
            for d in shape:
                numel *= int(d)
            if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
                raise ValueError(f"tensor {key}: bytes {begin}..{end} do not fit shape {shape} / the "
                                 f"{data_size}-byte data section (truncated file?)")
            info["torch_dtype"] = dtype
        return header, 8 + n
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


#: tensors of at least this many bytes are read by several threads at once (``os.preadv`` releases the GIL): the
#: copy out of the page cache and the first-touch page faults of the destination run on every core. Measured on a
#: 2-core VM, 1 GiB from a warm page cache: one ``readinto`` 1.5-1.8 GB/s, two threads 2.9 GB/s.
PARALLEL_READ_MIN_BYTES = 32 * 1024**2
_READ_CHUNK_BYTES = 8 * 1024**2


def io_threads() -> int:
    """Threads for work that releases the GIL per item (large reads, hashing): the CPUs this process may run on
    (``os.sched_getaffinity``, else ``os.cpu_count``), from 1 to 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _read_exact(read: Callable[[memoryview, int], int], buf: memoryview, offset: int, path: str) -> None:
    """Fill ``buf`` with ``read(view, file_offset) -> bytes read``; a short file raises :class:`CheckpointError`."""
    got = 0
    while got < len(buf):
        n = read(buf[got:], offset + got)
        if not n:
            raise CheckpointError(f"{path}: file ends inside tensor data (truncated?)")
        got += n


def _read_safetensors_tensor(path: str, data_start: int, info: dict, drop_behind: bool = False) -> torch.Tensor:
    """One tensor read into its own memory (no memory map stays behind); large ones by :func:`io_threads`
    threads, each reading whole chunks with ``os.preadv`` where the platform has it, else one ``readinto``.

    ``drop_behind``: each chunk's pages are dropped from the page cache once copied (``POSIX_FADV_DONTNEED``),
    see :func:`drop_behind_for`.
    """
    t = torch.empty(info["shape"], dtype=info["torch_dtype"])
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
    start = data_start + info["data_offsets"][0]
    if not hasattr(os, "preadv"):  # e.g. Windows: one sequential read
        with open(path, "rb") as f:
            f.seek(start)
            _read_exact(lambda view, _offset: f.readinto(view), buf, start, path)
        return t
    fd = os.open(path, os.O_RDONLY)
    drop = drop_behind and hasattr(os, "posix_fadvise")

    def read_chunk(a: int, n: int) -> None:
        _read_exact(lambda view, offset: os.preadv(fd, [view], offset), buf[a:a + n], start + a, path)
        if drop:
            os.posix_fadvise(fd, start + a, n, os.POSIX_FADV_DONTNEED)

    try:
        threads = io_threads() if len(buf) >= PARALLEL_READ_MIN_BYTES else 1
        if threads == 1:
            read_chunk(0, len(buf))
            return t
        from concurrent.futures import ThreadPoolExecutor

        if hasattr(os, "posix_fadvise"):  # from disk: the kernel reads the whole tensor ahead of the copies
            os.posix_fadvise(fd, start, len(buf), os.POSIX_FADV_WILLNEED)
        chunks = range(0, len(buf), _READ_CHUNK_BYTES)
        with ThreadPoolExecutor(threads, thread_name_prefix="internvit-read") as pool:
            for _ in pool.map(lambda a: read_chunk(a, min(_READ_CHUNK_BYTES, len(buf) - a)), chunks):
                pass
    finally:
        os.close(fd)
    return t


def available_memory() -> Optional[int]:
    """Bytes the kernel can give this process without swapping (Linux ``MemAvailable``: free memory plus the
    reclaimable page cache), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def page_cache_bytes(path: str) -> int:
    """Bytes of ``path`` resident in the page cache (Linux ``mincore`` over a private map of the file, which
    touches no page), or -1 where that cannot be read (not Linux, an empty file)."""
    size = os.path.getsize(path)
    if not sys.platform.startswith("linux") or size == 0:
        return -1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap_module.PAGESIZE
    with open(path, "rb") as f, mmap_module.mmap(f.fileno(), size, access=mmap_module.ACCESS_COPY) as m:
        head = (ctypes.c_char * 1).from_buffer(m)  # the map's address; no page is touched
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(head)), ctypes.c_size_t(size), vec)
        del head
    if rc != 0:
        return -1
    return sum(b & 1 for b in bytes(vec)) * page


def drop_behind_for(nbytes: int) -> bool:
    """Whether a copying load of ``nbytes`` of weight files drops each chunk from the page cache once copied.

    Yes when the files and their copy do not both fit in :func:`available_memory`: ``2 * nbytes`` more than 0.9
    of it (the kernel keeps some memory free, and the process holds more than its weights). Otherwise the copy
    must evict file pages as it grows, and the kernel evicts the pages read once before those read twice: on a
    re-read of a cached checkpoint, exactly the pages about to be read. Dropping what was already copied keeps
    cache + copy at about one checkpoint (measured: 11.8 GB of shards, 23.5 GiB RAM, warm cache: 30.9 s
    without, 12.4 s with). When both fit, nothing is dropped: the next load, or another process reading the
    same files, finds them cached.
    """
    avail = available_memory()
    return avail is not None and 2 * nbytes > 0.9 * avail


def _release_pages(start: int, nbytes: int, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages of ``[start, start + nbytes)`` from this process (Linux) when that range lies in
    one of the ``mapped`` file mappings; they are re-read from the file on the next access. Only whole pages
    inside the range are released, and never memory outside a file mapping (that would lose its contents)."""
    global _LIBC
    if nbytes <= 0 or not any(lo <= start and start + nbytes <= hi for lo, hi in mapped):
        return
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap_module.PAGESIZE
    lo, hi = -(-start // page) * page, (start + nbytes) // page * page
    if hi > lo:
        _LIBC.madvise(lo, hi - lo, mmap_module.MADV_DONTNEED)


def _file_mappings(path: str) -> list[tuple[int, int]]:
    """Address ranges at which this process maps ``path`` (Linux ``/proc/self/maps``; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    real, out = os.path.realpath(path), []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5] == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi))
    except OSError:
        return []
    return out


_LIBC = None
_COPY_CHUNK_BYTES = 16 * 1024**2


def _owned_copy(t: torch.Tensor, mapped: list[tuple[int, int]]) -> torch.Tensor:
    """A copy of a memory-mapped tensor in its own memory, copied in chunks whose mapped pages (inside the
    ``mapped`` ranges) are released right after: reading a whole file this way peaks at about one copy of the
    weights plus one chunk."""
    if not t.is_contiguous() or t.numel() == 0:
        out = t.clone(memory_format=torch.contiguous_format)
        storage = t.untyped_storage()
        _release_pages(storage.data_ptr(), storage.nbytes(), mapped)
        return out
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    src, dst = t.reshape(-1), out.reshape(-1)
    step = max(1, _COPY_CHUNK_BYTES // t.element_size())
    for a in range(0, src.numel(), step):
        b = min(a + step, src.numel())
        dst[a:b].copy_(src[a:b])
        _release_pages(src.data_ptr() + a * t.element_size(), (b - a) * t.element_size(), mapped)
    return out


class TensorSource(Mapping):
    """Read-only, lazy ``{key: tensor}`` view over one or more weight files; tensors load on access.

    By default every tensor it hands out lives in its own memory (never a memory map of the file): the file may
    be overwritten or deleted afterwards. Files added with ``mmap=True`` hand out views of a private
    (copy-on-write) memory map instead: no copy and no read until a page is touched, but the file must not
    be modified in place while the tensors live (replacing or deleting it is safe).
    """

    def __init__(self) -> None:
        self._where: dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: dict[str, tuple] = {}
        self.files: list[str] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key]()

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor (self[key])
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def rekey(self, mapping: Mapping[str, str]) -> "TensorSource":
        """A view with keys renamed (``mapping`` old → new); keys not in ``mapping`` are dropped."""
        out = TensorSource()
        out.files = self.files
        for old, new in mapping.items():
            out._where[new] = self._where[old]
            out._shapes[new] = self._shapes[old]
        return out

    @classmethod
    def from_dict(cls, sd: Mapping[str, torch.Tensor]) -> "TensorSource":
        out = cls()
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                out._where[k] = (lambda v=v: v)
                out._shapes[k] = tuple(v.shape)
        return out

    def _add_safetensors(self, path: str, mmap: bool = False, drop_behind: bool = False) -> None:
        header, data_start = read_safetensors_header(path)
        storage = None
        if mmap and sys.byteorder == "little" and header:
            # positional: the size argument is named `size` or `nbytes` depending on the torch version
            storage = torch.UntypedStorage.from_file(path, False, os.path.getsize(path))  # MAP_PRIVATE
        for k, info in header.items():
            if sys.byteorder != "little":  # the format is little-endian: let safetensors swap the bytes, then copy
                self._where[k] = (lambda k=k: _safetensors_swapped(path, k))
            elif storage is not None and (data_start + info["data_offsets"][0]) % info["torch_dtype"].itemsize == 0:
                self._where[k] = (lambda info=info: _mapped_safetensors_tensor(storage, data_start, info))
            else:  # not mapped, or an offset the dtype cannot start at (the format does not promise alignment)
                self._where[k] = (lambda info=info: _read_safetensors_tensor(path, data_start, info, drop_behind))
            self._shapes[k] = tuple(info["shape"])
        self.files.append(path)

    def _add_torch(self, path: str, mmap: bool = False) -> None:
        sd = unwrap_state_dict(torch_load_weights(path, mmap=True), path)
        mapped = _file_mappings(path)  # empty for the legacy format (read into memory, nothing to release)
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                # a memory-mapped tensor is copied out of the map (unless mmap=True); one read into memory is
                # already its own
                storage = v.untyped_storage()
                in_map = any(lo <= storage.data_ptr() < hi for lo, hi in mapped)
                self._where[k] = (lambda v=v: _owned_copy(v, mapped)) if in_map and not mmap else (lambda v=v: v)
                self._shapes[k] = tuple(v.shape)
        self.files.append(path)


def _mapped_safetensors_tensor(storage: torch.UntypedStorage, data_start: int, info: dict) -> torch.Tensor:
    """A view of one tensor in the file's private memory map (no copy; pages are read when touched)."""
    dtype, shape = info["torch_dtype"], tuple(info["shape"])
    offset = (data_start + info["data_offsets"][0]) // dtype.itemsize  # in elements (callers checked alignment)
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape)  # contiguous strides


def _safetensors_swapped(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as handle:
        return handle.get_tensor(key).clone()


def unwrap_state_dict(obj, path: str = "checkpoint") -> dict:
    """Strip ``{'module': ...}`` / ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    while True:
        inner = next((obj[w] for w in WRAPPER_KEYS if isinstance(obj.get(w), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {', '.join(list(obj)[:8])})")
    return dict(obj)


def find_weight_files(directory: str) -> list[str]:
    """Weight files of a Hugging Face directory: sharded or single safetensors, else ``pytorch_model*.bin``."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            files = sorted({os.path.join(directory, v) for v in weight_map.values()})
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise CheckpointError(f"{index}: shard file missing: {missing[0]}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    shards = sorted(f for f in os.listdir(directory) if re.match(r"model-\d+-of-\d+\.safetensors$", f))
    if shards:
        return [os.path.join(directory, f) for f in shards]
    raise CheckpointError(f"{directory}: no model.safetensors, sharded safetensors or pytorch_model.bin found")


def open_weights(path: str | os.PathLike, *, mmap: bool = False) -> TensorSource:
    """Lazy tensors of a weight file or a Hugging Face directory.

    ``mmap=True``: the tensors are views of private memory maps of the files (see :class:`TensorSource`).
    Raises :class:`CheckpointError` for a missing or unreadable file.
    """
    path = os.fspath(path)
    files = find_weight_files(path) if os.path.isdir(path) else [path]
    src = TensorSource()
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: no such weight file")
    copied = 0 if mmap else sum(os.path.getsize(f) for f in files if f.endswith(".safetensors"))
    drop_behind = copied > 0 and drop_behind_for(copied)
    for f in files:
        if f.endswith(".safetensors"):
            src._add_safetensors(f, mmap, drop_behind)
        else:
            src._add_torch(f, mmap)
    return src


# ---------------------------------------------------------------------------------------------------
# Mapping checkpoint keys to a vision model
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What loading did: key family, keys ignored (known heads) and position-embedding resizing."""

    family: str = ""
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"family={self.family}"]
        if self.ignored:
            heads = sorted({k.split(".")[0] for k in self.ignored})
            parts.append(f"ignored {len(self.ignored)} keys of known heads ({', '.join(heads)})")
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        return "; ".join(parts)


def strip_prefix(keys: Iterable[str], prefixes: Iterable[str]) -> dict[str, str]:
    """Map each key to itself without the first prefix (of ``prefixes``) shared by the keys that carry one."""
    keys = list(keys)
    for p in prefixes:
        if any(k.startswith(p) for k in keys):
            return {k: k[len(p):] for k in keys if k.startswith(p)}
    return {k: k for k in keys}


def vision_key_map(keys: Iterable[str], prefix: str = "") -> tuple[dict[str, str], str, list[str]]:
    """Map checkpoint keys onto ``InternViT`` names (optionally under ``prefix``).

    Accepts either family, ``module.`` / ``vision_model.`` / ``backbone.`` prefixes. Returns
    ``(mapping ckpt_key → model_key, family, ignored_keys)``.
    """
    keys = list(keys)
    stripped = strip_prefix(keys, ("module.", "vision_model.", "backbone."))
    vit_keys = {}
    ignored = [k for k in keys if k not in stripped]
    for ck, k in stripped.items():
        if k.startswith(KNOWN_EXTRA_PREFIXES):
            ignored.append(ck)
        else:
            vit_keys[ck] = k
    if not vit_keys:
        raise CheckpointError(f"no InternViT keys found (neither embeddings.*/encoder.layers.* nor "
                              f"cls_token/blocks.*); its keys: {_fmt_keys(sorted(keys), 5)}")
    family = detect_family(vit_keys.values())
    rename = original_to_hf_key if family == "original" else (lambda k: k)
    return {ck: prefix + rename(k) for ck, k in vit_keys.items()}, family, ignored


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_into(
    model: nn.Module,
    source: TensorSource,
    *,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
    resizers: Optional[Mapping[str, Callable[[torch.Tensor, tuple], torch.Tensor]]] = None,
    origin: str = "checkpoint",
) -> list[str]:
    """Assign ``source`` (already in model key names) to ``model`` (usually on the meta device), strictly.

    Tensors are read one at a time, cast to ``dtype`` (``None``: kept as stored) and moved, then assigned
    without a further copy. A key listed in
    ``resizers`` whose shape differs is passed through its function (e.g. position-embedding
    interpolation). Raises :class:`CheckpointError` naming every missing, unexpected and mis-shaped key.
    Returns the keys that were resized.
    """
    resizers = dict(resizers or {})
    expected = dict(model.state_dict(keep_vars=True))
    missing = sorted(k for k in expected if k not in source)
    unexpected = sorted(k for k in source if k not in expected)
    mis_shaped, resized = [], []
    for k in source:
        if k in expected and tuple(source.shape(k)) != tuple(expected[k].shape):
            if k in resizers:
                resized.append(k)
            else:
                mis_shaped.append(f"{k} (checkpoint {list(source.shape(k))} vs model {list(expected[k].shape)})")
    if missing or unexpected or mis_shaped:
        msg = []
        if missing:
            msg.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if mis_shaped:
            msg.append(f"mis-shaped keys: {_fmt_keys(sorted(mis_shaped))}")
        raise CheckpointError(f"{origin} does not match the model config: " + "; ".join(msg))

    for name, target in expected.items():
        t = source[name]
        if name in resized:
            t = resizers[name](t, tuple(target.shape))
        if t.is_floating_point():
            t = t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
        else:
            t = t.to(device=device)
        _assign(model, name, t)
        del t
    return resized


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        mod._buffers[attr] = tensor


def materialize_meta(model: nn.Module, device: str | torch.device = "cpu") -> None:
    """Give real (zero) storage to anything still on the meta device (e.g. non-persistent buffers)."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[name] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)


# ---------------------------------------------------------------------------------------------------
# InternVL-C / InternVL-G (vision + QLLaMA text tower + projectors)
# ---------------------------------------------------------------------------------------------------
#: InternVL keys that keep their name in every family (besides ``vision_model.*`` and ``qllama.model.*``).
INTERNVL_OWN_PREFIXES: tuple[str, ...] = (
    "clip_projector.", "clip_projector2.", "query_tokens", "text_projection", "logit_scale",
)
#: InternVL keys that are read but not used for embeddings (generation / matching heads, rotary caches).
INTERNVL_IGNORED = re.compile(r"^(qllama\.lm_head\.|lm_head\.|itm_head\.)|\.rotary_emb\.inv_freq$")


def internvl_key_map(keys: Iterable[str]) -> tuple[dict[str, str], str, list[str]]:
    """Map InternVL checkpoint keys onto :class:`internvit.models.internvl.InternVLModel` names.

    Two families: the Hugging Face InternVL-14B layout (``vision_model.*``, ``qllama.model.*``, projectors,
    ``query_tokens``, ``text_projection``, ``logit_scale``) and the PyTorch ``internvl_c_13b_224px.pth``
    layout (original-family ViT keys at top level, ``clip_projector.*``, a LLaMA ``transformer.*`` text tower,
    ``text_projection``, ``logit_scale``). The ViT part goes through :func:`vision_key_map`, the text tower
    through :data:`VIT_KEY_TABLE`. Returns ``(mapping ckpt_key → model_key, family, ignored_keys)``;
    unknown keys are mapped to themselves so that loading reports them as unexpected.
    """
    keys = list(keys)
    stripped = strip_prefix(keys, ("module.",))
    unprefixed = {v: k for k, v in stripped.items()}  # key without ``module.`` → checkpoint key
    vis, vfamily, rest = vision_key_map(list(unprefixed), prefix="vision_model.")
    mapping = {unprefixed[k]: v for k, v in vis.items()}
    ignored = [k for k in keys if k not in stripped]
    for k in rest:
        ck = unprefixed[k]
        if INTERNVL_IGNORED.search(k):
            ignored.append(ck)
            continue
        mapping[ck] = original_to_hf_key(k) if k.startswith("transformer.") else k
    family = "internvl-hf" if any(k.startswith("vision_model.") for k in unprefixed) else f"internvl-{vfamily}"
    return mapping, family, ignored
