"""Top-k accuracy and mean per-class recall for mmengine evaluators (scale 100)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from mmengine.evaluator import BaseMetric

from .registry import METRICS


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced accuracy: the mean over the classes present in ``labels`` of the per-class recall (×100)."""
    recalls = []
    for c in labels.unique().tolist():
        m = labels == c
        recalls.append((pred[m] == c).float().mean().item())
    return 100.0 * sum(recalls) / max(len(recalls), 1)


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-k accuracy (``accuracy/top1``, ``accuracy/top5``, ...) and optionally ``accuracy/mean_recall``.

    Consumes the ``predict`` outputs of :class:`classification.probes.InternViTClassifier` (dicts with
    ``pred_score`` and ``gt_label``).
    """

    default_prefix: Optional[str] = "accuracy"

    def __init__(self, topk: Union[int, Sequence[int]] = (1, 5), mean_recall: bool = False,
                 collect_device: str = "cpu", prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = (topk,) if isinstance(topk, int) else tuple(topk)
        if not self.topk or min(self.topk) < 1:
            raise ValueError(f"topk must be positive integers, got {topk}")
        self.mean_recall = mean_recall

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        maxk = max(self.topk)
        for s in data_samples:
            score = torch.as_tensor(s["pred_score"]).detach().float().cpu()
            k = min(maxk, score.numel())
            self.results.append(dict(topk=score.topk(k).indices, gt_label=int(s["gt_label"])))

    def compute_metrics(self, results: list) -> dict:
        labels = torch.tensor([r["gt_label"] for r in results])
        pred = torch.stack([r["topk"] for r in results])
        hit = pred == labels[:, None]
        out = {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in self.topk}
        if self.mean_recall:
            out["mean_recall"] = mean_per_class_recall(pred[:, 0], labels)
        return out
