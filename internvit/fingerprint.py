"""What identifies a model's weights and an image preprocessing: one implementation for features and retrieval.

* :func:`weights_fingerprint` — a streamed SHA-256 over **every byte** of every tensor of the state dict (per
  tensor: name, shape, dtype, then its bytes; then the digests in ``state_dict`` order). Two models share a
  fingerprint only if they hold the same tensors bit for bit. For a module it is computed once and reused
  while the weights are unchanged (see :func:`weights_fingerprint` for what counts as a change). The hash stays
  SHA-256 (format ``v3``): BLAKE2b is about 1.5x faster on CPUs without SHA instructions (as measured on the
  2-core development machine) but slower on those with them (most current x86 and Arm servers), and a new
  algorithm would make every recorded fingerprint (feature manifests, retrieval indexes) mismatch. With the
  cache it is paid once per model and process.
* :func:`preprocessing_fingerprint` — a JSON-able description of the full preprocessing: a config dict as it
  is, a torchvision transform as its ``repr`` (which lists every parameter), with each ``Lambda``'s function
  named. An arbitrary callable cannot be described by its parameters: it is recorded by its qualified name and
  a warning says so (pass a preprocessing dict to make the identity exact).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import warnings
import weakref
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from .file_reads import io_threads

__all__ = ["weights_fingerprint", "preprocessing_fingerprint", "dataset_fingerprint",
           "PreprocessingFingerprintWarning", "clear_fingerprint_cache"]

#: bytes hashed per step (a tensor is cast / copied to the CPU at most this much at a time)
CHUNK_BYTES = 64 * 1024 * 1024
_VERSION = b"internvit-weights-sha256-v3\0"
#: elements read from each tensor (evenly spaced) into the cache key, to notice writes that bypass the version
#: counter (``p.data.copy_(...)``, writes through a NumPy view)
PROBE_ELEMENTS = 16


class PreprocessingFingerprintWarning(UserWarning):
    """A preprocessing callable whose parameters cannot be read: only its name identifies it."""


def _tensor_digest(name: str, t: torch.Tensor, dtype: Optional[torch.dtype], chunk_bytes: int) -> bytes:
    """SHA-256 of one tensor: ``[name, shape, dtype]`` as JSON, a NUL, then its raw bytes (C order)."""
    t = t.detach()
    if t.device.type == "meta":
        raise ValueError(f"weights_fingerprint: {name} has no data (meta tensor)")
    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
    h = hashlib.sha256(json.dumps([name, list(t.shape), str(target).replace("torch.", "")]).encode("utf-8") + b"\0")
    flat = t.reshape(-1)
    itemsize = torch.empty((), dtype=target).element_size()
    step = max(1, int(chunk_bytes) // max(itemsize, t.element_size()))
    for s in range(0, flat.numel(), step):
        part = flat[s:s + step]
        if part.dtype != target:
            part = part.to(target)
        part = part.cpu().contiguous()
        h.update(memoryview(part.view(torch.uint8).numpy()))  # hashlib releases the GIL: tensors hash in parallel
    return h.digest()


def _hash_state_dict(sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype], chunk_bytes: int,
                     workers: Optional[int]) -> str:
    from concurrent.futures import ThreadPoolExecutor

    items = list(sd.items())
    workers = workers or io_threads()
    with torch.no_grad():
        if workers == 1 or len(items) < 2:
            digests = [_tensor_digest(k, t, dtype, chunk_bytes) for k, t in items]
        else:
            with ThreadPoolExecutor(workers) as ex:
                digests = list(ex.map(lambda kv: _tensor_digest(kv[0], kv[1], dtype, chunk_bytes), items))
    h = hashlib.sha256(_VERSION)
    for d in digests:
        h.update(d)
    return h.hexdigest()


# -- cache: one fingerprint per (module, dtype) while its tensors are unchanged --------------------------
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _probe(t: torch.Tensor) -> bytes:
    """The bytes of up to :data:`PROBE_ELEMENTS` evenly spaced elements of ``t`` (a tiny copy)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    step = max(1, flat.numel() // PROBE_ELEMENTS)
    idx = torch.arange(0, flat.numel(), step, device=flat.device)[:PROBE_ELEMENTS]
    idx[-1] = flat.numel() - 1  # the last element too
    part = flat.index_select(0, idx).cpu().contiguous()
    return part.view(torch.uint8).numpy().tobytes()


def _state_key(sd: Mapping[str, torch.Tensor]) -> Optional[tuple]:
    """What must stay equal for a cached fingerprint to hold; ``None`` when it cannot be told (no cache).

    Per tensor: its name, the tensor object itself (compared by identity through a weak reference), device,
    data pointer, storage offset, dtype, shape, strides, autograd's in-place version counter (bumped by every
    in-place op: ``load_state_dict``, optimiser steps, ``copy_``/``add_`` under ``no_grad`` or inference mode)
    and a few sampled values. Inference tensors have no version counter: no key.
    """
    key = []
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.is_inference():
            return None
        key.append((name, t.device, t.data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride(),
                    t._version, _probe(t)))
    return tuple(key)


def clear_fingerprint_cache() -> None:
    """Forget every cached fingerprint (the next call hashes all weight bytes again)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def weights_fingerprint(model: Union[nn.Module, Mapping[str, torch.Tensor]],
                        dtype: Optional[torch.dtype] = None, *, chunk_bytes: int = CHUNK_BYTES,
                        workers: Optional[int] = None, cache: bool = True) -> str:
    """SHA-256 (64 hex digits) of all weights of ``model`` (a module or a state dict).

    Each tensor's digest covers its name, shape and dtype and then **all** of its raw bytes (C order, native
    little-endian), streamed in chunks of at most ``chunk_bytes`` (no full copy is made); the fingerprint is the
    SHA-256 of those digests in ``state_dict`` order. Tensors are hashed by ``workers`` threads (default: up to
    8 of the CPUs), so the cost is one pass of SHA-256 over the weight bytes spread over the cores. ``dtype``
    gives the fingerprint of the weights as that dtype would hold them (floating tensors are cast chunk by
    chunk: an fp32 model gives the fingerprint of its bf16 copy); ``None`` hashes them as they are.

    For a module (``cache=True``) the result is kept per ``(module, dtype)`` and returned again while every
    state-dict tensor is unchanged: the same tensor objects with the same data pointer, dtype, shape, strides,
    in-place version counter (``load_state_dict``, an optimiser step or any in-place op under ``no_grad``
    bumps it) and sampled values (so ``p.data.copy_(...)``, which bypasses the counter, is also seen when it
    changes the sampled elements). A write that bypasses the version counter *and* leaves the sampled
    elements equal is not seen: call :func:`clear_fingerprint_cache` (or pass ``cache=False``) after such
    writes. Modules holding inference tensors (made under ``torch.inference_mode``) are never cached.

    Raises ``ValueError`` for tensors without data (``meta`` device).
    """
    if not (cache and isinstance(model, nn.Module)):
        sd = model.state_dict() if isinstance(model, nn.Module) else model
        return _hash_state_dict(sd, dtype, chunk_bytes, workers)
    sd = model.state_dict(keep_vars=True)  # the tensor objects themselves (state_dict() detaches: new objects)
    key = _state_key(sd)
    if key is None:
        return _hash_state_dict(sd, dtype, chunk_bytes, workers)
    with _CACHE_LOCK:
        entry = _CACHE.get(model, {}).get(dtype)
    if entry is not None and entry["key"] == key and all(
            r() is t for r, t in zip(entry["refs"], sd.values())):
        return entry["fingerprint"]
    fp = _hash_state_dict(sd, dtype, chunk_bytes, workers)
    if _state_key(sd) == key:  # unchanged while it was hashed (another thread could write)
        with _CACHE_LOCK:
            _CACHE.setdefault(model, {})[dtype] = {"key": key, "refs": [weakref.ref(t) for t in sd.values()],
                                                   "fingerprint": fp}
    return fp


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_DEFAULT_REPR = re.compile(r"^<[\w.]+ object>$")


def _qualname(fn: Any) -> str:
    obj = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(fn).__name__)}"


def _is_ours(fn: Any) -> bool:
    return _qualname(fn).startswith(("internvit.", "classification.", "segmentation.", "retrieval."))


def _describe(transform: Callable, unknown: list) -> Any:
    """A JSON-able description; appends to ``unknown`` the callables known only by name."""
    from_tv = type(transform).__module__.startswith("torchvision.")
    inner = getattr(transform, "transforms", None)
    if from_tv and isinstance(inner, (list, tuple)):  # Compose / RandomApply / RandomChoice / ...
        text = " ".join(_ADDRESS.sub("", repr(transform)).split())
        return {"transform": text, "steps": [_describe(t, unknown) for t in inner]}
    if from_tv and type(transform).__name__ == "Lambda":
        fn = getattr(transform, "lambd", None)
        if fn is not None and not _is_ours(fn):
            unknown.append(_qualname(fn))
        return {"lambda": _qualname(fn)}
    if isinstance(transform, nn.Module) and not from_tv:
        unknown.append(_qualname(transform))
        return {"callable": _qualname(transform)}
    text = " ".join(_ADDRESS.sub("", repr(transform)).split())
    if from_tv:
        return text
    if hasattr(transform, "__code__") or _DEFAULT_REPR.match(text) or text.startswith("<"):
        if not _is_ours(transform):
            unknown.append(_qualname(transform))
        return {"callable": _qualname(transform)}
    return {"callable": _qualname(transform), "repr": text}  # a class with its own repr: trusted to list its state


def preprocessing_fingerprint(preprocess: Union[Mapping[str, Any], Callable]) -> dict:
    """A JSON-able dict that identifies ``preprocess`` (what manifests record and resumes compare).

    * a dict (as made by :func:`internvit.preprocess_config`): its JSON-normalised copy;
    * a torchvision transform (``Compose`` of ``Resize``, ``Normalize``, ...): ``{'transform': repr}`` (the repr
      lists every parameter), plus ``'steps'`` naming each ``Lambda``'s function;
    * any other callable: ``{'transform': ..., 'callable': 'module.qualname'}`` and a
      :class:`PreprocessingFingerprintWarning`: its parameters cannot be read, so two such callables with the
      same name but different behaviour are not told apart (pass a preprocessing dict instead).
    """
    if isinstance(preprocess, Mapping):
        return json.loads(json.dumps(dict(preprocess), sort_keys=True, default=str))
    if not callable(preprocess):
        raise TypeError(f"preprocess must be a dict or a callable, got {type(preprocess).__name__}")
    unknown: list = []
    desc = _describe(preprocess, unknown)
    out = desc if isinstance(desc, dict) else {"transform": desc}
    if "transform" not in out:
        out = {"transform": " ".join(_ADDRESS.sub("", repr(preprocess)).split()), **out}
    if unknown:
        out["unverified_callables"] = sorted(set(unknown))
        warnings.warn(f"preprocessing includes callables whose parameters cannot be recorded "
                      f"({', '.join(sorted(set(unknown)))}): resumes and index checks identify them by name "
                      f"only; pass a preprocessing dict to identify them exactly",
                      PreprocessingFingerprintWarning, stacklevel=2)
    return json.loads(json.dumps(out, default=str))


def dataset_fingerprint(dataset: Any) -> dict:
    """A JSON-able dict that identifies what a ``Dataset`` of ready tensors does to its images.

    ``{'dataset': 'module.qualname', 'transform': preprocessing_fingerprint(dataset.transform)}`` (the
    ``transform`` entry only when the dataset has a callable ``transform`` attribute). A dataset class from
    outside this project is known by its name only: it is listed in ``'unverified_callables'`` (with those of
    its transform) and a :class:`PreprocessingFingerprintWarning` is emitted, as for an arbitrary callable.
    """
    name = _qualname(type(dataset))
    out: dict = {"dataset": name}
    unknown = [] if _is_ours(type(dataset)) else [name]
    transform = getattr(dataset, "transform", None)
    if callable(transform):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PreprocessingFingerprintWarning)  # one warning below names them all
            fp = preprocessing_fingerprint(transform)
        unknown += fp.pop("unverified_callables", [])
        out["transform"] = fp
    if unknown:
        out["unverified_callables"] = sorted(set(unknown))
        warnings.warn(f"the dataset's preprocessing includes callables whose parameters cannot be recorded "
                      f"({', '.join(out['unverified_callables'])}): identified by name only; pass "
                      f"preprocess_id= to write() to identify them", PreprocessingFingerprintWarning, stacklevel=2)
    return json.loads(json.dumps(out, default=str))
