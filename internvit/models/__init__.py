"""Model definitions: the InternViT block math (``vit``), QLLaMA and InternVL-C/G."""
from .vit import InternViT, InternViTOutput

__all__ = ["InternViT", "InternViTOutput"]
