"""Top-k accuracy and mean per-class recall for mmengine evaluators (scale 100)."""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

import torch
from mmengine.evaluator import BaseMetric

from .checks import MetricInputError, check_label, check_labels, check_scores
from .registry import METRICS


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced accuracy: the mean over the classes present in ``labels`` of the per-class recall (×100).

    Raises ``ValueError`` (:mod:`classification.checks`) for predictions or labels that are not integer class
    indices, or a negative one, and for ``pred`` and ``labels`` of different lengths."""
    pred, labels = check_labels(pred, what="mean_per_class_recall: predictions"), \
        check_labels(labels, what="mean_per_class_recall: labels")
    if len(pred) != len(labels):
        raise MetricInputError(f"mean_per_class_recall: {len(pred)} predictions for {len(labels)} labels")
    negative = [(w, t) for w, t in (("predictions", pred), ("labels", labels)) if len(t) and int(t.min()) < 0]
    if negative:
        raise MetricInputError(f"mean_per_class_recall: negative class index {int(negative[0][1].min())} in the "
                         f"{negative[0][0]}")
    recalls = []
    for c in labels.unique().tolist():
        m = labels == c
        recalls.append((pred[m] == c).double().mean().item())
    return 100.0 * sum(recalls) / max(len(recalls), 1)


def _check_topk(topk: Any) -> tuple:
    ks = (topk,) if not isinstance(topk, (list, tuple)) else tuple(topk)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"Accuracy: topk must be a positive integer or a non-empty list of them, got {topk!r}")
    return ks


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-k accuracy (``accuracy/top1``, ``accuracy/top5``, ...) and optionally ``accuracy/mean_recall``.

    Consumes the ``predict`` outputs of :class:`classification.probes.InternViTClassifier` (dicts with
    ``pred_score`` and ``gt_label``).

    Top-k for a ``k`` larger than the number of classes ``C`` would be 100 whatever the model does
    (it is top-C), so such a ``k`` is not reported: its key is left out, with a ``UserWarning`` naming ``topk``
    and ``C``, given once when the evaluator learns the dataset's classes (``dataset_meta``, before the first
    epoch) and again when it meets scores of fewer than ``k`` classes. mmpretrain's ``Accuracy`` raises
    instead; here the default ``topk=(1, 5)`` keeps working on a 3-class dataset with ``top1`` alone.
    ``mean_recall`` averages over the classes present in the evaluated labels; when the dataset's class
    list has classes without a sample there, a ``UserWarning`` names them.

    Raises ``ValueError`` naming ``topk`` when it is not a positive integer or a non-empty list of them
    (checked when the metric is built), and (:mod:`classification.checks`) for a NaN or infinite score or a
    label that is not an integer in ``[0, num_classes)``, naming the sample: never a number computed over them.
    """

    default_prefix: Optional[str] = "accuracy"

    def __init__(self, topk: Union[int, Sequence[int]] = (1, 5), mean_recall: bool = False,
                 collect_device: str = "cpu", prefix: Optional[str] = None) -> None:
        self.topk = _check_topk(topk)
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.mean_recall = mean_recall
        self._warned: set = set()

    @property
    def dataset_meta(self) -> Optional[dict]:
        """The dataset's meta information (``classes``), set by the evaluator before evaluation."""
        return self._dataset_meta

    @dataset_meta.setter
    def dataset_meta(self, dataset_meta: dict) -> None:
        self._dataset_meta = dataset_meta
        classes = (dataset_meta or {}).get("classes")
        if classes is not None:
            self._too_large(len(classes), "the dataset has")

    def _too_large(self, num_classes: int, where: str) -> list:
        """The ``k`` of ``topk`` that ``num_classes`` classes cannot honour (warned about once per count)."""
        bad = [k for k in self.topk if k > 1 and k >= num_classes]  # top-C: every sample is a hit
        if bad and num_classes not in self._warned:
            self._warned.add(num_classes)
            warnings.warn(f"Accuracy: topk={self.topk} but {where} {num_classes} classes: "
                          f"{', '.join(f'top{k}' for k in bad)} would be 100 whatever the model predicts and "
                          f"is not reported; set the evaluator's topk to values below {num_classes}",
                          UserWarning, stacklevel=3)
        return bad

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Keep each sample's top-k classes and label. Raises :class:`classification.checks.MetricInputError`
        (a ``ValueError``) for a label that is not an integer or not in ``[0, num_classes)`` (the number of
        scores), naming the sample (its position in the evaluation so far). A NaN or infinite score is kept as
        an error that :meth:`compute_metrics` raises: the runner's non-finite check, which names the image, sees
        the batch first (it runs after the evaluator has processed it)."""
        maxk = max(self.topk)
        for s in data_samples:
            where = f"Accuracy: sample {len(self.results)}"
            score = torch.as_tensor(s["pred_score"]).detach().float().cpu().reshape(-1)
            label = check_label(s["gt_label"], score.numel(), f"{where} gt_label")
            try:
                check_scores(score, f"{where} pred_score")
            except MetricInputError as e:
                self.results.append(dict(error=str(e)))
                continue
            k = min(maxk, score.numel())
            self.results.append(dict(topk=score.topk(k).indices, gt_label=label, num_classes=score.numel()))

    def compute_metrics(self, results: list) -> dict:
        """The metrics of ``results``; raises :class:`classification.checks.MetricInputError` naming the first
        sample whose scores were not finite (never a number computed without or over it)."""
        refused = next((r["error"] for r in results if "error" in r), None)
        if refused is not None:
            raise MetricInputError(refused)
        labels = torch.tensor([r["gt_label"] for r in results])
        pred = torch.stack([r["topk"] for r in results])
        num_classes = min(r.get("num_classes", pred.shape[1]) for r in results)
        skip = set(self._too_large(num_classes, "the model scores"))
        hit = pred == labels[:, None]
        out = {f"top{k}": 100.0 * hit[:, :k].any(dim=1).double().mean().item() for k in self.topk if k not in skip}
        if self.mean_recall:
            out["mean_recall"] = mean_per_class_recall(pred[:, 0], labels)
            classes = (self.dataset_meta or {}).get("classes")
            if classes is not None:
                present = set(labels.tolist())
                absent = [str(c) for i, c in enumerate(classes) if i not in present]
                if absent:
                    shown = ", ".join(repr(c) for c in absent[:10]) + (", ..." if len(absent) > 10 else "")
                    warnings.warn(f"Accuracy: mean_recall averages over the {len(classes) - len(absent)} of "
                                  f"{len(classes)} classes that have samples here (none of {shown})",
                                  UserWarning, stacklevel=2)
        return out
