# ImageNet-1k in the ImageFolder layout (data/imagenet/{train,val}/<wnid>/*.JPEG), 128 images per GPU.
# The recipe's total batch is 1024 (8 GPUs x 128); auto_scale_lr rescales the lr for other totals, which is
# the reference's rule lr = 0.1 x total_batch / 512.
data_root = 'data/imagenet'
num_classes = 1000
image_size = 224

train_dataloader = dict(
    batch_size=128, num_workers=8, persistent_workers=True, pin_memory=True, drop_last=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    # RandomResizedCrop (bicubic) + horizontal flip + ImageNet mean/std
    dataset=dict(type='ImageFolderDataset', data_root=data_root, split='train',
                 transform=dict(train=True, image_size=image_size)))
val_dataloader = dict(
    batch_size=128, num_workers=8, persistent_workers=True, pin_memory=True, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    # resize the short side to image_size (bicubic), centre crop
    dataset=dict(type='ImageFolderDataset', data_root=data_root, split='val',
                 transform=dict(train=False, image_size=image_size)))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator
auto_scale_lr = dict(enable=True, base_batch_size=1024)
