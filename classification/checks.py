"""Checks of the scores and labels every classification metric consumes (one place for all entry points).

A metric over a NaN score, a label outside ``[0, num_classes)`` or a fractional label (``1.5``, which ``int``
would truncate to ``1``) is a number that looks right and is not: :func:`check_scores`, :func:`check_labels`
and :func:`check_scores_and_labels` refuse them with a ``ValueError`` naming what is wrong and where (the
first offending position and how many there are). :class:`classification.metrics.Accuracy`,
:func:`classification.metrics.mean_per_class_recall` and the zero-shot metrics
(:func:`classification.zero_shot.classification_metrics`, the image and video evaluations) all call them; the
CLIs turn the error (:class:`MetricInputError`, a ``ValueError``) into their ``error:`` line.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from internvit.data import DataError

__all__ = ["MetricInputError", "check_label", "check_labels", "check_scores", "check_scores_and_labels"]


class MetricInputError(DataError):
    """Scores or labels a metric refuses (a ``ValueError``). A :class:`internvit.data.DataError`, so that
    ``tools/train.py`` / ``tools/test.py``, which meet it while a loop runs, report it as one ``error:`` line
    (exit status 2) like any other bad data; ``tools/zeroshot_eval.py`` reports every ``ValueError`` so."""


def _where(positions: list, total: int, unit: str) -> str:
    """``'2 of 10 labels (positions 3, 7)'``."""
    count = len(positions)
    shown = ", ".join(map(str, positions[:5])) + (", ..." if count > 5 else "")
    return f"{count} of {total} {unit} (position{'s' if count > 1 else ''} {shown})"


def check_scores(scores: Any, what: str = "scores") -> torch.Tensor:
    """``scores`` as a float tensor; raises ``ValueError`` naming ``what`` when any value is NaN or infinite
    (a non-finite score ranks arbitrarily: argmax / top-k over NaN give an index, never an error)."""
    scores = torch.as_tensor(scores)
    if not (scores.is_floating_point() or scores.is_complex()):
        scores = scores.float()
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        rows = ~finite.reshape(len(scores), -1).all(dim=1) if scores.ndim > 1 else ~finite
        bad = rows.nonzero().flatten().tolist()
        kinds = " and ".join(k for k, m in (("NaN", torch.isnan(scores)), ("infinity", torch.isinf(scores)))
                             if bool(m.any()))
        unit = "rows" if scores.ndim > 1 else "values"
        raise MetricInputError(f"{what}: {_where(bad, len(rows), unit)} hold {kinds}; no metric is computed "
                         f"over non-finite scores")
    return scores


def check_labels(labels: Any, num_classes: Optional[int] = None, what: str = "labels") -> torch.Tensor:
    """``labels`` as an int64 tensor. Raises ``ValueError`` naming ``what``, the first offending positions and
    values for labels that are not integers (``1.5``; a float ``1.0`` is accepted, a bool is not), and, with
    ``num_classes``, for labels outside ``[0, num_classes)``."""
    t = torch.as_tensor(labels)
    if t.dtype == torch.bool or t.is_complex():
        kind = str(t.dtype).replace("torch.", "")
        raise MetricInputError(f"{what}: expected integer class indices, got {kind} values")
    t = t.reshape(-1)
    if t.is_floating_point():
        frac = ~torch.isfinite(t) | (t != torch.round(t))
        if bool(frac.any()):
            bad = frac.nonzero().flatten().tolist()
            raise MetricInputError(f"{what}: {_where(bad, len(t), 'labels')} are not integers "
                             f"(first: {t[bad[0]].item()!r}); class labels are integer indices, never rounded "
                             f"or truncated")
    t = t.long()
    if num_classes is not None:
        out = (t < 0) | (t >= int(num_classes))
        if bool(out.any()):
            bad = out.nonzero().flatten().tolist()
            raise MetricInputError(f"{what}: {_where(bad, len(t), 'labels')} are outside [0, {int(num_classes)}) "
                             f"(first: {int(t[bad[0]])}; the scores have {int(num_classes)} classes)")
    return t


def check_label(label: Any, num_classes: Optional[int] = None, what: str = "label") -> int:
    """One label as an ``int``: raises ``ValueError`` naming ``what`` and the value for a label that is not one
    integer (``1.5`` is never truncated to ``1``; a float ``1.0`` is accepted, a bool is not) or, with
    ``num_classes``, not in ``[0, num_classes)``."""
    t = torch.as_tensor(label)
    if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
        raise MetricInputError(f"{what}: expected one integer class index, got {label!r}")
    v = t.reshape(-1)[0].item()
    if isinstance(v, float) and not (math.isfinite(v) and v == int(v)):
        raise MetricInputError(f"{what} {v!r} is not an integer class index (labels are never rounded or truncated)")
    v = int(v)
    if num_classes is not None and not 0 <= v < int(num_classes):
        raise MetricInputError(f"{what} {v} is outside [0, {int(num_classes)}) (the scores have {int(num_classes)} "
                         f"classes)")
    return v


def check_scores_and_labels(scores: Any, labels: Any, what: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores (N, C) float, labels (N,) int64)`` after :func:`check_scores` and :func:`check_labels` against
    the ``C`` classes of the scores; raises ``ValueError`` also for a shape mismatch or no sample. ``what``
    prefixes the messages (e.g. the metric's name)."""
    pre = f"{what}: " if what else ""
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise MetricInputError(f"{pre}scores must be (num_samples, num_classes), got shape {tuple(scores.shape)}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(scores):
        raise MetricInputError(f"{pre}{len(scores)} score rows but labels of shape {tuple(labels.shape)}")
    if not len(scores):
        raise MetricInputError(f"{pre}no samples to score")
    return check_scores(scores, f"{pre}scores"), check_labels(labels, scores.shape[1], f"{pre}labels")
