"""internvit — InternViT and InternVL-C/G for the modern PyTorch / OpenMMLab 2.x / FAISS stack.

Public API: :func:`load_model`, :func:`save_model`, :func:`build_model`, :func:`get_tokenizer`,
:class:`FeatureExtractor`, :func:`build_transform`, :func:`list_presets`.
"""
from .checkpoints import CheckpointError
from .config import InternViTConfig, InternVLConfig, QLLaMAConfig, get_config, list_presets
from .factory import build_model, load_model, save_model
from .models.vit import InternViT, InternViTOutput
from .transforms import build_transform, preprocess_config

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "InternViT", "InternViTConfig", "InternViTOutput", "InternVLConfig", "QLLaMAConfig",
    "build_model", "build_transform", "get_config", "list_presets", "load_model", "preprocess_config",
    "save_model", "get_tokenizer", "FeatureExtractor",
]


def __getattr__(name):  # heavier parts load on first use
    if name == "FeatureExtractor":
        from .features import FeatureExtractor

        return FeatureExtractor
    if name == "get_tokenizer":
        from .tokenizer import get_tokenizer

        return get_tokenizer
    raise AttributeError(f"module 'internvit' has no attribute {name!r}")
