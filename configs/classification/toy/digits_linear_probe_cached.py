# The toy linear probe on cached features: the frozen backbone runs once per image (on first use, written
# under cache_root by internvit.FeatureExtractor), then every epoch trains the head on the stored
# concat(class token, mean patch token) vectors.
_base_ = ['./digits_linear_probe.py']

cache_root = 'work_dirs/feature_cache/toy_digits_tiny'
model = dict(from_features=True)
train_dataloader = dict(dataset=dict(
    _delete_=True, type='CachedFeatureDataset', feature='cls_mean', backbone={{_base_.backbone}},
    cache_dir=cache_root + '/cls_mean/train', dataset={{_base_.train_images}}))
val_dataloader = dict(dataset=dict(
    _delete_=True, type='CachedFeatureDataset', feature='cls_mean', backbone={{_base_.backbone}},
    cache_dir=cache_root + '/cls_mean/val', dataset={{_base_.val_images}}))
test_dataloader = val_dataloader
