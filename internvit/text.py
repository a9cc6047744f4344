"""Batched text encoding shared by zero-shot classification and retrieval (any model with ``encode_text``)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


def model_device(model) -> torch.device:
    """The device of the first parameter (CPU for parameter-less callables)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def encode_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                 device: Optional[Union[str, torch.device]] = None,
                 groups: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """L2-normalised ``(N, D)`` fp32 text embeddings, in batches of at most ``batch_size`` texts.

    Texts are tokenised once. Batches never mix ``groups`` (lists of text indices; default: one group), and
    inside a group texts are taken in order of token length, so a batch holds similar lengths (little
    padding) and, when a group is one template filled with many class names, a long shared token prefix,
    which InternVL's text tower computes once per batch. The result is in the input order.
    ``texts`` is a ``str`` or a list/tuple of ``str`` (``TypeError`` otherwise, e.g. for a dict);
    an empty list raises ``ValueError``.
    """
    from .tokenizer import check_texts

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    texts = check_texts(texts)
    if not texts:
        raise ValueError("no texts to encode")
    device = torch.device(device) if device is not None else model_device(model)
    ids = tokenizer(texts)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"tokenizer must return a tensor of token ids, got {type(ids).__name__}")
    lengths = (ids != 0).sum(1)
    groups = [list(range(len(ids)))] if groups is None else groups
    out = None
    with torch.no_grad():
        for group in groups:
            group = torch.as_tensor(list(group), dtype=torch.long)
            group = group[torch.argsort(lengths[group], stable=True)]
            for start in range(0, len(group), batch_size):
                idx = group[start:start + batch_size]
                emb = F.normalize(model.encode_text(ids[idx].to(device)).float(), dim=-1)
                if out is None:
                    out = torch.zeros(len(ids), emb.shape[-1], device=emb.device)
                out[idx.to(emb.device)] = emb
    return out
