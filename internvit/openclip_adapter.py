"""open_clip-style entry points for InternVL-C/G, so code written for open_clip models runs unchanged.

>>> model, _, preprocess = create_model_and_transforms("/models/InternVL-14B-224px", mode="InternVL-G")
>>> tokenizer = get_tokenizer("/models/InternVL-14B-224px")
>>> image_features = model.encode_image(preprocess(img)[None], normalize=True)
>>> text_features = model.encode_text(tokenizer(["a dog", "a cat"]), normalize=True)

The model wrapper follows open_clip's ``CLIP``: ``encode_image(image, normalize=False)``,
``encode_text(text, normalize=False)``, ``forward(image, text) -> (image_features, text_features,
logit_scale.exp())`` with normalised features, and a ``logit_scale`` parameter.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .factory import load_model
from .models.internvl import InternVLModel, check_mode
from .tokenizer import InternVLTokenizer
from .tokenizer import get_tokenizer as _get_tokenizer
from .transforms import build_transform

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16,
           "pure_bf16": torch.bfloat16, "amp": torch.float32, "amp_bf16": torch.float32}


class OpenCLIPModel(nn.Module):
    """An :class:`~internvit.models.internvl.InternVLModel` behind open_clip's ``CLIP`` interface.

    ``mode`` ('InternVL-C' or 'InternVL-G') fixes which image embedding ``encode_image`` returns.
    ``visual`` is the InternViT, ``internvl`` the wrapped model.
    """

    def __init__(self, model: InternVLModel, mode: str = "InternVL-C") -> None:
        super().__init__()
        if not isinstance(model, InternVLModel):
            raise TypeError(f"expected an InternVLModel, got {type(model).__name__}")
        self.internvl = model
        self.mode = check_mode(mode)

    @property
    def visual(self) -> nn.Module:
        return self.internvl.vision_model

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.internvl.logit_scale

    @property
    def image_size(self) -> int:
        return self.internvl.config.vision_config.image_size

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.internvl.encode_image(image, mode=self.mode)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.internvl.encode_text(text)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


def _dtype(precision: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {', '.join(_DTYPES)} or a torch.dtype, got {precision!r}")
    return _DTYPES[precision]


def create_model(model_name: Union[str, os.PathLike], mode: str = "InternVL-C", *,
                 precision: Union[str, torch.dtype] = "fp32", device: Union[str, torch.device] = "cpu",
                 pretrained: Optional[str] = None) -> OpenCLIPModel:
    """An InternVL directory, weight file or preset (``pretrained`` optionally names the weights) as open_clip model."""
    source = pretrained or model_name
    config = model_name if pretrained else None
    model = load_model(source, config, dtype=_dtype(precision), device=device)
    if not isinstance(model, InternVLModel):
        raise ValueError(f"{source}: holds a vision-only InternViT; open_clip needs an InternVL (image-text) model")
    return OpenCLIPModel(model, mode).eval()


def create_model_and_transforms(model_name: Union[str, os.PathLike], mode: str = "InternVL-C", *,
                                precision: Union[str, torch.dtype] = "fp32",
                                device: Union[str, torch.device] = "cpu", pretrained: Optional[str] = None,
                                resize_mode: str = "crop"):
    """``(model, preprocess_train, preprocess_val)`` as open_clip returns them.

    ``resize_mode='crop'`` (short side + centre crop) is the classification protocol, ``'squash'`` the
    retrieval one.
    """
    model = create_model(model_name, mode, precision=precision, device=device, pretrained=pretrained)
    cfg = model.internvl.config
    return (model, build_transform(cfg, train=True),
            build_transform(cfg, train=False, resize_mode=resize_mode))


def create_model_from_pretrained(model_name: Union[str, os.PathLike], mode: str = "InternVL-C", **kwargs):
    """``(model, preprocess)`` as open_clip's function of the same name."""
    model, _, preprocess = create_model_and_transforms(model_name, mode, **kwargs)
    return model, preprocess


def get_tokenizer(model_name: Union[str, os.PathLike], context_length: int = 80) -> InternVLTokenizer:
    """The ``summarize:`` SentencePiece tokenizer of an InternVL directory (``tokenizer(texts) -> (B, 80)``)."""
    return _get_tokenizer(model_name, max_length=context_length)


__all__ = ["OpenCLIPModel", "create_model", "create_model_and_transforms", "create_model_from_pretrained",
           "get_tokenizer"]
