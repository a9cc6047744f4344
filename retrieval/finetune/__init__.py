"""Retrieval fine-tuning of InternVL-C/G on image-caption pairs (the upstream ``internvl_g`` recipe,
reference-spec-2 §2) with mmengine: ``tools/train.py configs/retrieval/...``.

Importing this package registers, in mmengine's root registries: the model ``InternVLRetrievalFinetune``, the
dataset ``ImageTextPairs``, the metric ``RetrievalRecall``, the hook ``SaveHFModelHook``, the LR schedule
``WarmupDecayLR`` and the FSDP functions ``internvl_layer_wrap_policy`` / ``internvl_layer_check_fn``.
Configs select it with ``custom_imports = dict(imports=['retrieval.finetune'])``.
"""
from .data import ImageTextPairs, load_pairs
from .engine import RetrievalRecall, SaveHFModelHook, WarmupDecayLR, internvl_layer_check_fn, internvl_layer_wrap_policy
from .losses import gather_with_grad, itm_loss, multi_positive_contrastive
from .model import RECIPES, InternVLRetrievalFinetune, resolve_recipe

__all__ = ["ImageTextPairs", "InternVLRetrievalFinetune", "RECIPES", "RetrievalRecall", "SaveHFModelHook",
           "WarmupDecayLR", "gather_with_grad", "internvl_layer_check_fn", "internvl_layer_wrap_policy",
           "itm_loss", "load_pairs", "multi_positive_contrastive", "resolve_recipe"]
