# Toy attention-pooling probe (AttentionPoolingBlock -> BatchNorm1d -> Linear) on the digits, trained on the
# fly; same data, backbone and schedule as digits_linear_probe.py, lower lr (the attention block is less
# forgiving than the BatchNorm + Linear probe).
_base_ = ['./digits_linear_probe.py']

model = dict(head=dict(_delete_=True, type='AttentionPoolingHead', num_classes={{_base_.num_classes}}))
optim_wrapper = dict(optimizer=dict(lr=0.1))
