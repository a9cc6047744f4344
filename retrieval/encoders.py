"""One small interface over every embedding model retrieval uses: InternVL-C / InternVL-G (image ↔ text),
plain InternViT (image ↔ image, class token) and any open_clip model.

An :class:`Encoder` has ``name``, ``dim``, ``preprocess`` (what :class:`internvit.FeatureExtractor` applies to
each image), ``encode_images(pixel_values) -> (B, D)`` and ``encode_texts(list[str]) -> (N, D)``; both return
L2-normalised float32, so inner product = cosine similarity. :func:`load_encoder` builds one from a spec
string, which is what index manifests record so a search can rebuild the same encoder.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .index import IndexMismatchError, RetrievalError

SPEC_PREFIXES = ("internvl-c:", "internvl-g:", "internvit:", "open_clip:")


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
        out = []
        for i in range(0, len(texts), self.text_batch_size):
            feats = self._text_features([str(t) for t in texts[i:i + self.text_batch_size]])
            out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

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

    def _transform(self) -> Callable:
        if callable(self.preprocess) and not isinstance(self.preprocess, dict):
            return self.preprocess
        from internvit.transforms import build_transform

        return build_transform(self.preprocess)

    # -- identity ------------------------------------------------------------------------------------
    def info(self) -> dict:
        """What an index manifest records: enough to rebuild this encoder and to refuse a different one."""
        if self._info is None:
            from internvit.features import weights_fingerprint

            pre = self.preprocess if isinstance(self.preprocess, dict) else \
                {"transform": " ".join(repr(self.preprocess).split())}
            self._info = {"name": self.name, "kind": self.kind, "dim": self.dim, "spec": self.spec,
                          "tokenizer": self.tokenizer_path, "preprocess": pre,
                          "weights_fingerprint": weights_fingerprint(self.model) if self.model is not None else None}
        return dict(self._info)

    def check_compatible(self, manifest: dict, where: str = "index") -> None:
        """Raise :class:`IndexMismatchError` if an index was built with another model or dimension."""
        if manifest.get("dim") != self.dim:
            raise IndexMismatchError(f"{where}: index dim is {manifest.get('dim')} but encoder {self.name!r} "
                                     f"gives dim {self.dim}")
        enc = manifest.get("encoder") or {}
        if enc.get("name") and enc["name"] != self.name:
            raise IndexMismatchError(f"{where}: index was built with encoder {enc['name']!r}, not {self.name!r}")
        fp, mine = enc.get("weights_fingerprint"), self.info()["weights_fingerprint"]
        if fp and mine and fp != mine:
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
        return self.transform(img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img)


class InternVLEncoder(Encoder):
    """InternVL-C (attention-pooled InternViT) or InternVL-G (+ QLLaMA queries) image embeddings, QLLaMA text."""

    supports_text = True

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

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, mode=self.mode)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RetrievalError(f"encoder {self.name!r} has no tokenizer: pass tokenizer= (a tokenizer.model "
                                 f"file or a folder holding one)")
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


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

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def _seeded(fn, seed: int = 0):
    """Run ``fn`` with torch's RNG seeded, so random-weight presets give the same model in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def load_encoder(spec: str, *, mode: Optional[str] = None, tokenizer: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> Encoder:
    """Build an encoder from a spec string.

    * ``internvl-c:SRC`` / ``internvl-g:SRC`` — an InternVL directory (or preset such as ``internvl-tiny``);
      the tokenizer comes from ``tokenizer=`` or ``SRC/tokenizer.model``.
    * ``internvit:SRC`` — an InternViT directory / weight file / preset (class token; image-only).
    * ``open_clip:NAME`` or ``open_clip:NAME@/path/to/weights`` — an open_clip architecture, random init or
      local weights (no download).
    * a bare ``SRC`` — InternVL (mode ``mode`` or InternVL-C) or InternViT, whichever ``SRC`` holds.

    Presets (random weights) are built with a fixed seed, so the same spec gives the same weights everywhere.
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
    model = _seeded(lambda: internvit.load_model(src)) if is_preset(src) and not os.path.exists(src) else \
        internvit.load_model(src)
    if isinstance(model, InternVLModel):
        if prefix == "internvit":
            raise ValueError(f"{src} is an InternVL model; use internvl-c:/internvl-g: (or an InternViT)")
        mode = mode or {"internvl-g": "InternVL-G", "internvl-c": "InternVL-C"}.get(prefix, "InternVL-C")
        tok_path = tokenizer or (src if os.path.isfile(os.path.join(src, "tokenizer.model")) else None)
        tok = internvit.get_tokenizer(tok_path) if tok_path else None
        kind = mode.lower()
        return InternVLEncoder(model, tok, mode, spec=f"{kind}:{src}", device=device, dtype=dtype,
                               tokenizer_path=os.path.abspath(tok_path) if tok_path else None)
    if prefix in ("internvl-c", "internvl-g"):
        raise ValueError(f"{src} is a plain InternViT (no text tower); use internvit:{src}")
    return InternViTEncoder(model, spec=f"internvit:{src}", device=device, dtype=dtype)


def encoder_from_info(info: dict, *, device: Union[str, torch.device] = "cpu",
                      dtype: torch.dtype = torch.float32) -> Encoder:
    """Rebuild the encoder an index manifest recorded (same spec, tokenizer and mode)."""
    if not info or not info.get("spec"):
        raise RetrievalError("the index records no encoder (built from bare embeddings): pass encoder= to "
                             "Retriever.load, or query with search_embedding")
    spec = info["spec"]
    mode = {"internvl-c": "InternVL-C", "internvl-g": "InternVL-G"}.get(info.get("kind", ""))
    return load_encoder(spec, mode=mode, tokenizer=info.get("tokenizer"), device=device, dtype=dtype)
