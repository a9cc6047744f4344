# Published recipe: InternVL-C/G full fine-tuning on Flickr30K-CN (Chinese captions, same images).
#   bash tools/dist_train.sh configs/retrieval/full/internvl_14b_full_flickr30k_cn_364px_bs1024.py 8
_base_ = ['../_base_/full.py']
train_dataloader = dict(dataset=dict(annotation='data/flickr30k/flickr30k_cn_train.txt'))
val_dataloader = dict(dataset=dict(annotation='data/flickr30k/flickr30k_cn_test.txt'))
test_dataloader = val_dataloader
