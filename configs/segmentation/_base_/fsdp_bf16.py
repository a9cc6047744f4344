# Fully-sharded training for recipes that update the 6B backbone (full tuning, few-shot): mmengine's
# FlexibleRunner + FSDPStrategy, one FSDP unit per InternViT block, activation checkpointing per block. As in
# the reference, only the ViT blocks compute in bf16 (fp32 gradient reduction); the root unit (patch embedding,
# pyramid, decode/aux heads) stays fp32: InternViTFSDP's block_mixed_precision applies to the block units only.
# Recipes using it keep the backbone in fp32 (dtype='float32', with_cp=False): FSDP casts the blocks and the
# strategy applies activation checkpointing.
# Launch with tools/dist_train.sh (needs --launcher pytorch; FSDP does not run in a single plain process).
runner_type = 'FlexibleRunner'
strategy = dict(
    type='FSDPStrategy',
    model_wrapper=dict(
        type='InternViTFSDP',  # one FSDP unit per InternViT block (segmentation/fsdp.py)
        use_orig_params=True,  # per-parameter lr groups (layer decay) inside flattened FSDP units
        sharding_strategy='FULL_SHARD',
        block_mixed_precision=dict(param_dtype='bfloat16', reduce_dtype='float32', buffer_dtype='float32')),
    activation_checkpointing=dict(check_fn='internvit_block_check_fn'),
    state_dict_cfg='full')
