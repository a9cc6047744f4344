"""Layer-wise learning-rate decay for InternViT, with the reference's exact rules.

* ``num_layers = paramwise_cfg['num_layers'] + 2`` layer ids.
* id 0: the embeddings (``embeddings.*``; original names ``cls_token``, ``pos_embed``, ``patch_embed``,
  ``mask_token``, ``visual_embed``); block ``i`` (``encoder.layers.i`` / ``blocks.i`` / ``layers.i``): ``i + 1``;
  everything else (decode / auxiliary heads, the backbone pyramid ``up1…up4``): ``num_layers - 1``.
* lr scale ``layer_decay_rate ** (num_layers - layer_id - 1)``.
* ``paramwise_cfg['num_layers']`` must equal the backbone's block count (counted from the parameter names):
  a smaller value would give the last blocks an lr above the head's, a larger one shrinks every scale, so a
  mismatch raises ``ValueError`` at optimizer construction.
* weight decay 0 only for 1-D parameters and names ending in ``.bias`` (so the 3-D position embedding and
  class token *are* decayed, as in the reference); frozen parameters are skipped.
"""
from __future__ import annotations

import re
from typing import Any

from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_EMBED = re.compile(r"backbone\.(embeddings\.|cls_token|mask_token|pos_embed|patch_embed|visual_embed)")
_BLOCK = re.compile(r"backbone\.(?:encoder\.layers|blocks|layers)\.(\d+)\.")


def clean_param_name(name: str) -> str:
    """Drop wrapper parts (FSDP, activation checkpointing, torch.compile, DDP ``module.``) from a name."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name[len("module."):] if name.startswith("module.") else name


def count_blocks(module: nn.Module) -> int:
    """Number of backbone blocks (highest block index + 1) among all parameter names, frozen ones included;
    0 when no name looks like a block (a backbone with other names is not checked)."""
    top = -1
    for name, _ in module.named_parameters():
        m = _BLOCK.match(clean_param_name(name))
        if m:
            top = max(top, int(m.group(1)))
    return top + 1


def get_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a segmentor parameter name (``num_layers`` already includes the +2)."""
    name = clean_param_name(name)
    if _EMBED.match(name):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers - 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class InternViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg=dict(num_layers=48, layer_decay_rate=0.95)``; one group per (layer id, decay / no decay).

    Each group carries ``lr = base_lr * lr_scale`` plus ``lr_scale``, ``layer_id`` and ``group_name`` for
    inspection; mmengine's schedulers scale every group's initial lr, so the ratios hold for the whole run.
    """

    def add_params(self, params: list[dict[str, Any]], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        if "num_layers" not in cfg or "layer_decay_rate" not in cfg:
            raise KeyError("InternViTLayerDecayOptimizerConstructor needs paramwise_cfg=dict(num_layers=..., "
                           "layer_decay_rate=...)")
        blocks = count_blocks(module)
        if blocks and int(cfg["num_layers"]) != blocks:
            raise ValueError(f"paramwise_cfg.num_layers={cfg['num_layers']} but the backbone has {blocks} blocks; "
                             f"set num_layers={blocks} (layer-wise lr decay counts one layer per block)")
        num_layers = int(cfg["num_layers"]) + 2
        rate = float(cfg["layer_decay_rate"])
        weight_decay = self.base_wd if self.base_wd is not None else 0.0
        groups: dict[str, dict[str, Any]] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim == 1 or name.endswith(".bias"):
                kind, wd = "no_decay", 0.0
            else:
                kind, wd = "decay", weight_decay
            layer_id = get_layer_id(name, num_layers)
            key = f"layer_{layer_id}_{kind}"
            if key not in groups:
                scale = rate ** (num_layers - layer_id - 1)
                groups[key] = dict(params=[], weight_decay=wd, lr=scale * self.base_lr,
                                   lr_scale=scale, layer_id=layer_id, group_name=key)
            groups[key]["params"].append(param)
        rank, _ = get_dist_info()
        if rank == 0:
            ordered = sorted(groups.items(), key=lambda kv: kv[1]["layer_id"])
            lines = [f"{k}: lr_scale={g['lr_scale']:.6g} weight_decay={g['weight_decay']} ({len(g['params'])} params)"
                     for k, g in ordered]
            print_log("layer-wise lr decay (num_layers=%d, rate=%g):\n  %s" % (num_layers, rate, "\n  ".join(lines)),
                      logger="current")
        params.extend(groups.values())
