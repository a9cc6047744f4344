"""The ImageNet-1k probe recipes encode the published protocol (reference-spec section 4.4) and build."""
import glob
import os

import pytest
import torch

from .conftest import ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "classification", "linear_probe", "*.py"))
                 + glob.glob(os.path.join(ROOT, "configs", "classification", "attn_pool", "*.py")))
# checkpoint (Hugging Face repo name) -> (preset, blocks, image size of the probe)
EXPECTED = {
    "224px_linear-probe_8xb128_in1k-224": ("InternViT-6B-224px", 48, 224),
    "224px_linear-probe_8xb128_in1k-448": ("InternViT-6B-224px", 48, 448),
    "448px-v1-0_linear-probe_8xb128_in1k-448": ("InternViT-6B-448px-V1-0", 45, 448),
    "448px-v1-2_linear-probe_8xb128_in1k-448": ("InternViT-6B-448px-V1-2", 45, 448),
    "448px-v1-5_linear-probe_8xb128_in1k-448": ("InternViT-6B-448px-V1-5", 45, 448),
    "448px-v2-5_linear-probe_8xb128_in1k-448": ("InternViT-6B-448px-V2_5", 45, 448),
}


def _load(path):
    from mmengine.config import Config

    return Config.fromfile(path)


def test_all_twelve_recipes_exist():
    names = {os.path.basename(p)[len("internvit-6b-"):-3] for p in RECIPES}
    assert names == set(EXPECTED) | {k.replace("linear-probe", "attn-pool") for k in EXPECTED}


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_follows_the_published_protocol(path):
    from internvit.config import get_config

    cfg = _load(path)
    key = os.path.basename(path)[len("internvit-6b-"):-3].replace("attn-pool", "linear-probe")
    repo, blocks, size = EXPECTED[key]
    bb = cfg.model.backbone
    assert bb.pretrained == f"pretrained/{repo}" and bb.get("frozen", True)
    assert get_config(bb.arch).num_hidden_layers == blocks and get_config(bb.arch).hidden_size == 3200
    assert cfg.model.head.type == ("AttentionPoolingHead" if "attn-pool" in path else "ClsPatchConcatHead")
    assert cfg.model.head.num_classes == 1000 and cfg.model.label_smoothing == 0.1
    pre = cfg.model.data_preprocessor
    assert (pre.mixup_alpha, pre.cutmix_alpha, pre.mix_prob, pre.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    for loader, train in (("train_dataloader", True), ("val_dataloader", False), ("test_dataloader", False)):
        assert cfg[loader].dataset.transform == dict(train=train, image_size=size)
    # lr 0.1 per 512 images, scaled linearly with the total batch (auto_scale_lr)
    opt = cfg.optim_wrapper.optimizer
    assert opt.lr / cfg.auto_scale_lr.base_batch_size * 512 == pytest.approx(0.1) and cfg.auto_scale_lr.enable
    assert (opt.type, opt.momentum, opt.nesterov, opt.weight_decay) == ("SGD", 0.9, True, 0.0)
    assert cfg.optim_wrapper.clip_grad.max_norm == 5.0 and cfg.optim_wrapper.dtype == "float16"
    assert cfg.train_cfg.max_epochs == 10
    warm, cosine = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end, warm.convert_to_iter_based) == ("LinearLR", 0, 1, True)
    assert (cosine.type, cosine.begin, cosine.end, cosine.eta_min) == ("CosineAnnealingLR", 1, 10, 0.0)
    ema = cfg.custom_hooks[0]
    assert ema.type == "EMAHook" and ema.ema_type == "TrainableEMA" and 1 - ema.momentum == pytest.approx(0.998)
    assert cfg.val_evaluator.topk == (1, 5) and cfg.default_scope == "classification"


@pytest.mark.parametrize("name", ["internvit-6b-224px_linear-probe_8xb128_in1k-224.py",
                                  "internvit-6b-448px-v2-5_attn-pool_8xb128_in1k-448.py"])
def test_recipe_model_builds_and_trains_one_step_at_toy_width(name, tmp_path):
    """The recipe's model / preprocessor / optimiser settings, with the backbone swapped for a tiny preset."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    from classification.registry import MODELS

    folder = "attn_pool" if "attn-pool" in name else "linear_probe"
    cfg = _load(os.path.join(ROOT, "configs", "classification", folder, name))
    model_cfg = cfg.model.to_dict()
    model_cfg["backbone"].update(arch="internvit-6b-tiny", pretrained=None)
    with DefaultScope.overwrite_default_scope("classification"):
        model = MODELS.build(model_cfg)
        amp = cfg.optim_wrapper.to_dict()
        plain = {k: v for k, v in amp.items() if k not in ("dtype", "loss_scale")}  # AMP needs a GPU
        wrapper = build_optim_wrapper(model, dict(plain, type="OptimWrapper"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    assert model.head.num_classes == 1000
    if "attn" in name:
        assert model.head.attn_pooling.cross_attn.num_heads == 4  # the (tiny) ViT's head count
    data = dict(inputs=torch.randn(4, 3, 56, 56), data_samples=dict(gt_label=torch.tensor([1, 2, 3, 999])))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    assert not model.backbone.training  # frozen: stays in eval mode
    losses = model.train_step(data, wrapper)
    assert torch.isfinite(losses["loss"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable
