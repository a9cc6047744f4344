# Linear probing (published mIoU 47.2): frozen InternViT-6B, block 44 (the 45th block), BN + 1x1 head.
# Expects ./pretrained/intern_vit_6b_224px.pth (or set model.backbone.pretrained to the HF directory).
_base_ = [
    '../_base_/models/linear_internvit_6b.py', '../_base_/datasets/ade20k_504x504.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py',
]
model = dict(backbone=dict(out_indices=[44], freeze_vit=True, drop_path_rate=0.0,
                           pretrained='./pretrained/intern_vit_6b_224px.pth'))
optim_wrapper = dict(optimizer=dict(weight_decay=0.0), paramwise_cfg=dict(num_layers=48, layer_decay_rate=1.0))
