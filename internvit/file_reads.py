"""Reading the bytes of weight files: safetensors headers and tensors, fast and without leaving the file tied to
the result unless asked.

* :func:`read_safetensors_header` checks a header against the file size before any tensor is read.
* :func:`read_safetensors_tensor` copies one tensor into its own memory, large ones in chunks on
  :func:`io_threads` threads; when the files and their copy do not both fit in memory
  (:func:`drop_behind_for`) each copied chunk leaves the page cache.
* :func:`owned_copy` copies a memory-mapped tensor (``.pth`` zip) out of its map, releasing the map's pages.
* :func:`page_cache_bytes`, :func:`available_memory`: what the kernel holds, for the rules above and the
  benchmarks.

:mod:`internvit.checkpoints` builds its lazy :class:`~internvit.checkpoints.TensorSource` on these.
"""
from __future__ import annotations

import ctypes
import json
import mmap as mmap_module
import os
import sys
from typing import Callable, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the keys or the file."""


class RunnerCheckpointError(CheckpointError):
    """A plain weight file (a state dict of tensors) was expected, and ``path`` is an mmengine runner checkpoint:
    what ``tools/train.py`` saves (``iter_N.pth``, ``best_*.pth``: ``meta``, ``state_dict``, ``message_hub``,
    ``optimizer``, ...), which pickles numpy values and history buffers as well. ``keys`` are its top-level keys.
    The default message says what reads such a file; a tool may say more (what it expected instead)."""

    def __init__(self, path: str, keys: list, message: Optional[str] = None) -> None:
        self.path, self.keys = path, list(keys)
        super().__init__(message or f"{path}: an mmengine runner checkpoint ({self.described()}), not a plain "
                                    f"weight file: {RUNNER_CHECKPOINT_READERS}")

    def described(self) -> str:
        """``'what tools/train.py saves: meta, state_dict, message_hub, ...'``"""
        keys = ", ".join(str(k) for k in self.keys[:5]) + (", ..." if len(self.keys) > 5 else "")
        return f"what tools/train.py saves: {keys}"


#: what reads an mmengine runner checkpoint as it is
RUNNER_CHECKPOINT_READERS = "tools/test.py, and tools/train.py's --resume and load_from, read it directly"


def not_a_file_reason(path: str, what: str = "file") -> str:
    """Why ``path`` cannot be read as a ``what`` (it is not a regular file): ``'no such checkpoint file'``, ``'a
    folder, not a checkpoint file'``, ``'a broken symbolic link (to TARGET)'`` or ``'not a regular file (a device,
    pipe or socket)'``."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)})"
    if os.path.isdir(path):
        return f"a folder, not a {what}"
    if os.path.exists(path):
        return "not a regular file (a device, pipe or socket)"
    return f"no such {what}"


def require_file(path: str, what: str = "file") -> None:
    """Raise ``FileNotFoundError`` / ``IsADirectoryError`` / ``OSError`` (``"<path>: <reason>"``, see
    :func:`not_a_file_reason`) unless ``path`` is a regular file (a symlink to one counts)."""
    if os.path.isfile(path):
        return
    reason = not_a_file_reason(path, what)
    error = IsADirectoryError if os.path.isdir(path) else OSError if os.path.exists(path) else FileNotFoundError
    raise error(f"{path}: {reason}")


def first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


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
        ranges = []
        for key, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if dtype is None:
                raise ValueError(f"tensor {key}: unsupported dtype ({info!r:.60})")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
                raise ValueError(f"tensor {key}: shape {shape!r:.60} / data_offsets {offsets!r:.60} are not lists "
                                 f"of non-negative integers")
            begin, end = offsets
            numel = 1
            for d in shape:
                numel *= d
            if not begin <= end <= data_size or end - begin != numel * dtype.itemsize:
                raise ValueError(f"tensor {key}: bytes {begin}..{end} do not fit shape {shape} / the "
                                 f"{data_size}-byte data section (truncated file?)")
            info["torch_dtype"] = dtype
            if end > begin:
                ranges.append((begin, end, key))
        ranges.sort()
        for (_, end0, key0), (begin1, _, key1) in zip(ranges, ranges[1:]):
            if begin1 < end0:  # two tensors sharing bytes: one of them would load the other's values
                raise ValueError(f"tensors {key0} and {key1} overlap in the data section")
        return header, 8 + n
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def _int_list(v) -> bool:
    """A JSON list of non-negative integers that fit int64 (``bool`` is not an integer here)."""
    return isinstance(v, list) and all(type(x) is int and 0 <= x < 2**63 for x in v)


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


def read_safetensors_tensor(path: str, data_start: int, info: dict, drop_behind: bool = False) -> torch.Tensor:
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
        if drop and n:  # (a length of 0 would mean "to the end of the file")
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
    """Bytes this process can get without swapping or hitting a memory limit, page cache counted as free, or
    ``None`` where unknown: the smaller of Linux ``MemAvailable`` (free memory plus the reclaimable page cache)
    and what this process's memory cgroups still allow (:func:`cgroup_memory_room`: containers)."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    room = cgroup_memory_room()
    return room if avail is None else avail if room is None else min(avail, room)


#: a cgroup limit at least this large means "no limit" (cgroup v1 writes 2^63 rounded down to a page)
_NO_LIMIT = 1 << 62


def cgroup_memory_room(proc_cgroup: str = "/proc/self/cgroup", fs_root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The least ``limit - usage + page cache`` over this process's memory cgroup and its ancestors that set a
    limit (cgroup v2 ``memory.max`` / ``memory.current`` / ``memory.stat: file``, else v1
    ``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` / ``memory.stat: total_cache``), in bytes; ``None``
    when no limit is set or none can be read (not Linux). The page cache is charged to the cgroup, so a
    container's limit, not the host's memory, decides whether files and their copy both fit."""
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    v2 = os.path.isfile(os.path.join(fs_root, "cgroup.controllers"))
    if v2:
        rel = next((e[2] for e in entries if e[0] == "0" and e[1] == ""), None)
        root, files, cache_keys = fs_root, ("memory.max", "memory.current"), ("file",)
    else:
        rel = next((e[2] for e in entries if "memory" in e[1].split(",")), None)
        root, files, cache_keys = os.path.join(fs_root, "memory"), \
            ("memory.limit_in_bytes", "memory.usage_in_bytes"), ("total_cache", "cache")
    if rel is None:
        return None
    rooms, level = [], os.path.join(root, rel.strip("/"))
    while True:
        try:
            with open(os.path.join(level, files[0]), encoding="ascii") as f:
                limit_text = f.read().strip()
            limit = _NO_LIMIT if limit_text == "max" else int(limit_text)
            if limit < _NO_LIMIT:
                with open(os.path.join(level, files[1]), encoding="ascii") as f:
                    usage = int(f.read())
                with open(os.path.join(level, "memory.stat"), encoding="ascii") as f:
                    stat = dict(line.split()[:2] for line in f if len(line.split()) >= 2)
                cache = next((int(stat[k]) for k in cache_keys if k in stat), 0)
                rooms.append(max(0, limit - usage + cache))
        except (OSError, ValueError):
            pass
        parent = os.path.dirname(level.rstrip("/"))
        if os.path.realpath(level) == os.path.realpath(root) or parent == level.rstrip("/"):
            break
        level = parent
    return min(rooms) if rooms else None


_LIBC = None


def _libc() -> ctypes.CDLL:
    """The C library with the signatures of ``madvise`` and ``mincore`` set (loaded once)."""
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC = libc
    return _LIBC


def page_cache_bytes(path: str) -> int:
    """Bytes of ``path`` resident in the page cache (Linux ``mincore`` over a private map of the file, which
    touches no page), or -1 where that cannot be read (not Linux, an empty file)."""
    size = os.path.getsize(path)
    if not sys.platform.startswith("linux") or size == 0:
        return -1
    libc = _libc()
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
    cache + copy at about one checkpoint (measured: 11.8 GB of shards, 23.5 GiB RAM, fresh processes, medians
    of 3 alternated: cold cache 39.7 s without, 16.4 s with; warm 32.0 s without, 9.9 s with). When both
    fit, nothing is dropped: the next load, or another process reading the same files, finds them cached.
    """
    avail = available_memory()
    return avail is not None and 2 * nbytes > 0.9 * avail


def _release_pages(start: int, nbytes: int, mapped: list[tuple[int, int, int]],
                   drop_fd: Optional[int] = None) -> None:
    """Drop the resident pages of ``[start, start + nbytes)`` from this process (Linux) when that range lies in
    one of the ``mapped`` file mappings; they are re-read from the file on the next access. Only whole pages
    inside the range are released, and never memory outside a file mapping (that would lose its contents).
    With ``drop_fd`` (the mapped file, open), those pages also leave the page cache (see :func:`drop_behind_for`).
    """
    where = next(((lo, off) for lo, hi, off in mapped if lo <= start and start + nbytes <= hi), None)
    if nbytes <= 0 or where is None:
        return
    page = mmap_module.PAGESIZE
    lo, hi = -(-start // page) * page, (start + nbytes) // page * page
    if hi > lo:
        _libc().madvise(lo, hi - lo, mmap_module.MADV_DONTNEED)
        if drop_fd is not None and hasattr(os, "posix_fadvise"):  # unmapped now, so the cache may drop them
            os.posix_fadvise(drop_fd, lo - where[0] + where[1], hi - lo, os.POSIX_FADV_DONTNEED)


def file_mappings(path: str) -> list[tuple[int, int, int]]:
    """``(start, end, file offset)`` of each range at which this process maps ``path`` (Linux
    ``/proc/self/maps``; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    real, out = os.path.realpath(path), []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5] == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, int(parts[2], 16)))
    except OSError:
        return []
    return out


_COPY_CHUNK_BYTES = 16 * 1024**2


def owned_copy(t: torch.Tensor, mapped: list[tuple[int, int, int]], path: Optional[str] = None,
               drop_behind: bool = False) -> torch.Tensor:
    """A copy of a memory-mapped tensor in its own memory, copied in chunks whose mapped pages (inside the
    ``mapped`` ranges, :func:`file_mappings`) are released right after: reading a whole file this way peaks at
    about one copy of the weights plus one chunk. ``drop_behind`` (with the mapped file's ``path``): the
    released pages also leave the page cache, see :func:`drop_behind_for`."""
    fd = os.open(path, os.O_RDONLY) if drop_behind and path is not None else None
    try:
        if not t.is_contiguous() or t.numel() == 0:
            out = t.clone(memory_format=torch.contiguous_format)
            storage = t.untyped_storage()
            _release_pages(storage.data_ptr(), storage.nbytes(), mapped, fd)
            return out
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
        src, dst = t.reshape(-1), out.reshape(-1)
        step = max(1, _COPY_CHUNK_BYTES // t.element_size())
        for a in range(0, src.numel(), step):
            b = min(a + step, src.numel())
            dst[a:b].copy_(src[a:b])
            _release_pages(src.data_ptr() + a * t.element_size(), (b - a) * t.element_size(), mapped, fd)
        return out
    finally:
        if fd is not None:
            os.close(fd)


def mapped_safetensors_tensor(storage: torch.UntypedStorage, data_start: int, info: dict) -> torch.Tensor:
    """A view of one tensor in the file's private memory map (no copy; pages are read when touched)."""
    dtype, shape = info["torch_dtype"], tuple(info["shape"])
    offset = (data_start + info["data_offsets"][0]) // dtype.itemsize  # in elements (callers checked alignment)
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape)  # contiguous strides


def swapped_safetensors_tensor(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as handle:
        return handle.get_tensor(key).clone()
