# Full tuning (published mIoU 58.9): InternViT-6B + pyramid + UperNet, drop path 0.4, layer decay 0.95, aux head
# on level 2; FSDP (FlexibleRunner) with bf16 mixed precision. 8 GPUs x 2 images:
#   bash tools/dist_train.sh configs/segmentation/full_tuning/upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5.py 8
# Expects ./pretrained/intern_vit_6b_224px.pth (or the HF directory via model.backbone.pretrained).
_base_ = [
    '../_base_/models/upernet_internvit_6b.py', '../_base_/datasets/ade20k_504x504.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py', '../_base_/fsdp_bf16.py',
]
model = dict(backbone=dict(freeze_vit=False, drop_path_rate=0.4, dtype='float32', with_cp=False,
                           pretrained='./pretrained/intern_vit_6b_224px.pth'),
             auxiliary_head=dict(in_index=2))
optim_wrapper = dict(optimizer=dict(weight_decay=0.05), paramwise_cfg=dict(num_layers=48, layer_decay_rate=0.95))
