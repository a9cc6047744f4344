"""The linear head's published keys and math; released mmseg 0.x checkpoints convert and load with equal logits."""
import importlib.util
import os

import pytest
import torch

from .conftest import ROOT, build_segmentor, segmentor_cfg


def test_linear_head_is_bn_then_1x1_with_published_keys():
    model = build_segmentor(segmentor_cfg("linear")).eval()
    head = model.decode_head
    assert set(head.state_dict()) == {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                                      "norm.num_batches_tracked", "conv_seg.weight", "conv_seg.bias"}
    with torch.no_grad():
        head.norm.running_mean.uniform_(-1, 1), head.norm.running_var.uniform_(0.5, 2), head.norm.weight.uniform_()
        x = torch.randn(2, 64, 4, 4)
        bn = (x - head.norm.running_mean[:, None, None]) / torch.sqrt(head.norm.running_var[:, None, None] + 1e-5)
        bn = bn * head.norm.weight[:, None, None] + head.norm.bias[:, None, None]
        want = torch.einsum("bchw,kc->bkhw", bn, head.conv_seg.weight[:, :, 0, 0]) + head.conv_seg.bias[:, None, None]
        torch.testing.assert_close(head([x]), want, atol=1e-5, rtol=1e-5)
    assert head.norm.eps == 1e-5


def _released_style_checkpoint(vit_fixture, donor, path):
    """A flat mmseg 0.x segmentor state dict as InternVL released them: the backbone in the ORIGINAL key family
    (straight from the upstream-produced fixture), pyramid and heads under their 0.x names."""
    orig = torch.load(os.path.join(vit_fixture, "original_format.pth"), weights_only=True)["module"]
    sd = {f"backbone.{k}": v for k, v in orig.items()}
    assert "backbone.blocks.0.ls1.gamma" in sd and "backbone.pos_embed" in sd
    for k, v in donor.state_dict().items():
        if k.startswith(("backbone.up", "decode_head.", "auxiliary_head.")):
            sd[k] = v.clone()
    torch.save(sd, path)  # flat, as segmentation/release.py writes them
    return sd


def _load_convert_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", os.path.join(ROOT, "tools",
                                                                                          "convert_checkpoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("head", ["uper", "linear"])
def test_mmseg0x_checkpoint_converts_and_loads_with_equal_logits(vit_fixture, tmp_path, head):
    from mmengine.runner import load_checkpoint

    from segmentation.convert_0x import convert_mmseg0x

    donor = build_segmentor(segmentor_cfg(head, pretrained=os.path.join(vit_fixture, "model.safetensors"))).eval()
    for m in donor.modules():  # non-trivial BN statistics, so a dropped buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    src, dst = tmp_path / "released.pth", tmp_path / "converted.pth"
    _released_style_checkpoint(vit_fixture, donor, src)
    if head == "uper":
        assert _load_convert_tool().main(["mmseg0x", str(src), str(dst)]) == 0  # the lead's CLI sub-command
    else:
        convert_mmseg0x(src, dst)
    ckpt = torch.load(dst, weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"}
    fresh = build_segmentor(segmentor_cfg(head)).eval()
    assert set(ckpt["state_dict"]) == set(fresh.state_dict())  # no backbone key missing, nothing extra
    load_checkpoint(fresh, str(dst), map_location="cpu", strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(fresh._forward(x), donor._forward(x), atol=1e-5, rtol=0)


def test_convert_rejects_non_segmentor(vit_fixture, tmp_path):
    from internvit import CheckpointError
    from segmentation.convert_0x import convert_mmseg0x

    with pytest.raises(CheckpointError, match="backbone"):
        convert_mmseg0x(os.path.join(vit_fixture, "original_format.pth"), tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "x.pth.tmp").exists()
    with pytest.raises(FileNotFoundError):
        convert_mmseg0x(tmp_path / "missing.pth", tmp_path / "y.pth")


def test_mmseg0x_names_the_backbone_keys_it_leaves_out(vit_fixture, tmp_path):
    """A released segmentor holding keys the 1.x model has no place for (a final norm, a classification head):
    the conversion still fits the model, and the keys it drops are named (before, silently)."""
    from segmentation.convert_0x import convert_mmseg0x

    donor = build_segmentor(segmentor_cfg("linear", pretrained=os.path.join(vit_fixture, "model.safetensors")))
    src, dst = tmp_path / "released.pth", tmp_path / "converted.pth"
    _released_style_checkpoint(vit_fixture, donor, src)
    ckpt = torch.load(src, weights_only=True)
    sd = ckpt.get("state_dict", ckpt)
    sd.update({"backbone.norm.weight": torch.ones(64), "backbone.head.weight": torch.zeros(10, 64)})
    torch.save(ckpt, src)
    with pytest.warns(UserWarning, match=r"left out 2 backbone keys .*backbone.norm.weight, backbone.head.weight"):
        convert_mmseg0x(src, dst)
    assert set(torch.load(dst, weights_only=True)["state_dict"]) == set(build_segmentor(segmentor_cfg("linear"))
                                                                        .state_dict())
    dst.unlink()
    with pytest.warns(UserWarning, match="backbone.norm.weight"):  # the CLI shows it (after a successful write)
        assert _load_convert_tool().main(["mmseg0x", str(src), str(dst)]) == 0
