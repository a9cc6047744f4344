"""Checkpoint reading, key families and loading: with :mod:`internvit.file_reads` (the bytes of safetensors
files), the only place that knows checkpoint formats.

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
import json
import logging
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from .file_reads import (
    CheckpointError,
    RunnerCheckpointError,
    drop_behind_for,
    file_mappings,
    first_line,
    mapped_safetensors_tensor,
    not_a_file_reason,
    owned_copy,
    read_safetensors_header,
    read_safetensors_tensor,
    swapped_safetensors_tensor,
)

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
            # torch finds ``data.pkl`` without regard to case (miniz's look-up): every entry that could be it is
            # vetted, and names that differ only in case (which of them torch reads is not ours to guess) refused
            pkls = [n for n in names if n.lower().endswith(".pkl")]
            if len({n.lower() for n in names}) != len(names) or not pkls:
                why = "without data.pkl" if not pkls else "with duplicate entries" if len(set(names)) != len(names) \
                    else "with entries whose names differ only in case"
                raise CheckpointError(f"{path}: not a torch checkpoint (zip archive {why})")
            for name in pkls:
                _globals_of_pickle(pickletools.genops(z.read(name)), path, found)
        return found, True
    except CheckpointError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        if isinstance(e, OSError) and not os.path.isfile(path):
            raise CheckpointError(f"{path}: {not_a_file_reason(path, 'weight file')}") from None
        if _is_safetensors(path):
            raise CheckpointError(f"{path}: a safetensors file, not a torch checkpoint (.pth / .bin, made by "
                                  f"torch.save) as this reader needs") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{first_line(e)})") from None


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header size, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 32)


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


def runner_checkpoint_keys(path: str, refused: Iterable[str]) -> Optional[list]:
    """The top-level keys of ``path`` when it is an mmengine runner checkpoint (what ``tools/train.py`` saves: a
    dict with ``meta``, ``state_dict`` and ``message_hub``) whose ``refused`` globals are only those such a
    checkpoint pickles; else ``None``. Read with :func:`internvit.compat.load_runner_checkpoint` (memory-mapped),
    which runs no code: a file it refuses is not one."""
    from .compat import is_runner_global, load_runner_checkpoint

    if not all(is_runner_global(g) for g in refused):
        return None
    try:
        obj = load_runner_checkpoint(path, "cpu", mmap=True)
    except CheckpointError:
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping) and isinstance(obj.get("meta"), dict)
            and "message_hub" in obj):
        return None
    return [str(k) for k in obj]


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
    refused = [g for g in found if not allowed(g)]
    if refused:
        keys = runner_checkpoint_keys(path, refused)
        if keys is not None:
            raise RunnerCheckpointError(path, keys)
    refuse_globals(path, found, allowed)
    try:
        with only_safe_globals(safe_globals):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=bool(mmap and is_zip))
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the user gets one line naming the file
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: "
                              f"{torch_load_reason(str(e))})") from None
    check_plain_data(obj, path, allowed_types)
    return obj


#: what is said when torch's refusal holds nothing but its advice
TORCH_REFUSAL = "torch's weights_only unpickler refused the file's contents"
#: pieces of torch's advice (2.4: "Weights only load failed. Re-running `torch.load` with `weights_only` set to
#: `False` will likely succeed, ... WeightsUnpickler error: REASON"; 2.6+: the same advice before or after REASON,
#: then "Check the documentation of torch.load ...")
_TORCH_ADVICE = re.compile(r"weights_only`? (set to|=) `?False|will likely succeed|trusted source|arbitrary code"
                           r"|you have two options", re.IGNORECASE)


def torch_load_reason(text: str) -> str:
    """The reason in the text of a ``torch.load`` error (at most 300 characters), without torch's advice to turn
    weights-only loading off (this module never does): its ``WeightsUnpickler error`` / ``Trying to load
    unsupported GLOBAL ...`` line, else every line that is not advice, else :data:`TORCH_REFUSAL`."""
    if "WeightsUnpickler error:" in text:  # torch's refusal: keep its reason, not its advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split("Check the documentation of torch.load", 1)[0]
    for advice in (getattr(torch.serialization, "UNSAFE_MESSAGE", None), "Weights only load failed."):
        text = text.replace(advice, "\n") if advice else text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = [ln for ln in lines if "GLOBAL" in ln and not _TORCH_ADVICE.search(ln)]
    detail = " ".join(reason or [ln for ln in lines if not _TORCH_ADVICE.search(ln)])
    return detail[:300] or TORCH_REFUSAL


def torch_load_weights(path: str, *, mmap: bool = True) -> dict:
    """A weight file's contents, read without running code (:func:`safe_torch_load`): tensors, dicts and
    numbers only. Zip checkpoints are memory-mapped (``mmap=True``): copy what you keep (``TensorSource``
    does) before the file may change."""
    return safe_torch_load(path, map_location="cpu", mmap=mmap)


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
        self._dtypes: dict[str, torch.dtype] = {}
        self._file_of: dict[str, str] = {}
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

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key`` (read from the file's header / pickle: no tensor data is read)."""
        return self._dtypes[key]

    def rekey(self, mapping: Mapping[str, str]) -> "TensorSource":
        """A view with keys renamed (``mapping`` old → new); keys not in ``mapping`` are dropped."""
        out = TensorSource()
        out.files = self.files
        for old, new in mapping.items():
            out._where[new] = self._where[old]
            out._shapes[new] = self._shapes[old]
            out._dtypes[new] = self._dtypes[old]
        return out

    @classmethod
    def from_dict(cls, sd: Mapping[str, torch.Tensor]) -> "TensorSource":
        out = cls()
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                out._where[k] = (lambda v=v: v)
                out._shapes[k] = tuple(v.shape)
                out._dtypes[k] = v.dtype
        return out

    def _claim(self, key: str, path: str) -> None:
        """Record that ``key`` comes from ``path``; a key in two files of one checkpoint is refused (which
        copy would load would depend on the order of the files)."""
        if key in self._file_of:
            raise CheckpointError(f"{path}: tensor {key} is also in {self._file_of[key]} (each key must be in one "
                                  f"file of a checkpoint)")
        self._file_of[key] = path

    def _add_safetensors(self, path: str, mmap: bool = False, drop_behind: bool = False) -> None:
        header, data_start = read_safetensors_header(path)
        storage = None
        if mmap and sys.byteorder == "little" and header:
            # positional: the size argument is named `size` or `nbytes` depending on the torch version
            storage = torch.UntypedStorage.from_file(path, False, os.path.getsize(path))  # MAP_PRIVATE
        for k, info in header.items():
            self._claim(k, path)
            if sys.byteorder != "little":  # the format is little-endian: let safetensors swap the bytes, then copy
                self._where[k] = (lambda k=k: swapped_safetensors_tensor(path, k))
            elif storage is not None and (data_start + info["data_offsets"][0]) % info["torch_dtype"].itemsize == 0:
                self._where[k] = (lambda info=info: mapped_safetensors_tensor(storage, data_start, info))
            else:  # not mapped, or an offset the dtype cannot start at (the format does not promise alignment)
                self._where[k] = (lambda info=info: read_safetensors_tensor(path, data_start, info, drop_behind))
            self._shapes[k] = tuple(info["shape"])
            self._dtypes[k] = info["torch_dtype"]
        self.files.append(path)

    def _add_torch(self, path: str, mmap: bool = False, drop_behind: bool = False) -> None:
        sd = unwrap_state_dict(torch_load_weights(path, mmap=True), path)
        mapped = file_mappings(path)  # empty for the legacy format (read into memory, nothing to release)
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                self._claim(k, path)
                # a memory-mapped tensor is copied out of the map (unless mmap=True); one read into memory is
                # already its own
                storage = v.untyped_storage()
                in_map = any(lo <= storage.data_ptr() < hi for lo, hi, _ in mapped)
                self._where[k] = (lambda v=v: owned_copy(v, mapped, path, drop_behind)) if in_map and not mmap \
                    else (lambda v=v: v)
                self._shapes[k] = tuple(v.shape)
                self._dtypes[k] = v.dtype
        self.files.append(path)


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


#: the weight sets of a Hugging Face folder, in the order ``transformers`` takes them (safetensors before pickles)
WEIGHT_SETS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def _read_shard_index(index: str) -> list[str]:
    """The shard files a ``*.index.json`` names (all present), or :class:`CheckpointError`."""
    directory = os.path.dirname(index)
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is not a non-empty JSON object")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v  # the key: a null
                    or os.path.basename(v) != v or v in (".", "..")), None)  # shard was taken for "none found"
        if bad is not None:
            raise ValueError(f"shard {weight_map[bad]!r:.80} of {bad!r:.80} is not a file name in this folder")
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({first_line(e)})") from None
    files = sorted({os.path.join(directory, v) for v in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"{index}: shard file missing: {missing[0]}")
    return files


def find_weight_files(directory: str) -> list[str]:
    """Weight files of a Hugging Face directory, taken in ``transformers``' order (:data:`WEIGHT_SETS`:
    ``model.safetensors``, its shard index, ``pytorch_model.bin``, its shard index), else unindexed
    ``model-N-of-M.safetensors`` shards. When the folder holds more than one set, a warning names the files not
    read. Raises :class:`CheckpointError` for a folder without weights, a broken symbolic link in place of a
    weight file and an invalid or incomplete shard index."""
    present = [n for n in WEIGHT_SETS if os.path.lexists(os.path.join(directory, n))]
    if present:
        chosen = os.path.join(directory, present[0])
        if not os.path.exists(chosen):
            raise CheckpointError(f"{chosen}: {not_a_file_reason(chosen, 'weight file')}")
        files = _read_shard_index(chosen) if chosen.endswith(".index.json") else [chosen]
        if len(present) > 1:
            logging.getLogger("internvit").warning(
                "%s: holds more than one set of weights: read %s (the order transformers uses), not %s",
                directory, present[0], ", ".join(present[1:]))
        return files
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
            raise CheckpointError(f"{f}: {not_a_file_reason(f, 'weight file')}")
    copied = 0 if mmap else sum(os.path.getsize(f) for f in files)
    drop_behind = copied > 0 and drop_behind_for(copied)
    for f in files:
        if f.endswith(".safetensors"):
            src._add_safetensors(f, mmap, drop_behind)
        else:
            src._add_torch(f, mmap, drop_behind)
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
    #: resized key → (checkpoint's grid side, model's grid side)
    grids: dict[str, tuple] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"family={self.family}"]
        if self.ignored:
            heads = sorted({k.split(".")[0] for k in self.ignored})
            parts.append(f"ignored {len(self.ignored)} keys of known heads ({', '.join(heads)})")
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        return "; ".join(parts)


def _is_vit_key(key: str) -> bool:
    """Whether ``key`` (without prefixes) is an InternViT key of either family."""
    return key in ("cls_token", "pos_embed") or key.startswith(("embeddings.", "encoder.layers.", "blocks.",
                                                                 "patch_embed."))


def _refuse_collisions(renamed: Mapping[str, str]) -> None:
    """Raise :class:`CheckpointError` when two checkpoint keys become one name once their prefixes are removed."""
    seen: dict[str, str] = {}
    for ck, k in renamed.items():
        if k in seen:
            raise CheckpointError(f"tensors {seen[k]} and {ck} are both {k} once their prefixes are removed (which "
                                  f"one to load is not clear)")
        seen[k] = ck


def strip_module_prefix(keys: Iterable[str]) -> dict[str, str]:
    """Map each key to itself without a leading ``module.`` (DDP / DeepSpeed wrappers), key by key, as timm's
    ``clean_state_dict`` does: a key without it is kept as it is. Raises :class:`CheckpointError` when ``x`` and
    ``module.x`` are both there."""
    out = {k: k[len("module."):] if k.startswith("module.") else k for k in keys}
    _refuse_collisions(out)
    return out


#: prefixes of the vision tower inside a larger model (InternVL-Chat, an mmseg segmentor), stripped after ``module.``
TOWER_PREFIXES = ("vision_model.", "backbone.")


def vision_key_map(keys: Iterable[str], prefix: str = "") -> tuple[dict[str, str], str, list[str]]:
    """Map checkpoint keys onto ``InternViT`` names (optionally under ``prefix``).

    Accepts either family. ``module.`` is removed from every key that has it, then ``vision_model.`` /
    ``backbone.`` (the first of them that a key has): when the keys carry it, the keys without it that are not
    InternViT keys (another tower or head) are ignored. Returns ``(mapping ckpt_key → model_key, family,
    ignored_keys)``. Raises :class:`CheckpointError` when no InternViT key is found or two keys become one.
    """
    keys = list(keys)
    unwrapped = strip_module_prefix(keys)
    tower = next((p for p in TOWER_PREFIXES if any(k.startswith(p) for k in unwrapped.values())), None)
    stripped, ignored = {}, []
    for ck, k in unwrapped.items():
        if tower and k.startswith(tower):
            stripped[ck] = k[len(tower):]
        elif tower is None or _is_vit_key(k):
            stripped[ck] = k
        else:
            ignored.append(ck)
    _refuse_collisions(stripped)
    vit_keys = {}
    for ck, k in stripped.items():
        if k.startswith(KNOWN_EXTRA_PREFIXES):
            ignored.append(ck)
        else:
            vit_keys[ck] = k
    if not any(_is_vit_key(k) for k in vit_keys.values()):
        raise CheckpointError(f"no InternViT keys found (neither embeddings.*/encoder.layers.* nor "
                              f"cls_token/blocks.*, after removing module. / vision_model. / backbone.); its keys: "
                              f"{_fmt_keys(sorted(keys), 5)}")
    family = detect_family(vit_keys.values())
    rename = original_to_hf_key if family == "original" else (lambda k: k)
    return {ck: prefix + rename(k) for ck, k in vit_keys.items()}, family, ignored


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


class LossyModelCastWarning(UserWarning):
    """Weights cast to a floating dtype that cannot hold them exactly (e.g. float32 weights to bfloat16 or
    float16): the model computes other numbers than its checkpoint's. Emitted once per cast (naming the first
    weight that changes); filter it with ``warnings.filterwarnings('ignore', category=LossyModelCastWarning)``.
    Weights that the lower precision holds exactly (bfloat16 weights stored as float32, and cast back) give
    none."""


def _holds_every_value(dst: torch.dtype, src: torch.dtype) -> bool:
    """Whether the floating dtype ``dst`` represents every value of ``src`` (finer or equal precision, range
    and smallest normal): float16 / bfloat16 -> float32 -> float64."""
    a, b = torch.finfo(dst), torch.finfo(src)
    return a.eps <= b.eps and a.max >= b.max and a.smallest_normal <= b.smallest_normal


def cast_changes(t: torch.Tensor, dtype: Optional[torch.dtype]) -> bool:
    """Whether casting the tensor ``t`` to the floating ``dtype`` changes any of its values (NaN stays NaN); cheap
    when ``dtype`` holds every value of ``t``'s dtype (no cast is made)."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype or _holds_every_value(dtype, t.dtype):
        return False
    back = t.detach().to(dtype).to(t.dtype)
    same = (back == t) | (back.isnan() & t.isnan())
    return not bool(same.all())


def warn_lossy_cast(first: Optional[tuple[str, torch.dtype]], dtype: torch.dtype, origin: str) -> None:
    """One :class:`LossyModelCastWarning` for a cast to ``dtype`` whose first changed weight is ``first``
    (``(name, its dtype)``; ``None``: nothing changed, no warning)."""
    if first is None:
        return
    import warnings

    name, src = first
    src_name, dst_name = (str(d).replace("torch.", "") for d in (src, dtype))
    warnings.warn(f"{origin}: casting the weights from {src_name} to {dst_name} changes their values (first: "
                  f"{name}): the model's outputs differ from the checkpoint's; keep {src_name} for the exact "
                  f"model, or filter LossyModelCastWarning to accept it",
                  LossyModelCastWarning, stacklevel=3)


def lossy_model_cast(model: nn.Module, dtype: torch.dtype) -> Optional[tuple[str, torch.dtype]]:
    """``(name, dtype)`` of the first parameter or buffer of ``model`` whose values casting it to ``dtype``
    would change (:func:`cast_changes`), ``None`` when the cast keeps every value."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "meta" and cast_changes(t, dtype):
            return name, t.dtype
    return None


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
    without a further copy; a cast that changes a weight's values gives one :class:`LossyModelCastWarning`. A
    key listed in ``resizers`` whose shape differs is passed through its function (e.g. position-embedding
    interpolation). Raises :class:`CheckpointError` naming every missing, unexpected and mis-shaped key, and
    a tensor whose kind of dtype (floating point or not) is not the model's (an integer or bool tensor cannot
    become a weight). Returns the keys that were resized.
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

    lossy: Optional[tuple[str, torch.dtype]] = None  # the first weight the cast to ``dtype`` changes
    for name, target in expected.items():
        t = source[name]
        if t.is_floating_point() != target.is_floating_point() or t.is_complex() != target.is_complex():
            raise CheckpointError(f"{origin}: {name} has dtype {str(t.dtype).replace('torch.', '')}, the model "
                                  f"expects {'floating point' if target.is_floating_point() else target.dtype} "
                                  f"(a corrupt or foreign checkpoint)")
        if name in resized:
            try:
                t = resizers[name](t, tuple(target.shape))
            except CheckpointError as e:  # e.g. a position grid that is not square: named with the file
                raise CheckpointError(f"{origin}: {e}") from None
        if t.is_floating_point():
            if lossy is None and cast_changes(t, dtype):
                lossy = (name, t.dtype)
            t = t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
        else:
            t = t.to(device=device)
        _assign(model, name, t)
        del t
    warn_lossy_cast(lossy, dtype, origin)
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
    unprefixed = {v: k for k, v in strip_module_prefix(keys).items()}  # key without ``module.`` → checkpoint key
    vis, vfamily, rest = vision_key_map(list(unprefixed), prefix="vision_model.")
    mapping = {unprefixed[k]: v for k, v in vis.items()}
    ignored = []
    for k in rest:
        ck = unprefixed[k]
        if INTERNVL_IGNORED.search(k):
            ignored.append(ck)
            continue
        mapping[ck] = original_to_hf_key(k) if k.startswith("transformer.") else k
    family = "internvl-hf" if any(k.startswith("vision_model.") for k in unprefixed) else f"internvl-{vfamily}"
    return mapping, family, ignored
