# Attention-pooling probe of the frozen InternViT-6B-224px on ImageNet-1k at 448 px (the reference "224to448" recipe:
# the 16x16 position table is bicubically interpolated to 32x32; here at forward time, same operation).
# Expects pretrained/InternViT-6B-224px (Hugging Face directory) or the original .pth.
_base_ = ['./internvit-6b-224px_attn-pool_8xb128_in1k-224.py']

train_dataloader = dict(dataset=dict(transform=dict(image_size=448)))
val_dataloader = dict(dataset=dict(transform=dict(image_size=448)))
test_dataloader = val_dataloader
