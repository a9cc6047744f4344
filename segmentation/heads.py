"""Decode heads of the InternViT segmentation recipes.

``InternViTFCNHead`` is mmseg's :class:`FCNHead` plus the reference's ``with_norm`` option: a BatchNorm
(``SyncBN`` under distributed training; mmengine reverts it to BN otherwise) on the feature map before the
1×1 classifier. With ``num_convs=0, with_norm=True`` it is the published *linear head* (BN + 1×1 conv), and its
keys are the published ones: ``decode_head.norm.*``, ``decode_head.conv_seg.*``. Without ``with_norm`` it is
exactly mmseg's FCNHead (the UperNet auxiliary head).
"""
from __future__ import annotations

from typing import Optional

import torch
from mmcv.cnn import build_norm_layer
from mmseg.models.decode_heads import FCNHead
from mmseg.registry import MODELS


@MODELS.register_module()
class InternViTFCNHead(FCNHead):
    """FCNHead with an optional BatchNorm on the (post-conv) feature map; ``num_convs=0`` → the linear head.

    Args:
        with_norm: add the BatchNorm (eps 1e-5, momentum 0.1, affine) before ``conv_seg``.
        feat_norm_cfg: norm config of that BatchNorm (default ``dict(type='SyncBN', requires_grad=True)``).
        **kwargs: mmseg :class:`FCNHead` / ``BaseDecodeHead`` arguments.
    """

    def __init__(self, with_norm: bool = False, feat_norm_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.with_norm = with_norm
        if with_norm:
            cfg = feat_norm_cfg or dict(type="SyncBN", requires_grad=True)
            self.norm = build_norm_layer(cfg, self.channels)[1]

    def _forward_feature(self, inputs) -> torch.Tensor:
        feats = super()._forward_feature(inputs)
        return self.norm(feats) if self.with_norm else feats
