# Toy linear probe (cls_patch_concat head) on scikit-learn's digits, rendered by
#   python tools/make_toy_cls_dataset.py data/toy_digits
# The backbone is a tiny InternViT-6B-style model (hidden 64, 4 heads, 3 blocks, 56 px) with fixed random
# weights (init_seed), used as a frozen feature extractor so the config runs anywhere in seconds; its init
# scale is raised (LayerScale 1.0, std 0.1) so the random class-token features are not near-constant.
# Trained on the fly: every epoch runs the backbone on every image. The train split uses the eval transform
# (no random crops: they destroy 8x8 digits), so results compare with the cached variant.
default_scope = 'classification'
custom_imports = dict(imports=['classification'], allow_failed_imports=False)

data_root = 'data/toy_digits'
num_classes = 10
backbone = dict(
    arch=dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=3, image_size=56,
              initializer_factor=1.0, initializer_range=0.1),
    pretrained=None, init_seed=0)
transform = dict(train=False, image_size=56)

model = dict(
    type='InternViTClassifier',
    backbone=backbone,
    head=dict(type='ClsPatchConcatHead', num_classes=num_classes),
    label_smoothing=0.0,
)

train_images = dict(type='ImageFolderDataset', data_root=data_root, split='train', transform=transform)
val_images = dict(type='ImageFolderDataset', data_root=data_root, split='val', transform=transform)
train_dataloader = dict(
    batch_size=64, num_workers=0, persistent_workers=False, drop_last=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=train_images)
val_dataloader = dict(
    batch_size=128, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=val_images)
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5), mean_recall=True)
test_evaluator = val_evaluator

# the published recipe's optimiser and schedule (SGD nesterov, 1 warm-up epoch + cosine), at toy scale
max_epochs = 10
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.0),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=0.0, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()
# EMA of the head (the recipe's decay 0.998 is for ~12k iterations; this toy run has 220)
custom_hooks = [dict(type='EMAHook', ema_type='TrainableEMA', momentum=0.1, update_buffers=True)]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'), dist_cfg=dict(backend='nccl'))
randomness = dict(seed=0)
log_level = 'INFO'
load_from = None
resume = False
