# Published recipe: InternVL-C/G head fine-tuning on Flickr30K (English), evaluated as InternVL-C and InternVL-G.
#   bash tools/dist_train.sh configs/retrieval/head/internvl_14b_head_flickr30k_en_224px_bs128.py 8
_base_ = ['../_base_/head.py']
