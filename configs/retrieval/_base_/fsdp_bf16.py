# Sharded bf16 training of the 14B model: mmengine's FlexibleRunner + FSDPStrategy, one FSDP unit per InternViT
# block and per QLLaMA layer, bf16 parameters and compute with fp32 gradient reduction, activation checkpointing
# per layer (the scripts use DeepSpeed ZeRO-1 / ZeRO-3 with bf16 and gradient checkpointing). Launch with
#   bash tools/dist_train.sh CONFIG 8        (per node; FSDP does not run in a single plain process)
runner_type = 'FlexibleRunner'
strategy = dict(
    type='FSDPStrategy',
    model_wrapper=dict(
        type='MMFullyShardedDataParallel',
        use_orig_params=True,  # frozen and trainable parameters may share a unit (head recipe)
        sharding_strategy='FULL_SHARD',
        auto_wrap_policy=dict(type='internvl_layer_wrap_policy'),
        mixed_precision=dict(param_dtype='bfloat16', reduce_dtype='float32', buffer_dtype='float32')),
    activation_checkpointing=dict(check_fn='internvl_layer_check_fn'),
    state_dict_cfg='full')
