"""Trial 9a: faults a new user met in classification / zero-shot, each refused or warned about, never a
silent wrong number."""
import math

import pytest
import torch

from classification.metrics import Accuracy, mean_per_class_recall
from classification.zero_shot import classification_metrics

NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------------------------------------------
# 1. metrics refuse NaN / infinite scores, out-of-range and non-integer labels (classification/checks.py)
# --------------------------------------------------------------------------------------------------------------
def _accuracy(samples, topk=(1,)) -> dict:
    m = Accuracy(topk=topk, mean_recall=True)
    m.process(None, [dict(pred_score=torch.tensor(s), gt_label=y) for s, y in samples])
    return m.compute_metrics(m.results)


@pytest.mark.parametrize("score,label,match", [
    ([NAN, 0.2, 0.3], 1, r"sample 0 pred_score: 1 of 3 values \(position 0\) hold NaN"),
    ([0.1, INF, 0.3], 1, r"sample 0 pred_score: .* hold infinity"),
    ([0.1, 0.2, 0.7], 3, r"sample 0 gt_label 3 is outside \[0, 3\)"),
    ([0.1, 0.2, 0.7], -1, r"gt_label -1 is outside \[0, 3\)"),
    ([0.1, 0.8, 0.1], 1.5, r"gt_label 1.5 is not an integer"),
    ([0.1, 0.8, 0.1], torch.tensor(0.5), r"gt_label 0.5 is not an integer"),
    ([0.1, 0.8, 0.1], True, r"gt_label: expected one integer class index"),
])
def test_accuracy_refuses_bad_scores_and_labels(score, label, match):
    with pytest.raises(ValueError, match=match):
        _accuracy([([0.7, 0.2, 0.1], 0), (score, label)][1:])


def test_accuracy_names_the_sample_and_keeps_good_input_working():
    with pytest.raises(ValueError, match="sample 1 gt_label 9"):
        _accuracy([([0.7, 0.2, 0.1], 0), ([0.7, 0.2, 0.1], 9)])
    assert _accuracy([([0.7, 0.2, 0.1], 0), ([0.1, 0.2, 0.7], 2.0)]) == {"top1": 100.0, "mean_recall": 100.0}


@pytest.mark.parametrize("logits,target,match", [
    ([[NAN, 1.0], [0.0, 1.0]], [0, 1], r"scores: 1 of 2 rows \(position 0\) hold NaN"),
    ([[0.0, 1.0], [0.0, -INF]], [0, 1], r"scores: 1 of 2 rows \(position 1\) hold infinity"),
    ([[0.0, 1.0], [0.0, 1.0]], [0, 7], r"labels: 1 of 2 labels \(position 1\) are outside \[0, 2\) \(first: 7"),
    ([[0.0, 1.0], [0.0, 1.0]], [-1, 1], r"outside \[0, 2\) \(first: -1"),
    ([[0.0, 1.0], [0.0, 1.0]], [0.0, 1.5], r"labels: 1 of 2 labels \(position 1\) are not integers \(first: 1.5"),
    ([[0.0, 1.0], [0.0, 1.0]], [0], r"2 score rows but labels of shape \(1,\)"),
])
def test_zero_shot_metrics_refuse_bad_scores_and_labels(logits, target, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(torch.tensor(logits), torch.tensor(target))


def test_mean_per_class_recall_refuses_fractional_and_negative_labels():
    with pytest.raises(ValueError, match="labels: 1 of 2 labels .* not integers"):
        mean_per_class_recall(torch.tensor([0, 1]), torch.tensor([0.0, 1.5]))
    with pytest.raises(ValueError, match="negative class index -2 in the labels"):
        mean_per_class_recall(torch.tensor([0, 1]), torch.tensor([0, -2]))
    assert mean_per_class_recall(torch.tensor([0, 1]), torch.tensor([0, 0])) == 50.0


class _Pixels(torch.nn.Module):
    """A CLIP-style image tower: the mean colour of the image (3-d embedding)."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + torch.tensor([1.0, 2.0, 3.0])


def test_zero_shot_evaluate_refuses_a_fractional_label():
    """The evaluation loop checks the labels the loader gives, before any metric."""
    from classification.zero_shot import zero_shot_evaluate

    model, classifier = _Pixels(), torch.nn.functional.normalize(torch.rand(3, 2), dim=0)
    loader = [(torch.zeros(2, 3, 28, 28), torch.tensor([0.0, 0.5]))]
    with pytest.raises(ValueError, match=r"labels: 1 of 2 labels \(position 1\) are not integers"):
        zero_shot_evaluate(model, classifier, loader, mode=None)
    loader = [(torch.zeros(2, 3, 28, 28), torch.tensor([0, 2]))]
    with pytest.raises(ValueError, match=r"outside \[0, 2\) \(first: 2"):
        zero_shot_evaluate(model, classifier, loader, mode=None)
