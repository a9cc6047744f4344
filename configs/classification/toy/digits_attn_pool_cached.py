# The toy attention-pooling probe on cached features: the backbone's last-block token sequences (class token
# + patch tokens) are extracted once and stored; the attention-pooling head trains on them.
_base_ = ['./digits_attn_pool.py']

cache_root = 'work_dirs/feature_cache/toy_digits_tiny'
model = dict(from_features=True)
train_dataloader = dict(dataset=dict(
    _delete_=True, type='CachedFeatureDataset', feature='tokens', backbone={{_base_.backbone}},
    cache_dir=cache_root + '/tokens/train', dataset={{_base_.train_images}}))
val_dataloader = dict(dataset=dict(
    _delete_=True, type='CachedFeatureDataset', feature='tokens', backbone={{_base_.backbone}},
    cache_dir=cache_root + '/tokens/val', dataset={{_base_.val_images}}))
test_dataloader = val_dataloader
