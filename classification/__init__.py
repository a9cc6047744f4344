"""Classification on InternViT / InternVL: zero-shot (``zero_shot``) and linear / attention-pooling probes on
mmengine (``probes``, ``datasets``, ``metrics``, ``feature_cache``).

Importing this package (as mmengine's ``custom_imports=dict(imports=['classification'])`` does) registers the
probe models, datasets and metrics in the ``classification`` registry scope. The zero-shot names are loaded
lazily on first access.
"""
from . import datasets, feature_cache, metrics, probes  # noqa: F401  (register the mmengine modules)
from .datasets import ImageFolderDataset, make_toy_digits
from .feature_cache import CachedFeatureDataset, extract_features
from .metrics import Accuracy
from .probes import (
    AttentionPoolingHead,
    ClsDataPreprocessor,
    ClsPatchConcatHead,
    InternViTClassifier,
    TrainableEMA,
    build_backbone,
    convert_head_checkpoint,
    load_head_weights,
)
from .registry import DATASETS, METRICS, MODELS

_ZERO_SHOT = ("build_zero_shot_classifier", "zero_shot_evaluate", "load_classnames", "load_templates")

__all__ = [
    "Accuracy", "AttentionPoolingHead", "CachedFeatureDataset", "ClsDataPreprocessor", "ClsPatchConcatHead",
    "DATASETS", "ImageFolderDataset", "InternViTClassifier", "METRICS", "MODELS", "TrainableEMA",
    "build_backbone", "convert_head_checkpoint", "extract_features", "load_head_weights", "make_toy_digits",
    *_ZERO_SHOT,
]


def __getattr__(name: str):
    if name in _ZERO_SHOT:
        from . import zero_shot

        return getattr(zero_shot, name)
    raise AttributeError(f"module 'classification' has no attribute {name!r}")
