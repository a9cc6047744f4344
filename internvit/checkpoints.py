"""Checkpoint reading, key families and loading — the only place that knows checkpoint formats.

* Reading never executes code: safetensors (memory-mapped, one tensor at a time) or
  ``torch.load(weights_only=True, mmap=True)`` for ``.pth`` / ``.bin``.
* :data:`VIT_KEY_TABLE` is THE rename table between the original InternVL key family and ours (the
  Hugging Face names). A new family is a new row plus a detection rule in :func:`detect_family`.
* :func:`load_into` fills a model built on the ``meta`` device tensor by tensor, so loading never
  holds a second full copy of the weights, and reports missing / unexpected / mis-shaped keys by name.
"""
from __future__ import annotations

import json
import os
import re
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
# Reading
# ---------------------------------------------------------------------------------------------------
class TensorSource(Mapping):
    """Read-only, lazy ``{key: tensor}`` view over one or more weight files; tensors load on access."""

    def __init__(self) -> None:
        self._where: dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: dict[str, tuple] = {}
        self.files: list[str] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key]()

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

    def _add_safetensors(self, path: str) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - report which file is broken
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        for k in handle.keys():
            self._where[k] = (lambda k=k, h=handle: h.get_tensor(k))
            self._shapes[k] = tuple(handle.get_slice(k).get_shape())
        self.files.append(path)

    def _add_torch(self, path: str) -> None:
        sd = torch_load_weights(path)
        sd = unwrap_state_dict(sd, path)
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                self._where[k] = (lambda v=v: v)
                self._shapes[k] = tuple(v.shape)
        self.files.append(path)


def torch_load_weights(path: str) -> dict:
    """``torch.load`` with ``weights_only=True`` (never unpickles code), memory-mapped when the format allows."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e).lower():
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({e})") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read with weights_only=True ({type(e).__name__}: {e})") from None
    try:  # legacy (non-zip) serialisation cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read with weights_only=True ({type(e).__name__}: {e})") from None


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


def open_weights(path: str | os.PathLike) -> TensorSource:
    """Lazy tensors of a weight file or a Hugging Face directory."""
    path = os.fspath(path)
    files = find_weight_files(path) if os.path.isdir(path) else [path]
    src = TensorSource()
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: no such weight file")
        if f.endswith(".safetensors"):
            src._add_safetensors(f)
        else:
            src._add_torch(f)
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
