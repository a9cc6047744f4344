"""FSDP helpers for the full-tuning recipe (mmengine ``FlexibleRunner`` + ``FSDPStrategy``).

The reference computes the ViT in bf16 and the decode / auxiliary heads in fp32. FSDP's ``mixed_precision``
applies to every parameter of a unit (the root unit holds the heads), so :class:`InternViTFSDP` gives the
bf16 policy only to the per-block units (``block_mixed_precision``); the root unit (patch embedding, pyramid,
heads) keeps fp32 parameters and compute.
"""
from __future__ import annotations

from typing import Optional, Union

from mmengine.model import MMFullyShardedDataParallel
from mmengine.registry import FUNCTIONS, MODEL_WRAPPERS
from torch import nn
from torch.distributed.fsdp import MixedPrecision
from torch.distributed.fsdp.wrap import CustomPolicy

from internvit.features import parse_dtype
from internvit.models.vit import Block


@FUNCTIONS.register_module()
def internvit_block_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **kwargs) -> bool:
    """FSDP ``auto_wrap_policy``: one FSDP unit per InternViT block (the rest goes to the root unit)."""
    return True if recurse else isinstance(module, Block)


@FUNCTIONS.register_module()
def internvit_block_check_fn(module: nn.Module) -> bool:
    """``activation_checkpointing`` ``check_fn``: checkpoint every InternViT block."""
    return isinstance(module, Block)


class _BlockMixedPrecisionPolicy(CustomPolicy):
    """One FSDP unit per block, each with its own ``MixedPrecision``. Callable like an old-style policy only to
    pass mmengine's ``callable(auto_wrap_policy)`` check; FSDP uses it as a ``_Policy`` (per-unit kwargs)."""

    def __init__(self, mixed_precision: MixedPrecision) -> None:
        super().__init__(lambda m: {"mixed_precision": mixed_precision} if isinstance(m, Block) else False)

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **kwargs) -> bool:
        return internvit_block_wrap_policy(module, recurse, nonwrapped_numel)


def _mixed_precision(cfg: Union[dict, MixedPrecision]) -> MixedPrecision:
    if isinstance(cfg, MixedPrecision):
        return cfg
    cfg = dict(cfg)
    for key in ("param_dtype", "reduce_dtype", "buffer_dtype"):
        if cfg.get(key) is not None:
            cfg[key] = parse_dtype(cfg[key])
    cfg.setdefault("cast_forward_inputs", True)  # the block's fp32 input (patch embedding) → param_dtype
    return MixedPrecision(**cfg)


@MODEL_WRAPPERS.register_module()
class InternViTFSDP(MMFullyShardedDataParallel):
    """``MMFullyShardedDataParallel`` with mixed precision for the InternViT blocks only.

    Args:
        block_mixed_precision: ``MixedPrecision`` (or its fields as a dict, dtype names allowed) of the
            per-block units, which replaces ``auto_wrap_policy`` (one unit per block). Everything outside the
            blocks stays in the root unit, in the parameters' own dtype (fp32). ``None``: plain
            ``MMFullyShardedDataParallel``.
        **kwargs: ``MMFullyShardedDataParallel`` arguments; ``mixed_precision`` would set the root unit's
            (heads included) and is refused together with ``block_mixed_precision``.
    """

    def __init__(self, module: nn.Module, block_mixed_precision: Optional[Union[dict, MixedPrecision]] = None,
                 **kwargs) -> None:
        if block_mixed_precision is not None:
            if kwargs.get("mixed_precision") is not None:
                raise ValueError("InternViTFSDP: give block_mixed_precision (blocks only, heads stay fp32) or "
                                 "mixed_precision (whole model), not both")
            kwargs["auto_wrap_policy"] = _BlockMixedPrecisionPolicy(_mixed_precision(block_mixed_precision))
        super().__init__(module, **kwargs)


__all__ = ["InternViTFSDP", "internvit_block_check_fn", "internvit_block_wrap_policy"]
