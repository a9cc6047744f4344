# Published recipe: InternVL-C/G head fine-tuning on Flickr30K-CN (Chinese captions, same images).
#   bash tools/dist_train.sh configs/retrieval/head/internvl_14b_head_flickr30k_cn_224px_bs128.py 8
_base_ = ['../_base_/head.py']
train_dataloader = dict(dataset=dict(annotation='data/flickr30k/flickr30k_cn_train.txt'))
val_dataloader = dict(dataset=dict(annotation='data/flickr30k/flickr30k_cn_test.txt'))
test_dataloader = val_dataloader
