"""The layer-wise lr decay constructor reproduces the reference rules; the warm-up + poly chain matches mmcv."""
import pytest
import torch

from .conftest import build_segmentor, segmentor_cfg


def _reference_rule(name: str, param: torch.Tensor, num_blocks: int, rate: float, wd: float):
    """The reference constructor's rules, restated for our parameter names (num_layers = blocks + 2)."""
    n = num_blocks + 2
    if name.startswith("backbone.embeddings."):
        layer_id = 0
    elif name.startswith("backbone.encoder.layers."):
        layer_id = int(name.split(".")[3]) + 1
    else:  # heads and the pyramid
        layer_id = n - 1
    no_decay = param.ndim == 1 or name.endswith(".bias")
    return rate ** (n - layer_id - 1), 0.0 if no_decay else wd


@pytest.mark.parametrize("freeze", [False, True])
def test_every_parameter_group(freeze):
    from mmengine.optim import build_optim_wrapper

    model = build_segmentor(segmentor_cfg("uper", freeze_vit=freeze))
    model.backbone.up2[0].bias.requires_grad_(False)  # a frozen parameter outside the ViT is skipped too
    base_lr, wd, rate = 4e-5, 0.05, 0.9
    wrapper = build_optim_wrapper(model, dict(
        type="OptimWrapper", optimizer=dict(type="AdamW", lr=base_lr, weight_decay=wd),
        constructor="InternViTLayerDecayOptimizerConstructor",
        paramwise_cfg=dict(num_layers=3, layer_decay_rate=rate)))
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g["params"]}
    seen = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in group_of, f"frozen {name} must not be optimised"
            continue
        scale, want_wd = _reference_rule(name, p, 3, rate, wd)
        g = group_of[id(p)]
        assert g["lr"] == pytest.approx(base_lr * scale, rel=1e-12), name
        assert g["weight_decay"] == want_wd, name
        seen += 1
    assert seen == sum(len(g["params"]) for g in wrapper.optimizer.param_groups)
    if not freeze:  # spot values: 3-D position table / class token are decayed; LayerScale / norms are not
        pos = group_of[id(model.backbone.embeddings.position_embedding)]
        assert pos["weight_decay"] == wd and pos["lr"] == pytest.approx(base_lr * rate ** 4)
        ls = group_of[id(model.backbone.encoder.layers[2].ls1)]
        assert ls["weight_decay"] == 0.0 and ls["lr"] == pytest.approx(base_lr * rate)
    head = group_of[id(model.decode_head.conv_seg.weight)]
    assert head["lr"] == pytest.approx(base_lr) and head["weight_decay"] == wd
    assert group_of[id(model.backbone.up1[0].weight)]["lr"] == pytest.approx(base_lr)


def test_layer_id_of_wrapped_and_original_names():
    from segmentation.layer_decay import get_layer_id

    n = 50
    assert get_layer_id("backbone.embeddings.class_embedding", n) == 0
    assert get_layer_id("module.backbone.pos_embed", n) == 0
    assert get_layer_id("backbone.patch_embed.proj.weight", n) == 0
    assert get_layer_id("backbone.encoder.layers.47.mlp.fc1.weight", n) == 48
    assert get_layer_id("backbone.blocks.0.attn.qkv.weight", n) == 1
    assert get_layer_id("backbone.encoder.layers._fsdp_wrapped_module.5.attn.proj.weight".replace(
        "layers._fsdp_wrapped_module.5", "layers.5._fsdp_wrapped_module"), n) == 6
    assert get_layer_id("backbone.up1.0.weight", n) == 49
    assert get_layer_id("decode_head.conv_seg.weight", n) == 49


def test_missing_paramwise_cfg_is_a_clear_error():
    from mmengine.optim import build_optim_wrapper

    model = build_segmentor(segmentor_cfg("linear"))
    with pytest.raises(KeyError, match="layer_decay_rate"):
        build_optim_wrapper(model, dict(optimizer=dict(type="AdamW", lr=1e-3),
                                        constructor="InternViTLayerDecayOptimizerConstructor",
                                        paramwise_cfg=dict(num_layers=3)))


def test_warmup_poly_chain_matches_mmcv_formula():
    """mmcv 0.x: lr = base * (1 - t/T) * (1 - (1 - t/Tw)(1 - ratio)) during warm-up, base * (1 - t/T) after."""
    from mmengine.config import Config
    from mmengine.optim.scheduler import LinearLR, PolyLR

    cfg = Config.fromfile("configs/segmentation/_base_/schedules/schedule_80k.py")
    warm, total = cfg.warmup_iters, cfg.max_iters
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-5)
    specs = {"LinearLR": LinearLR, "PolyLR": PolyLR}
    scheds = [specs[s["type"]](opt, **{k: v for k, v in s.items() if k != "type"}) for s in cfg.param_scheduler]
    for t in range(0, 3000):
        if t in (0, 1, 7, 750, 1499, 1500, 1501, 2999):
            want = 4e-5 * (1 - t / total) * (1 - (1 - min(t, warm) / warm) * (1 - 1e-6))
            assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-6, abs=1e-15), t
        opt.step()
        for s in scheds:
            s.step()


@pytest.mark.parametrize("num_layers", [2, 4, 48])
def test_num_layers_must_match_the_backbone(num_layers):
    """The reported case: num_layers=2 on a 3-block backbone gave the last block lr_scale 1/0.9 = 1.11 (above the
    head's 1.0). Any mismatch is refused at optimizer construction, naming both numbers."""
    from mmengine.optim import build_optim_wrapper

    model = build_segmentor(segmentor_cfg("linear"))
    assert len(model.backbone.encoder.layers) == 3
    with pytest.raises(ValueError, match=rf"num_layers={num_layers} but the backbone has 3 blocks"):
        build_optim_wrapper(model, dict(optimizer=dict(type="AdamW", lr=1e-3),
                                        constructor="InternViTLayerDecayOptimizerConstructor",
                                        paramwise_cfg=dict(num_layers=num_layers, layer_decay_rate=0.9)))


def test_matching_num_layers_keeps_every_scale_at_most_one():
    from mmengine.optim import build_optim_wrapper

    model = build_segmentor(segmentor_cfg("linear", freeze_vit=True))  # frozen blocks still count
    wrapper = build_optim_wrapper(model, dict(optimizer=dict(type="AdamW", lr=1e-3),
                                              constructor="InternViTLayerDecayOptimizerConstructor",
                                              paramwise_cfg=dict(num_layers=3, layer_decay_rate=0.9)))
    assert max(g["lr_scale"] for g in wrapper.optimizer.param_groups) == 1.0
