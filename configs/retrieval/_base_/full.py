# Full fine-tuning (upstream finetune/ scripts, reference-spec-2 §2): every parameter trains; 364 px (position
# table resized from 224 on load and saved so), ViT drop path 0.3, 32 GPUs x 32 = 1024 per step, bf16 + FSDP.
# Data: Flickr30K (English) Karpathy split, images in data/flickr30k/Images (the recipes below switch datasets).
_base_ = ['./default_runtime.py', './schedule.py', './fsdp_bf16.py']
pretrained = './pretrained/InternVL-14B-224px'  # HF directory: config.json, safetensors, tokenizer.model
image_size = 364
model = dict(type='InternVLRetrievalFinetune', pretrained=pretrained, recipe='full',
             drop_path_rate=0.3, image_size=image_size, itm=True, tokenizer=pretrained)
train_dataloader = dict(
    batch_size=32, num_workers=2, persistent_workers=True, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageTextPairs', annotation='data/flickr30k/flickr30k_train_karpathy.txt',
                 image_root='data/flickr30k/Images', tokenizer=pretrained, image_size=image_size,
                 scale=(0.5, 1.0), hflip=0.5, max_length=80))
val_dataloader = dict(
    batch_size=32, num_workers=2, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ImageTextPairs', annotation='data/flickr30k/flickr30k_test_karpathy.txt',
                 image_root='data/flickr30k/Images', tokenizer=pretrained, mode='eval',
                 image_size=image_size, max_length=80))
test_dataloader = val_dataloader
val_evaluator = dict(type='RetrievalRecall', ks=(1, 5, 10))
test_evaluator = val_evaluator
