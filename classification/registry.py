"""The ``classification`` registry scope (children of mmengine's root registries).

Configs select it with ``default_scope='classification'``; mmengine then imports this module by name
(``<scope>.registry``) and builds ``type=...`` entries from these registries, falling back to mmengine's
own modules (``EMAHook``, ``SGD``, ``CosineAnnealingLR``, ...) through the parents.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry("model", parent=MMENGINE_MODELS, scope="classification",
                  locations=["classification.probes"])
DATASETS = Registry("dataset", parent=MMENGINE_DATASETS, scope="classification",
                    locations=["classification.datasets", "classification.feature_cache"])
METRICS = Registry("metric", parent=MMENGINE_METRICS, scope="classification",
                   locations=["classification.metrics"])

__all__ = ["DATASETS", "METRICS", "MODELS"]
