# Linear probe (cls_patch_concat: [class token, mean patch token] -> BatchNorm1d(6400, eps 1e-6) -> Linear)
# of the frozen InternViT-6B-224px on ImageNet-1k at 224 px; reference: 88.2 top-1 (IN-1k val).
# Expects the Hugging Face directory OpenGVLab/InternViT-6B-224px at pretrained/InternViT-6B-224px
# (the original-format pretrained/intern_vit_6b_224px.pth works too: set pretrained to it).
# Train:  python tools/train.py configs/classification/linear_probe/internvit-6b-224px_linear-probe_8xb128_in1k-224.py
_base_ = ['../_base_/default_runtime.py', '../_base_/imagenet1k_bs1024.py', '../_base_/schedule_sgd_10e.py']

model = dict(
    type='InternViTClassifier',
    backbone=dict(arch='internvit-6b-224px', pretrained='pretrained/InternViT-6B-224px', dtype='float32'),
    head=dict(type='ClsPatchConcatHead', num_classes=1000),
    label_smoothing=0.1,
    data_preprocessor=dict(type='ClsDataPreprocessor', mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0,
                           switch_prob=0.5, num_classes=1000),
)
