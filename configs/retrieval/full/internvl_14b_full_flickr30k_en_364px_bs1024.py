# Published recipe: InternVL-C/G full fine-tuning on Flickr30K (English), evaluated as InternVL-C and InternVL-G.
#   bash tools/dist_train.sh configs/retrieval/full/internvl_14b_full_flickr30k_en_364px_bs1024.py 8
_base_ = ['../_base_/full.py']
