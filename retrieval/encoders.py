"""One small interface over every embedding model retrieval uses: InternVL-C / InternVL-G (image ↔ text),
plain InternViT (image ↔ image, class token) and any open_clip model.

An :class:`Encoder` has ``name``, ``dim``, ``preprocess`` (what :class:`internvit.FeatureExtractor` applies to
each image), ``encode_images(pixel_values) -> (B, D)`` and ``encode_texts(list[str]) -> (N, D)``; both return
L2-normalised float32, so inner product = cosine similarity. :func:`load_encoder` builds one from a spec
string, which is what index manifests record so a search can rebuild the same encoder.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from internvit.fingerprint import weights_fingerprint  # noqa: F401 - one implementation (full streamed hash)

from .faiss_ops import IndexMismatchError, RetrievalError

logger = logging.getLogger("retrieval")

SPEC_PREFIXES = ("internvl-c:", "internvl-g:", "internvit:", "open_clip:")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``'bfloat16'`` (what manifests record)."""
    return str(dtype).replace("torch.", "")


class Encoder:
    """Base class: subclasses set ``kind``, ``spec``, ``dim``, ``preprocess`` and implement the two encoders."""

    kind: str = "encoder"
    supports_text: bool = False

    def __init__(self, model: Optional[nn.Module], *, spec: str, dim: int, preprocess,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 tokenizer_path: Optional[str] = None) -> None:
        self.model = model
        self.spec = spec
        self.dim = int(dim)
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer_path = tokenizer_path
        self.text_batch_size = 64
        self._info: Optional[dict] = None

    @property
    def name(self) -> str:
        return self.spec

    # -- the interface --------------------------------------------------------------------------------
    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise RetrievalError(f"encoder {self.name!r} is image-only: it cannot embed text queries "
                             f"(use an InternVL-C/G or open_clip model)")

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` L2-normalised float32; by default ``_text_features`` in batches of ``text_batch_size``."""
        return torch.cat([F.normalize(self._text_features(texts[i:i + self.text_batch_size]).float(), dim=-1)
                          for i in range(0, len(texts), self.text_batch_size)])

    @torch.inference_mode()
    def encode_images(self, batch) -> torch.Tensor:
        """``(B, 3, H, W)`` preprocessed pixels → ``(B, D)`` L2-normalised float32 (on the model's device).

        Anything else (paths, a folder, PIL images) goes through :meth:`embed_images` and comes back as a tensor.
        """
        if not isinstance(batch, torch.Tensor):
            return torch.from_numpy(self.embed_images(batch, strict=True).features)
        x = batch.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        return F.normalize(self._image_features(x).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → ``(N, D)`` L2-normalised float32 numpy array."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self._embed_texts([str(t) for t in texts]).float().cpu().numpy()

    # -- images through the shared feature extractor ---------------------------------------------------
    def feature_extractor(self, *, batch_size: int = 32, num_workers: int = 0, progress: bool = False):
        """An :class:`internvit.FeatureExtractor` that reads images with this encoder's preprocessing."""
        from internvit.features import FeatureExtractor

        return FeatureExtractor(self.model, self.preprocess, batch_size=batch_size, num_workers=num_workers,
                                device=self.device, dtype=self.dtype, embed_fn=self.encode_images,
                                normalize=False, progress=progress, model_name=self.name)

    def embed_images(self, images, *, batch_size: int = 32, num_workers: int = 0, progress: bool = False,
                     strict: bool = True):
        """Embed image paths / a folder / list file / PIL images; returns a ``FeatureResult``.

        ``strict``: an unreadable image raises ``ValueError`` naming it (otherwise it is skipped and listed
        in ``result.errors``).
        """
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError("no images given")
        from .inputs import TarImages

        if isinstance(images, (list, tuple)) and len(images) <= batch_size:
            return self._embed_few(list(images), strict)
        if isinstance(images, (list, tuple)) and not isinstance(images[0], (str, os.PathLike)):
            images = _PILDataset(images, self._transform())
        elif isinstance(images, TarImages) and images.transform is None:
            images.transform = self._transform()
        fx = self.feature_extractor(batch_size=batch_size, num_workers=num_workers, progress=progress)
        result = fx.extract(images)
        if strict and result.errors:
            e = result.errors[0]
            raise ValueError(f"{e['path']}: unreadable image ({e['error']})")
        if len(result.ids) == 0:
            raise ValueError("no readable images")
        return result

    def _embed_few(self, images: list, strict: bool):
        """One batch of paths / PIL images (queries): the feature extractor's reading, preprocessing, error
        rules and single-batch math, without building its loader (which costs as much as a small query)."""
        from internvit.data import _error_text, load_image, to_rgb
        from internvit.features import NONFINITE_ERROR, FeatureResult

        transform = self._transform()
        xs, ids, paths, errors = [], [], [], []
        for i, img in enumerate(images):
            label = os.fspath(img) if isinstance(img, (str, os.PathLike)) else f"image[{i}]"
            try:
                if isinstance(img, (str, os.PathLike)):
                    img = load_image(img)
                elif hasattr(img, "mode"):
                    img = to_rgb(img)
                xs.append(transform(img))
            except Exception as e:  # noqa: BLE001 - reported (strict) or listed, as the feature extractor does
                errors.append({"id": i, "path": label, "error": _error_text(e)})
                continue
            ids.append(i)
            paths.append(label)
        if xs:
            feats = self.encode_images(torch.stack(xs)).cpu().numpy()
            finite = np.isfinite(feats).all(axis=1)
            for j in np.flatnonzero(~finite):
                errors.append({"id": ids[j], "path": paths[j], "error": f"{NONFINITE_ERROR} in dtype "
                               f"{dtype_name(self.dtype)}; try bf16 or fp32)"})
            feats, ids, paths = feats[finite], [ids[j] for j in np.flatnonzero(finite)], \
                [paths[j] for j in np.flatnonzero(finite)]
        else:
            feats = np.zeros((0, self.dim), np.float32)
        errors.sort(key=lambda e: e["id"])
        if strict and errors:
            e = errors[0]
            raise ValueError(f"{e['path']}: unreadable image ({e['error']})")
        if not ids:
            raise ValueError("no readable images")
        return FeatureResult(feats.astype(np.float32, copy=False), ids, paths, errors, None)

    def _transform(self) -> Callable:
        if callable(self.preprocess) and not isinstance(self.preprocess, dict):
            return self.preprocess
        from internvit.transforms import build_transform

        return build_transform(self.preprocess)

    # -- identity ------------------------------------------------------------------------------------
    def info(self) -> dict:
        """What an index manifest records: enough to rebuild this encoder and to refuse a different one."""
        if self._info is None:
            pre = self.preprocess if isinstance(self.preprocess, dict) else \
                {"transform": " ".join(repr(self.preprocess).split())}
            self._info = {"name": self.name, "kind": self.kind, "dim": self.dim, "spec": self.spec,
                          "tokenizer": self.tokenizer_path, "preprocess": pre,
                          "dtype": dtype_name(self.dtype), "device": self.device.type,
                          "weights_fingerprint": weights_fingerprint(self.model) if self.model is not None else None}
        return dict(self._info)

    def fingerprint_as(self, dtype: Optional[str]) -> Optional[str]:
        """The weights fingerprint of this model held in ``dtype`` (a recorded dtype name; ``None``: this
        encoder's), or ``None`` when it cannot be known: a copy in a higher or other precision than this one."""
        if self.model is None:
            return None
        if dtype is None or dtype == dtype_name(self.dtype):
            return self.info()["weights_fingerprint"]
        target = getattr(torch, str(dtype), None)
        if self.dtype != torch.float32 or not isinstance(target, torch.dtype) or not target.is_floating_point:
            return None
        return weights_fingerprint(self.model, target)

    def check_compatible(self, manifest: dict, where: str = "index") -> None:
        """Raise :class:`IndexMismatchError` if an index was built with another model or dimension."""
        if manifest.get("dim") != self.dim:
            raise IndexMismatchError(f"{where}: index dim is {manifest.get('dim')} but encoder {self.name!r} "
                                     f"gives dim {self.dim}")
        enc = manifest.get("encoder") or {}
        if enc.get("name") and enc["name"] != self.name:
            raise IndexMismatchError(f"{where}: index was built with encoder {enc['name']!r}, not {self.name!r}")
        fp = enc.get("weights_fingerprint")
        if not fp or self.model is None:
            return
        mine = self.fingerprint_as(enc.get("dtype"))  # compared in the dtype the index was built in
        if mine is None:
            logger.warning("%s: index was built in %s, encoder %r runs in %s: its weights cannot be checked",
                           where, enc.get("dtype"), self.name, dtype_name(self.dtype))
        elif fp != mine:
            raise IndexMismatchError(f"{where}: encoder {self.name!r} has different weights than the ones the "
                                     f"index was built with")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, transform) -> None:
        self.images, self.transform = list(images), transform
        self.paths = [f"image[{i}]" for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        from internvit.data import to_rgb

        return self.transform(to_rgb(img) if hasattr(img, "mode") else img)


class InternVLEncoder(Encoder):
    """InternVL-C (attention-pooled InternViT) or InternVL-G (+ QLLaMA queries) image embeddings, QLLaMA text."""

    def __init__(self, model: nn.Module, tokenizer=None, mode: str = "InternVL-C", *, spec: Optional[str] = None,
                 device="cpu", dtype=torch.float32, tokenizer_path: Optional[str] = None) -> None:
        from internvit.models.internvl import check_mode
        from internvit.transforms import preprocess_config

        self.mode = check_mode(mode)
        self.kind = self.mode.lower()
        model = model.to(device=device, dtype=dtype).eval()
        dim = int(model.config.clip_embed_dim)
        super().__init__(model, spec=spec or f"{self.kind}:{type(model).__name__}", dim=dim,
                         preprocess=preprocess_config(model.config, resize_mode="squash"), device=device,
                         dtype=dtype, tokenizer_path=tokenizer_path)
        self.tokenizer = tokenizer

    @property
    def supports_text(self) -> bool:  # a weight file without tokenizer= embeds images only
        return self.tokenizer is not None

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, mode=self.mode)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RetrievalError(f"encoder {self.name!r} has no tokenizer, so it cannot embed text: pass "
                                 f"--tokenizer (tokenizer= in Python), a tokenizer.model file or its folder")
        return _core_encode_texts(self, texts)


class InternViTEncoder(Encoder):
    """Plain InternViT: the class token of the last block (image → image search)."""

    kind = "internvit"

    def __init__(self, model: nn.Module, *, spec: Optional[str] = None, device="cpu", dtype=torch.float32) -> None:
        from internvit.transforms import preprocess_config

        model = model.to(device=device, dtype=dtype).eval()
        super().__init__(model, spec=spec or f"internvit:{type(model).__name__}", dim=model.config.hidden_size,
                         preprocess=preprocess_config(model.config), device=device, dtype=dtype)

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).pooler_output


class OpenCLIPEncoder(Encoder):
    """Any open_clip model (``create_model_and_transforms``), offline: random init or a local weight file."""

    kind = "open_clip"
    supports_text = True

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer, *, spec: str, device="cpu",
                 dtype=torch.float32) -> None:
        model = model.to(device=device, dtype=dtype).eval()
        dim = getattr(model, "embed_dim", None) or getattr(model.visual, "output_dim", None)
        if dim is None:
            size = getattr(model.visual, "image_size", 224)
            size = size[0] if isinstance(size, (tuple, list)) else size
            with torch.no_grad():
                dim = model.encode_image(torch.zeros(1, 3, size, size, device=device, dtype=dtype)).shape[-1]
        super().__init__(model, spec=spec, dim=int(dim), preprocess=preprocess, device=device, dtype=dtype)
        self.tokenizer = tokenizer

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        return _core_encode_texts(self, texts)


def _core_encode_texts(encoder: Encoder, texts: list[str]) -> torch.Tensor:
    """Tokenise, encode in length-sorted batches and L2-normalise with :func:`internvit.text.encode_texts`."""
    from internvit.text import encode_texts

    return encode_texts(encoder.model, encoder.tokenizer, texts, batch_size=encoder.text_batch_size,
                        device=encoder.device)


def _seeded(fn, seed: int = 0):
    """Run ``fn`` with torch's RNG seeded, so random-weight presets give the same model in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def load_encoder(spec: str, *, mode: Optional[str] = None, tokenizer: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> Encoder:
    """Build an encoder from a spec string.

    * ``internvl-c:SRC`` / ``internvl-g:SRC`` — an InternVL directory, weight file (such as the PyTorch
      ``internvl_c_13b_224px.pth``) or preset (such as ``internvl-tiny``); the tokenizer comes from
      ``tokenizer=`` or ``SRC/tokenizer.model`` (a weight file needs ``tokenizer=`` for text).
    * ``internvit:SRC`` — an InternViT directory / weight file / preset (class token; image-only).
    * ``open_clip:NAME`` or ``open_clip:NAME@/path/to/weights`` — an open_clip architecture, random init or
      local weights (no download).
    * a bare ``SRC`` — InternVL (mode ``mode`` or InternVL-C) or InternViT, whichever ``SRC`` holds.

    The model is loaded straight into ``dtype`` on ``device``. Presets (random weights) are built with a fixed
    seed, so the same spec gives the same weights everywhere.
    """
    import internvit
    from internvit.config import is_preset
    from internvit.models.internvl import InternVLModel

    spec = str(spec)
    if spec.startswith("open_clip:"):
        import open_clip

        name, _, pretrained = spec[len("open_clip:"):].partition("@")
        if pretrained and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"{pretrained}: open_clip weight file not found")

        def make():
            return open_clip.create_model_and_transforms(name, pretrained=pretrained or None)

        try:
            model, _, preprocess = make() if pretrained else _seeded(make)
        except RuntimeError as e:
            raise ValueError(f"open_clip model {name!r}: {str(e).splitlines()[0]}") from None
        return OpenCLIPEncoder(model, preprocess, open_clip.get_tokenizer(name), spec=spec, device=device,
                               dtype=dtype)

    prefix, src = "", spec
    for p in SPEC_PREFIXES:
        if spec.startswith(p):
            prefix, src = p[:-1], spec[len(p):]
    if src and os.path.exists(src):
        src = os.path.abspath(src)
    elif not is_preset(src):
        raise FileNotFoundError(f"{src}: no such model directory / weight file, and not a preset name")

    def load():  # built directly in dtype on device: a 14B model never exists in fp32 on the host
        return internvit.load_model(src, dtype=dtype, device=device)

    # presets are initialised in fp32 on the CPU with a fixed seed, then cast: the same weights everywhere
    model = _seeded(load) if is_preset(src) and not os.path.exists(src) else load()
    if isinstance(model, InternVLModel):
        if prefix == "internvit":
            raise ValueError(f"{src} is an InternVL model; use internvl-c:/internvl-g: (or an InternViT)")
        mode = mode or {"internvl-g": "InternVL-G", "internvl-c": "InternVL-C"}.get(prefix, "InternVL-C")
        # a model folder may hold its tokenizer; a weight file (e.g. internvl_c_13b_224px.pth) needs tokenizer=
        tok_path = tokenizer or (src if os.path.isdir(src) and os.path.isfile(os.path.join(src, "tokenizer.model"))
                                 else None)
        tok = internvit.get_tokenizer(tok_path) if tok_path else None
        kind = mode.lower()
        return InternVLEncoder(model, tok, mode, spec=f"{kind}:{src}", device=device, dtype=dtype,
                               tokenizer_path=os.path.abspath(tok_path) if tok_path else None)
    if prefix in ("internvl-c", "internvl-g"):
        raise ValueError(f"{src} is a plain InternViT (no text tower); use internvit:{src}")
    return InternViTEncoder(model, spec=f"internvit:{src}", device=device, dtype=dtype)


def recorded_device_dtype(info: Optional[dict], device=None, dtype=None) -> tuple[str, torch.dtype]:
    """``(device, dtype)`` to rebuild a recorded encoder with: the given ones, else the recorded ones (a
    recorded ``cuda`` only when CUDA is available), else ``cpu`` / float32."""
    from internvit.features import parse_dtype

    info = info or {}
    if device is None:
        device = info.get("device") or "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
    if dtype is None:
        dtype = getattr(torch, str(info.get("dtype")), None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    return str(device), parse_dtype(dtype)


def encoder_from_info(info: dict, *, device: Optional[Union[str, torch.device]] = None,
                      dtype: Optional[torch.dtype] = None, tokenizer: Optional[str] = None) -> Encoder:
    """Rebuild the encoder an index manifest recorded (same spec, tokenizer, mode and, unless given, dtype
    and device; see :func:`recorded_device_dtype`). ``tokenizer`` overrides the recorded one."""
    if not info or not info.get("spec"):
        raise RetrievalError("the index records no encoder (built from bare embeddings): pass encoder= to "
                             "Retriever.load, or query with search_embedding")
    spec = info["spec"]
    mode = {"internvl-c": "InternVL-C", "internvl-g": "InternVL-G"}.get(info.get("kind", ""))
    device, dtype = recorded_device_dtype(info, device, dtype)
    return load_encoder(spec, mode=mode, tokenizer=tokenizer or info.get("tokenizer"), device=device, dtype=dtype)
