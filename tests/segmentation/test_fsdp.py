"""FSDP recipe settings on CPU: one gloo process (world size 1), the strategy's model wrapper and activation
checkpointing from configs/segmentation/_base_/fsdp_bf16.py, one loss + backward step of the tiny segmentors."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.registry import FUNCTIONS, MODEL_WRAPPERS
from mmengine.structures import PixelData

from internvit.models.vit import Block

from .conftest import ROOT, build_segmentor, segmentor_cfg

FSDP_CFG = os.path.join(ROOT, "configs", "segmentation", "_base_", "fsdp_bf16.py")


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("fsdp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _wrap_like_strategy(model):
    """What mmengine's FSDPStrategy._wrap_model does, with device_id=cpu instead of LOCAL_RANK (a CUDA index)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    strategy = Config.fromfile(FSDP_CFG).strategy
    wrapper = copy.deepcopy(strategy.model_wrapper.to_dict())
    wrapper.setdefault("type", "MMFullyShardedDataParallel")
    model = MODEL_WRAPPERS.build(wrapper, default_args=dict(module=model, device_id=torch.device("cpu")))
    check_fn = FUNCTIONS.get(strategy.activation_checkpointing.check_fn)
    apply_activation_checkpointing(model, check_fn=check_fn)
    return model


def _samples(n=2, size=56):
    from mmseg.structures import SegDataSample

    out = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, size, size)))
        out.append(s)
    return out


@pytest.mark.parametrize("head", ["linear", "uper"])
def test_fsdp_bf16_recipe_loss_backward(process_group, head):
    from mmengine.model import MMFullyShardedDataParallel

    torch.manual_seed(0)
    model = build_segmentor(segmentor_cfg(head, dtype="float32"))
    model.train()
    fsdp = _wrap_like_strategy(model)
    assert isinstance(fsdp, MMFullyShardedDataParallel)
    # one FSDP unit per block, with bf16 compute; the root (heads included) has none
    units = [m for m in fsdp.modules() if isinstance(m, MMFullyShardedDataParallel.__mro__[1])]
    assert len(units) == 1 + 3
    assert fsdp.mixed_precision.param_dtype is None
    assert all(u.mixed_precision.param_dtype == torch.bfloat16 for u in units[1:])

    seen = []  # (input dtype, weight dtype) of every conv in the heads (mmseg calls head.forward directly)
    heads = [fsdp.module.decode_head] + ([fsdp.module.auxiliary_head] if head == "uper" else [])
    convs = [m for h in heads for m in h.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, mod.weight.dtype)))
             for m in convs]
    block_dtypes = []
    hooks += [m.register_forward_pre_hook(lambda mod, args: block_dtypes.append(args[0].dtype))
              for m in fsdp.module.backbone.encoder.layers.modules() if isinstance(m, Block)]
    losses = fsdp(torch.randn(2, 3, 56, 56), _samples(), mode="loss")
    for h in hooks:
        h.remove()
    assert block_dtypes and set(block_dtypes) == {torch.bfloat16}  # the ViT blocks compute in bf16
    assert len(seen) >= len(convs) and set(seen) == {(torch.float32, torch.float32)}, seen  # heads in fp32
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in fsdp.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_deepspeed_bf16_recipe_loss_backward():
    """DeepSpeed bf16 casts the whole model (``module.bfloat16()``, inputs too): the config's backbone
    out_dtype must follow, or the heads get fp32 maps with bf16 weights."""
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "segmentation", "full_tuning",
                                       "upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_deepspeed.py"))
    assert cfg.strategy.bf16.enabled and cfg.strategy.inputs_to_half == ["inputs"]
    torch.manual_seed(0)
    model = build_segmentor(segmentor_cfg("uper", dtype=cfg.model.backbone.dtype,
                                          out_dtype=cfg.model.backbone.out_dtype)).bfloat16()
    model.train()
    losses = model(torch.randn(2, 3, 56, 56, dtype=torch.bfloat16), _samples(), mode="loss")
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
