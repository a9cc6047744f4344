# Toy retrieval fine-tuning on real handwritten digits (scikit-learn's 1,797 scans), captioned in English,
# French and Chinese, with the recipe's losses (ITC on the C and G paths with multiple positives per image, ITM,
# learned logit scale) and schedule shape (log warm-up + linear decay, AdamW, no decay on 1-D weights, grad clip
# 1.0). The model is a tiny InternVL-C/G trained from random weights, so the learning rate is far above the
# recipe's 1e-6 (which fine-tunes a trained 14B model). The captions name only the digit, so all scans of a
# digit share one image id (--image-ids digit): the multi-positive targets then treat every scan of a digit as
# a positive of every caption of it. About 190 steps of 128 pairs (about 2 CPU-minutes). Make the data first:
#   python tools/make_demo_retrieval_data.py data/toy_digits_pairs --image-ids digit
#   python tools/train.py configs/retrieval/toy/digits_internvl_tiny.py --work-dir work_dirs/digits_retrieval
# The fine-tuned model is written to <work-dir>/hf_model (tokenizer included): every tool reads it, e.g.
#   python tools/build_index.py data/toy_digits_pairs/images/val OUT \
#       --model internvl-g:work_dirs/digits_retrieval/hf_model
custom_imports = dict(imports=['retrieval.finetune'], allow_failed_imports=False)

data_root = 'data/toy_digits_pairs'
tokenizer = data_root + '/tokenizer.model'
image_size = 28  # the 56 px PNGs squashed to 2x2 patches of 14 px (each a 4x4 block of the 8x8 scan)
max_length = 24  # the captions are short; the recipe's 80 only adds padding here

model = dict(
    type='InternVLRetrievalFinetune',
    pretrained='internvl-tiny',  # a preset: random weights, seeded (init_seed)
    config=dict(
        vision_config=dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=3,
                           image_size=image_size, patch_size=14, qkv_bias=False, qk_normalization=True,
                           norm_type='rms_norm', initializer_factor=0.1),
        qllama_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_query_token=4, vision_hidden_size=64,
                           cross_attention_frequency=2),
        clip_embed_dim=32, attn_pool_num_heads=4, num_query_token=4, max_txt_len=max_length),
    recipe='full',
    drop_path_rate=0.0,
    itm=True,
    tokenizer=tokenizer,
    init_seed=0,
)

# one loader process: reading and augmenting the next batch runs on the second core while the model trains
train_dataloader = dict(
    batch_size=128, num_workers=1, persistent_workers=True, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageTextPairs', annotation=data_root + '/train.json', tokenizer=tokenizer,
                 image_size=image_size, max_length=max_length,
                 scale=(0.8, 1.0), hflip=0.0))  # mirrored digits are other shapes: no flips here
# one held-out image per digit: the captions name only the digit, so exact-image recall is meaningful
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ImageTextPairs', annotation=data_root + '/val_10.json', tokenizer=tokenizer,
                 mode='eval', image_size=image_size, max_length=max_length))
test_dataloader = val_dataloader
val_evaluator = dict(type='RetrievalRecall', ks=(1, 5))  # 10 images: recall@10 would be 1.0 for any model
test_evaluator = val_evaluator

max_epochs = 6
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    # no decay for 1-D weights and biases, as the recipe (logit_scale, a scalar upstream, keeps it)
    paramwise_cfg=dict(flat_decay_mult=0.0, custom_keys={'logit_scale': dict(decay_mult=1.0)}),
    clip_grad=dict(max_norm=1.0))
param_scheduler = [dict(type='WarmupDecayLR', warmup=10, warmup_type='log', by_epoch=True, begin=0,
                        end=max_epochs, convert_to_iter_based=True)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
custom_hooks = [dict(type='SaveHFModelHook')]
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'), dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
log_level = 'INFO'
load_from = None
resume = False
