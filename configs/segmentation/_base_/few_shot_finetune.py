# Shared by every few-shot recipe: InternViT-6B fully fine-tuned (drop path 0.4, layer decay 0.95, weight decay
# 0.05) with the linear head on block 47. Each recipe adds its data fraction and its iteration/warm-up schedule.
_base_ = ['./models/linear_internvit_6b.py', './schedules/schedule_80k.py']
model = dict(backbone=dict(out_indices=[47], freeze_vit=False, drop_path_rate=0.4, dtype='float32', with_cp=False,
                           pretrained='./pretrained/intern_vit_6b_224px.pth'))
optim_wrapper = dict(optimizer=dict(weight_decay=0.05), paramwise_cfg=dict(num_layers=48, layer_decay_rate=0.95))
