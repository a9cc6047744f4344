"""FSDP helpers for the full-tuning recipe (mmengine ``FlexibleRunner`` + ``FSDPStrategy``)."""
from __future__ import annotations

from mmengine.registry import FUNCTIONS
from torch import nn

from internvit.models.vit import Block


@FUNCTIONS.register_module()
def internvit_block_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **kwargs) -> bool:
    """FSDP ``auto_wrap_policy``: one FSDP unit per InternViT block (the rest goes to the root unit)."""
    return True if recurse else isinstance(module, Block)


@FUNCTIONS.register_module()
def internvit_block_check_fn(module: nn.Module) -> bool:
    """``activation_checkpointing`` ``check_fn``: checkpoint every InternViT block."""
    return isinstance(module, Block)
