"""The ``classification`` registry scope (children of mmengine's root registries).

Configs select it with ``default_scope='classification'``; mmengine then imports this module by name
(``<scope>.registry``) and builds ``type=...`` entries from these registries, falling back to mmengine's
own modules (``EMAHook``, ``SGD``, ``CosineAnnealingLR``, ...) through the parents. Every registry a Runner
builds from has a child here, so nothing falls back with a "failed to search registry" warning.
"""
from mmengine import registry as root
from mmengine.registry import Registry


def _child(parent: Registry, locations=()) -> Registry:
    return Registry(parent.name, parent=parent, scope="classification", locations=list(locations))


MODELS = _child(root.MODELS, ["classification.probes"])
DATASETS = _child(root.DATASETS, ["classification.datasets", "classification.feature_cache"])
METRICS = _child(root.METRICS, ["classification.metrics"])
DATA_SAMPLERS = _child(root.DATA_SAMPLERS)
TRANSFORMS = _child(root.TRANSFORMS)
HOOKS = _child(root.HOOKS)
LOOPS = _child(root.LOOPS)
OPTIMIZERS = _child(root.OPTIMIZERS)
OPTIM_WRAPPERS = _child(root.OPTIM_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = _child(root.OPTIM_WRAPPER_CONSTRUCTORS)
PARAM_SCHEDULERS = _child(root.PARAM_SCHEDULERS)
EVALUATOR = _child(root.EVALUATOR)
VISUALIZERS = _child(root.VISUALIZERS)
VISBACKENDS = _child(root.VISBACKENDS)
LOG_PROCESSORS = _child(root.LOG_PROCESSORS)
WEIGHT_INITIALIZERS = _child(root.WEIGHT_INITIALIZERS)
FUNCTIONS = _child(root.FUNCTIONS)

__all__ = ["DATASETS", "DATA_SAMPLERS", "EVALUATOR", "FUNCTIONS", "HOOKS", "LOG_PROCESSORS", "LOOPS", "METRICS",
           "MODELS", "OPTIMIZERS", "OPTIM_WRAPPERS", "OPTIM_WRAPPER_CONSTRUCTORS", "PARAM_SCHEDULERS",
           "TRANSFORMS", "VISBACKENDS", "VISUALIZERS", "WEIGHT_INITIALIZERS"]
