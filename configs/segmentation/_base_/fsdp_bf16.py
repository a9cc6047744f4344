# Fully-sharded training for recipes that update the 6B backbone (full tuning, few-shot): mmengine's
# FlexibleRunner + FSDPStrategy, one FSDP unit per InternViT block, activation checkpointing per block, bf16
# compute with fp32 gradient reduction. Recipes using it keep the backbone in fp32 (dtype='float32',
# with_cp=False): FSDP's mixed precision casts it and the strategy applies activation checkpointing.
# Launch with tools/dist_train.sh (needs --launcher pytorch; FSDP does not run in a single plain process).
runner_type = 'FlexibleRunner'
strategy = dict(
    type='FSDPStrategy',
    model_wrapper=dict(
        auto_wrap_policy=dict(type='internvit_block_wrap_policy'),
        use_orig_params=True,  # per-parameter lr groups (layer decay) inside flattened FSDP units
        sharding_strategy='FULL_SHARD',
        mixed_precision=dict(param_dtype='bfloat16', reduce_dtype='float32', buffer_dtype='float32')),
    activation_checkpointing=dict(check_fn='internvit_block_check_fn'),
    state_dict_cfg='full')
