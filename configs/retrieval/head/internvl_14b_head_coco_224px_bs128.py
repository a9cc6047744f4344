# Published recipe: InternVL-C/G head fine-tuning on COCO Karpathy train (5 epochs; no published result).
#   bash tools/dist_train.sh configs/retrieval/head/internvl_14b_head_coco_224px_bs128.py 8
_base_ = ['../_base_/head.py']
max_epochs = 5
train_dataloader = dict(dataset=dict(annotation='data/coco/annotations/coco_karpathy_train.json',
                                     image_root='data/coco'))
val_dataloader = dict(dataset=dict(annotation='data/coco/annotations/coco_karpathy_test.json', image_root='data/coco'))
test_dataloader = val_dataloader
param_scheduler = [dict(type='WarmupDecayLR', warmup=100, warmup_type='log', by_epoch=True, begin=0,
                        end=max_epochs, convert_to_iter_based=True)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
