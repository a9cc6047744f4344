# InternViT-6B (48 blocks, 3200 wide, RMSNorm, QK-norm) at crop 504 in an EncoderDecoder, bf16 backbone with
# fp32 outputs and fp32 heads (as the reference runs it). The pretrained 224-px checkpoint's 16x16 position
# grid is resized to 36x36 at load time. Either family works: the original intern_vit_6b_224px.pth or the
# Hugging Face InternViT-6B-224px directory.
pretrained = './pretrained/intern_vit_6b_224px.pth'
data_preprocessor = dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                         bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(504, 504))
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(type='InternViTBackbone', arch='internvit-6b-224px', img_size=504, out_indices=[47],
                  with_fpn=False, with_final_norm=False, freeze_vit=False, with_cp=True, drop_path_rate=0.0,
                  dtype='bfloat16', pretrained=pretrained),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322)))
