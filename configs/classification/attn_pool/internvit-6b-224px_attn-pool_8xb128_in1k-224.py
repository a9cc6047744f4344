# Attention-pooling probe (AttentionPoolingBlock(3200, 25 heads, out 3200) -> BatchNorm1d(3200, eps 1e-6) ->
# Linear) of the frozen InternViT-6B-224px on ImageNet-1k at 224 px; same recipe as the linear probe.
# Expects the Hugging Face directory OpenGVLab/InternViT-6B-224px at pretrained/InternViT-6B-224px.
_base_ = ['../linear_probe/internvit-6b-224px_linear-probe_8xb128_in1k-224.py']

model = dict(head=dict(_delete_=True, type='AttentionPoolingHead', num_classes=1000))
