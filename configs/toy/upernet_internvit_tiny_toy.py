# Toy UperNet: tiny InternViT + the reference 4-level pyramid + UPerHead + auxiliary FCN head (make demo).
_base_ = ['./_base_toy_seg.py']

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(out_indices=[0, 1, 2, 3], with_fpn=True, drop_path_rate=0.0),
    decode_head=dict(type='UPerHead', in_channels=[64, 64, 64, 64], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                     channels=64, dropout_ratio=0.1, num_classes=4, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='InternViTFCNHead', in_channels=64, in_index=2, channels=32, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=4, norm_cfg=norm_cfg, align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)))
