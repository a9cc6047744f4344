"""internvit — InternViT and InternVL-C/G for the modern PyTorch / OpenMMLab 2.x / FAISS stack.

Public API: :func:`load_model`, :func:`save_model`, :func:`build_model`, :func:`get_tokenizer`,
:class:`FeatureExtractor`, :func:`build_transform`, :func:`list_presets`.

Names load on first use (PEP 562), so light modules such as :mod:`internvit.store` and :mod:`internvit.cli`
import without torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "CheckpointError": ".checkpoints", "LossyModelCastWarning": ".checkpoints",
    "InternViTConfig": ".config", "InternVLConfig": ".config", "QLLaMAConfig": ".config", "get_config": ".config",
    "list_presets": ".config",
    "build_model": ".factory", "load_model": ".factory", "save_model": ".factory",
    "InternViT": ".models.vit", "InternViTOutput": ".models.vit",
    "build_transform": ".transforms", "preprocess_config": ".transforms",
    "FeatureExtractor": ".features",
    "get_tokenizer": ".tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'internvit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
