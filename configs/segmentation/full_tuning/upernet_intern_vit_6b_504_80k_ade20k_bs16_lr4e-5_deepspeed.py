# Full tuning with DeepSpeed ZeRO-3 instead of FSDP (needs `pip install deepspeed`; not part of the pinned
# requirements). Same model and schedule as the FSDP config.
# DEVIATION from the reference (and the FSDP config): DeepSpeed's bf16 mode casts the whole model, so the
# decode/aux heads (and the pyramid) are stored and computed in bf16 too; DeepSpeed has no per-module precision.
# The backbone therefore returns bf16 maps (out_dtype) to match the heads. Use the FSDP config for fp32 heads.
_base_ = ['./upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5.py']
strategy = dict(
    _delete_=True,
    type='DeepSpeedStrategy',
    bf16=dict(enabled=True),
    zero_optimization=dict(stage=3, overlap_comm=True, contiguous_gradients=True, reduce_bucket_size='auto',
                           stage3_prefetch_bucket_size='auto', stage3_param_persistence_threshold='auto'),
    gradient_clipping=0.0,
    inputs_to_half=['inputs'])
optim_wrapper = dict(type='DeepSpeedOptimWrapper')
model = dict(backbone=dict(dtype='float32', out_dtype='bfloat16', with_cp=True))
