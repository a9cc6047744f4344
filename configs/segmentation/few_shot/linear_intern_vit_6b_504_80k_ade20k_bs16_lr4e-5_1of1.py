# Few-shot 1/1 (published mIoU 57.2): InternViT-6B fine-tuned (drop path 0.4, layer decay 0.95) with the
# linear head on block 47, 80000 iterations (1500 warm-up), FSDP + bf16 (launch with tools/dist_train.sh).
# Full training data (the 1/1 row of the few-shot table), SETR-style test resize.
# Expects ./pretrained/intern_vit_6b_224px.pth (or the HF directory via model.backbone.pretrained).
_base_ = [
    '../_base_/few_shot_finetune.py', '../_base_/datasets/ade20k_504x504.py',
    '../_base_/default_runtime.py', '../_base_/fsdp_bf16.py',
]
max_iters = 80000
warmup_iters = 1500
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters + 1),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=max_iters + 1),
]
train_cfg = dict(max_iters=max_iters)
