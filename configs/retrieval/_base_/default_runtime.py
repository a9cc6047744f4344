# Runtime shared by the published InternVL-C/G retrieval fine-tuning recipes (reference-spec-2 §2).
custom_imports = dict(imports=['retrieval.finetune'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),  # the scripts log every step
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=5),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
# after training: <work_dir>/hf_model, an HF directory internvit.load_model / build_index.py / the service read
custom_hooks = [dict(type='SaveHFModelHook')]
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'), dist_cfg=dict(backend='nccl'))
randomness = dict(seed=42)  # the HF Trainer default the scripts keep
log_level = 'INFO'
load_from = None
resume = False
val_cfg = dict()
test_cfg = dict()
