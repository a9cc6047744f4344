# Few-shot ADE20K (1/2 ... 1/16 of the training list): a seeded subset whose file list is written to
# <work_dir>/few_shot_subset.txt (pass it back as train_dataloader.dataset.subset_file to reproduce a run).
# As in the reference, these splits test with a plain keep-ratio Resize (2016, 504) + ResizeToMultiple(14).
_base_ = ['./ade20k_504x504.py']
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2016, 504), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=14),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=150),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(type='FewShotADE20KDataset', subset_divisor=16, subset_seed=0))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
custom_hooks = [dict(type='SaveSubsetListHook')]
