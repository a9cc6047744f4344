# The published linear head: SyncBN(3200) on the block feature map, then a 1x1 conv to 150 classes.
_base_ = ['./internvit_6b_504.py']
model = dict(
    decode_head=dict(type='InternViTFCNHead', in_channels=3200, channels=3200, num_convs=0, concat_input=False,
                     dropout_ratio=0.0, num_classes=150, with_norm=True, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
