"""The retrieval fine-tuning losses of InternVL-C/G (reference-spec-2 §2.3), as plain functions.

* :func:`gather_with_grad` — ``all_gather`` whose backward sums the incoming gradients over processes and
  returns this process's slice (``torch.distributed.nn.functional.all_gather``), so a loss on gathered
  features back-propagates into every process's own rows (DDP and FSDP alike).
* :func:`multi_positive_contrastive` — the asymmetric (local rows × global columns) image-text contrastive
  loss with soft multi-positive targets: every global column whose image id equals the row's counts as a
  positive, the target row is normalised to sum 1.
* :func:`itm_loss` — image-text matching cross-entropy on the query outputs of matching rows.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate each tensor over all processes along dim 0, keeping autograd (identity on one process).

    Every process must pass the same number of rows (the default samplers pad shards to equal length);
    unequal sizes raise ``ValueError`` instead of hanging or mis-aligning rows.
    """
    if world_size() == 1:
        return list(tensors)
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"feature gathering needs the same batch size on every process, got "
                         f"{[int(s) for s in sizes]} (use a sampler that pads shards, e.g. DefaultSampler)")
    return [torch.cat(all_gather(t.contiguous()), dim=0) for t in tensors]


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """All-gather without autograd (e.g. the integer image ids)."""
    if world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def soft_targets(ids_local: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` float targets: 1 where the image ids agree, each row normalised to sum 1."""
    pos = (ids_local[:, None] == ids_all[None, :]).float()
    return pos / pos.sum(1, keepdim=True).clamp_min(1.0)


def multi_positive_contrastive(image_local: torch.Tensor, text_local: torch.Tensor, image_all: torch.Tensor,
                               text_all: torch.Tensor, ids_local: torch.Tensor, ids_all: torch.Tensor,
                               scale: torch.Tensor) -> torch.Tensor:
    """``(i2t + t2i) / 2`` for one path (C or G); features L2-normalised, ``(B, D)`` local and ``(N, D)`` global.

    ``i2t`` = mean over local rows of ``-Σ target · log_softmax(scale · image_local @ text_allᵀ)``; ``t2i``
    likewise with ``text_local @ image_allᵀ``. ``scale`` is ``exp(logit_scale)`` (no clamp, as the recipe).
    Returns a 0-dim tensor.
    """
    targets = soft_targets(ids_local, ids_all)
    i2t = -(targets * F.log_softmax(scale * image_local @ text_all.t(), dim=1)).sum(1).mean()
    t2i = -(targets * F.log_softmax(scale * text_local @ image_all.t(), dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def itm_loss(logits_neg: torch.Tensor, logits_pos: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, 2)`` matching logits: label 0 for the negative rows, 1 for the positive rows
    (mean over the ``2B`` rows)."""
    logits = torch.cat([logits_neg, logits_pos], dim=0)
    labels = torch.cat([torch.zeros(len(logits_neg)), torch.ones(len(logits_pos))]).long().to(logits.device)
    return F.cross_entropy(logits.float(), labels)


__all__ = ["gather_no_grad", "gather_with_grad", "itm_loss", "multi_positive_contrastive", "soft_targets",
           "world_size"]
