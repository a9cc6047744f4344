# Few-shot 1/4 (published mIoU 53.3): InternViT-6B fine-tuned (drop path 0.4, layer decay 0.95) with the
# linear head on block 47, 20000 iterations (400 warm-up), FSDP + bf16 (launch with tools/dist_train.sh).
# Subset: a seeded 1/4 of the training list, written to <work_dir>/few_shot_subset.txt.
# Expects ./pretrained/intern_vit_6b_224px.pth (or the HF directory via model.backbone.pretrained).
_base_ = [
    '../_base_/few_shot_finetune.py', '../_base_/datasets/ade20k_504x504_few_shot.py',
    '../_base_/default_runtime.py', '../_base_/fsdp_bf16.py',
]
train_dataloader = dict(dataset=dict(subset_divisor=4, subset_seed=0))
max_iters = 20000
warmup_iters = 400
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters + 1),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=max_iters + 1),
]
train_cfg = dict(max_iters=max_iters)
