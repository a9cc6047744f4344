# The reference probe schedule (reference-spec section 4.4): SGD with Nesterov momentum, no weight decay,
# lr 0.2 for a total batch of 1024 (0.1 per 512), 1 linear warm-up epoch then cosine to 0 over the other
# 9 (per iteration), gradient clipping at 5.0, fp16 autocast with a loss scaler, EMA of the head with
# decay 0.998 (mmengine momentum = 1 - decay), 10 epochs, validation every epoch.
max_epochs = 10
optim_wrapper = dict(
    type='AmpOptimWrapper', dtype='float16', loss_scale='dynamic',
    optimizer=dict(type='SGD', lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.0),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    # the reference warms up from 0; LinearLR needs a positive start factor
    dict(type='LinearLR', start_factor=1e-6, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=0.0, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop', fp16=True)
test_cfg = dict(type='TestLoop', fp16=True)
custom_hooks = [dict(type='EMAHook', ema_type='TrainableEMA', momentum=0.002, update_buffers=True)]
