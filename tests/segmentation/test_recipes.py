"""The published recipes: settings as in the reference table, and each builds (at toy width) with its optimizer."""
import glob
import os

import pytest

from .conftest import ROOT, TINY_ARCH, build_segmentor

RECIPES = os.path.join(ROOT, "configs", "segmentation")
# reference-spec §3.6: (out_indices, freeze_vit, drop_path, weight decay, layer decay, iters, warm-up, aux in_index)
_LIN, _UPER, _FS = "linear_intern_vit_6b_504", "upernet_intern_vit_6b_504", "ade20k_bs16_lr4e-5"
TABLE = {
    f"linear_probing/{_LIN}_80k_{_FS}_frozen.py": ([44], True, 0.0, 0.0, 1.0, 80000, 1500, None),
    f"head_tuning/{_UPER}_80k_{_FS}_frozen.py": ([11, 23, 35, 47], True, 0.0, 0.05, 1.0, 80000, 1500, 1),
    f"full_tuning/{_UPER}_80k_{_FS}.py": ([11, 23, 35, 47], False, 0.4, 0.05, 0.95, 80000, 1500, 2),
    f"few_shot/{_LIN}_5k_{_FS}_1of16.py": ([47], False, 0.4, 0.05, 0.95, 5000, 100, None),
    f"few_shot/{_LIN}_10k_{_FS}_1of8.py": ([47], False, 0.4, 0.05, 0.95, 10000, 200, None),
    f"few_shot/{_LIN}_20k_{_FS}_1of4.py": ([47], False, 0.4, 0.05, 0.95, 20000, 400, None),
    f"few_shot/{_LIN}_40k_{_FS}_1of2.py": ([47], False, 0.4, 0.05, 0.95, 40000, 800, None),
    f"few_shot/{_LIN}_80k_{_FS}_1of1.py": ([47], False, 0.4, 0.05, 0.95, 80000, 1500, None),
}


def test_every_recipe_is_in_the_table():
    found = {os.path.relpath(p, RECIPES) for p in glob.glob(os.path.join(RECIPES, "*", "*.py"))
             if "_base_" not in p and not p.endswith("_deepspeed.py")}
    assert found == set(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_settings_and_build(name):
    from mmengine.optim import build_optim_wrapper

    from internvit.runner import load_config

    cfg = load_config(os.path.join(RECIPES, name))
    out_idx, frozen, dpr, wd, decay, iters, warm, aux = TABLE[name]
    bb = cfg.model.backbone
    assert (bb.out_indices, bb.freeze_vit, bb.drop_path_rate) == (out_idx, frozen, dpr)
    assert bb.arch == "internvit-6b-224px" and bb.img_size == 504 and bb.pretrained.endswith("intern_vit_6b_224px.pth")
    assert cfg.optim_wrapper.optimizer.lr == 4e-5 and cfg.optim_wrapper.optimizer.weight_decay == wd
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=48, layer_decay_rate=decay)
    assert cfg.train_cfg.max_iters == iters and cfg.train_dataloader.batch_size == 2
    assert [s.end for s in cfg.param_scheduler] == [warm + 1, iters + 1]
    assert cfg.model.test_cfg == dict(mode="slide", crop_size=(504, 504), stride=(322, 322))
    assert cfg.model.decode_head.num_classes == 150
    assert cfg.model.get("auxiliary_head", {}).get("in_index") == aux
    if "1of" in name and not name.endswith("1of1.py"):
        k = int(name.rsplit("1of", 1)[1][:-3])
        assert cfg.train_dataloader.dataset.type == "FewShotADE20KDataset"
        assert cfg.train_dataloader.dataset.subset_divisor == k
    # the same recipe at toy width (64 channels, 48 blocks, random init) builds and gets its optimizer
    m = cfg.model
    m.backbone.update(arch=dict(TINY_ARCH, num_hidden_layers=48), pretrained=None, img_size=56)
    m.data_preprocessor.size = (56, 56)
    m.test_cfg.crop_size, m.test_cfg.stride = (56, 56), (28, 28)
    dh = m.decode_head
    dh.update(in_channels=[64] * 4 if dh.type == "UPerHead" else 64, channels=64 if dh.type != "UPerHead" else 32)
    if "auxiliary_head" in m:
        m.auxiliary_head.update(in_channels=64, channels=16)
    model = build_segmentor(m.to_dict())
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper.to_dict())
    trainable = sum(len(g["params"]) for g in wrapper.optimizer.param_groups)
    assert trainable == sum(p.requires_grad for p in model.parameters())
    if frozen:
        assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if not n.startswith("up"))
