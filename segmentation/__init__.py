"""mmseg 1.x plugin for InternViT. Importing it registers everything (configs use
``custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)``):

* ``MODELS``: ``InternViTBackbone``, ``InternViTFCNHead`` (the BN + 1×1 linear head);
* mmengine ``OPTIM_WRAPPER_CONSTRUCTORS``: ``InternViTLayerDecayOptimizerConstructor``;
* ``TRANSFORMS``: ``SETRResize``; ``DATASETS``: ``FewShotADE20KDataset``, ``FewShotSegDataset``;
  ``HOOKS``: ``SaveSubsetListHook``;
* mmengine ``FUNCTIONS``: ``internvit_block_wrap_policy`` / ``internvit_block_check_fn`` (FSDP wrapping and
  activation checkpointing per transformer block); ``MODEL_WRAPPERS``: ``InternViTFSDP`` (bf16 blocks, fp32 heads).
"""
from internvit import compat

compat.apply(mmseg=True)

from .backbone import InternViTBackbone  # noqa: E402
from .few_shot import FewShotADE20KDataset, FewShotSegDataset, SaveSubsetListHook  # noqa: E402
from .fsdp import InternViTFSDP, internvit_block_check_fn, internvit_block_wrap_policy  # noqa: E402
from .heads import InternViTFCNHead  # noqa: E402
from .layer_decay import InternViTLayerDecayOptimizerConstructor  # noqa: E402
from .transforms import SETRResize  # noqa: E402

__all__ = [
    "InternViTBackbone", "InternViTFCNHead", "InternViTLayerDecayOptimizerConstructor", "SETRResize",
    "FewShotADE20KDataset", "FewShotSegDataset", "SaveSubsetListHook", "internvit_block_wrap_policy",
    "internvit_block_check_fn", "InternViTFSDP",
]
