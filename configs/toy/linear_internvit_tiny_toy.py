# Toy linear head: tiny InternViT (last block) + BatchNorm + 1x1 classifier, as the published linear recipes.
_base_ = ['./_base_toy_seg.py']

model = dict(
    backbone=dict(out_indices=[3]),
    decode_head=dict(type='InternViTFCNHead', in_channels=64, channels=64, num_convs=0, concat_input=False,
                     dropout_ratio=0.0, num_classes=4, with_norm=True,
                     feat_norm_cfg=dict(type='BN', requires_grad=True), align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
