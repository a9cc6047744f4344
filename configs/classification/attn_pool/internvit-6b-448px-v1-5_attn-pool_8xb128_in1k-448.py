# Attention-pooling probe of the frozen InternViT-6B-448px-V1-5 (45 blocks) on ImageNet-1k at 448 px.
# Expects the Hugging Face directory OpenGVLab/InternViT-6B-448px-V1-5 at pretrained/InternViT-6B-448px-V1-5.
_base_ = ['./internvit-6b-224px_attn-pool_8xb128_in1k-224.py']

model = dict(backbone=dict(arch='internvit-6b-448px-v1-5', pretrained='pretrained/InternViT-6B-448px-V1-5'))
train_dataloader = dict(dataset=dict(transform=dict(image_size=448)))
val_dataloader = dict(dataset=dict(transform=dict(image_size=448)))
test_dataloader = val_dataloader
