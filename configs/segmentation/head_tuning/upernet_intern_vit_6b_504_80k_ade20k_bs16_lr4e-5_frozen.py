# Head tuning (published mIoU 54.9): frozen InternViT-6B, trainable pyramid + UperNet (1536 ch) + aux head
# on level 1. Expects ./pretrained/intern_vit_6b_224px.pth (or the HF directory via model.backbone.pretrained).
_base_ = [
    '../_base_/models/upernet_internvit_6b.py', '../_base_/datasets/ade20k_504x504.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py',
]
model = dict(backbone=dict(freeze_vit=True, drop_path_rate=0.0, pretrained='./pretrained/intern_vit_6b_224px.pth'),
             auxiliary_head=dict(in_index=1))
optim_wrapper = dict(optimizer=dict(weight_decay=0.05), paramwise_cfg=dict(num_layers=48, layer_decay_rate=1.0))
