# UperNet on the 4-level pyramid of blocks 11/23/35/47 (x4, x2, x1, x1/2), 1536 channels, plus the auxiliary
# FCN head (3x3 conv 3200->1536 + SyncBN + ReLU, loss weight 0.4).
_base_ = ['./internvit_6b_504.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(out_indices=[11, 23, 35, 47], with_fpn=True),
    decode_head=dict(type='UPerHead', in_channels=[3200, 3200, 3200, 3200], in_index=[0, 1, 2, 3],
                     pool_scales=(1, 2, 3, 6), channels=1536, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                     align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='InternViTFCNHead', in_channels=3200, in_index=2, channels=1536, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                        align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)))
