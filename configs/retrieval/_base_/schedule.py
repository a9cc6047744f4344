# Optimiser and schedule of every published recipe (reference-spec-2 §2.6): AdamW (HF defaults) at peak lr 1e-6,
# weight decay 0.05 except for 1-D weights and biases, gradient clipping 1.0, and the schedule the scripts
# effectively ran: DeepSpeed's WarmupDecayLR (log warm-up over 100 steps, then linear decay to 0 at the last
# step, one lr for every parameter group). The scripts *ask* for cosine decay and (full recipe) layer-wise lr
# decay 0.9; their DeepSpeed JSON's scheduler block overrides both (docs/finetune.md).
max_epochs = 10
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    # no decay on 1-D weights and biases; logit_scale (a scalar in the checkpoints, held as shape (1,) for FSDP)
    # keeps its decay, as upstream
    paramwise_cfg=dict(flat_decay_mult=0.0, custom_keys={'logit_scale': dict(decay_mult=1.0)}),
    clip_grad=dict(max_norm=1.0))
param_scheduler = [dict(type='WarmupDecayLR', warmup=100, warmup_type='log', by_epoch=True, begin=0,
                        end=max_epochs, convert_to_iter_based=True)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
