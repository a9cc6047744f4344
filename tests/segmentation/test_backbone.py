"""InternViTBackbone: fidelity to the upstream reference outputs (shared fixtures), loading, pyramid, dtype."""
import os

import pytest
import torch
from safetensors.torch import load_file

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)

from .conftest import TINY_ARCH, build_segmentor, segmentor_cfg

TOL = 1e-4


def _backbone(**kw):
    from mmseg.registry import MODELS


    return MODELS.build(dict(type="InternViTBackbone", **kw))


def _expected_maps(exp, tag, blocks, side):
    """Reference hidden_states after the given blocks, patch tokens as (B, C, h, w) maps."""
    out = []
    for k in blocks:
        h = exp[f"{tag}.hidden_states.{k + 1}"][:, 1:]
        out.append(h.reshape(h.shape[0], side, side, -1).permute(0, 3, 1, 2))
    return out


@pytest.mark.parametrize("weights", ["original_format.pth", "model.safetensors", "."])
def test_outputs_match_reference_native(vit_fixture, weights):
    """Either key family, as pretrained=: block outputs equal the upstream reference's hidden states."""
    exp = load_file(os.path.join(vit_fixture, "expected.safetensors"))
    bb = _backbone(arch=dict(TINY_ARCH), img_size=56, out_indices=[0, 1, 2],
                   pretrained=os.path.normpath(os.path.join(vit_fixture, weights)))
    with torch.no_grad():
        outs = bb(exp["native.pixel_values"])
    for got, want in zip(outs, _expected_maps(exp, "native", [0, 1, 2], 4)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_position_grid_resized_at_load_like_reference(vit_fixture):
    """A 56-px (4x4 grid) original-family checkpoint loaded at img_size=84: the table is resized once to 6x6
    (bicubic, class row kept) and the outputs equal the reference run at 84 px."""
    exp = load_file(os.path.join(vit_fixture, "expected.safetensors"))
    bb = _backbone(arch="internvit-6b-tiny", img_size=84, out_indices=[-1],
                   pretrained=os.path.join(vit_fixture, "original_format.pth"))
    assert bb.embeddings.position_embedding.shape == (1, 37, 64)
    with torch.no_grad():
        (out,) = bb(exp["upscaled.pixel_values"])
    torch.testing.assert_close(out, _expected_maps(exp, "upscaled", [2], 6)[0], atol=TOL, rtol=0)


def test_init_cfg_pretrained_loads_in_place_and_init_weights_keeps_loaded(vit_fixture):
    path = os.path.join(vit_fixture, "original_format.pth")
    a = _backbone(arch=dict(TINY_ARCH), img_size=84, out_indices=[2], pretrained=path)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    a.init_weights()  # mmengine calls this after construction: must not touch loaded weights (pitfall 20)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k
    b = _backbone(arch=dict(TINY_ARCH), img_size=84, out_indices=[2], init_cfg=dict(type="Pretrained", checkpoint=path))
    params = {id(p) for p in b.parameters()}
    assert not torch.equal(b.embeddings.position_embedding, a.embeddings.position_embedding)
    b.init_weights()
    assert {id(p) for p in b.parameters()} == params  # copied in place: an existing optimizer stays valid
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_mismatched_checkpoint_names_the_keys(vit_fixture):
    from internvit import CheckpointError

    arch = dict(TINY_ARCH, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match="encoder.layers.3"):
        _backbone(arch=arch, img_size=56, out_indices=[3], pretrained=os.path.join(vit_fixture, "model.safetensors"))
    with pytest.raises(ValueError, match="4 out_indices"):
        _backbone(arch=dict(TINY_ARCH), out_indices=[0, 1], with_fpn=True)


def test_pyramid_strides_keys_and_freeze():
    bb = _backbone(arch="internvit-6b-tiny", img_size=56, out_indices=[0, 1, 2, 2], with_fpn=True, freeze_vit=True)
    outs = bb(torch.randn(2, 3, 56, 56))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    keys = {k for k in bb.state_dict() if k.startswith("up")}
    assert keys == {"up1.0.weight", "up1.0.bias", "up1.1.weight", "up1.1.bias", "up1.3.weight", "up1.3.bias",
                    "up2.0.weight", "up2.0.bias"}
    for name, p in bb.named_parameters():
        assert p.requires_grad == name.startswith("up"), name
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is None for n, p in bb.named_parameters() if not n.startswith("up"))
    assert bb.up1[0].weight.grad is not None
    with_norm = _backbone(arch="internvit-6b-tiny", img_size=56, out_indices=[0, 1, 2, 2], with_fpn=True,
                          with_final_norm=True)
    assert {"up1.4.weight", "up2.1.weight", "up3.1.weight", "up4.1.bias"} <= set(with_norm.state_dict())


def test_bf16_backbone_fp32_outputs_train_step():
    model = build_segmentor(segmentor_cfg("uper", dtype="bfloat16", with_cp=True, drop_path_rate=0.1))
    assert model.backbone.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.backbone.up1[1].weight.dtype == torch.bfloat16
    assert model.decode_head.conv_seg.weight.dtype == torch.float32
    x = torch.randn(2, 3, 56, 56)
    feats = model.backbone(x)
    assert all(f.dtype == torch.float32 for f in feats)
    ref = build_segmentor(segmentor_cfg("uper"))
    ref.backbone.load_state_dict({k: v.float() for k, v in model.backbone.state_dict().items()})
    ref.eval(), model.eval()
    with torch.no_grad():
        for a, b in zip(model.backbone(x), ref.backbone(x)):
            torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
    model.train()
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(56, 56), ori_shape=(56, 56), pad_shape=(56, 56)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 56, 56)))
        samples.append(s)
    losses = model.loss(x, samples)
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert torch.isfinite(total)
    assert model.backbone.encoder.layers[0].attn.qkv.weight.grad.dtype == torch.bfloat16


def test_slide_inference_non_multiple_of_14():
    model = build_segmentor(segmentor_cfg("uper")).eval()
    from mmseg.structures import SegDataSample

    h, w = 61, 95  # neither a multiple of 14 nor of the 56-px crop: windows of 56x56 plus a 5-px overhang
    s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
    with torch.no_grad():
        (pred,) = model.predict(torch.randn(1, 3, h, w), [s])
    assert pred.seg_logits.data.shape == (5, h, w)
    assert torch.isfinite(pred.seg_logits.data).all()
    assert pred.pred_sem_seg.data.shape == (1, h, w)
    small = SegDataSample(metainfo=dict(img_shape=(45, 50), ori_shape=(45, 50), pad_shape=(45, 50)))
    with torch.no_grad():  # smaller than the crop: one window of a non-multiple-of-14 size
        (pred,) = model.predict(torch.randn(1, 3, 45, 50), [small])
    assert pred.pred_sem_seg.data.shape == (1, 45, 50)


def test_border_pixels_beyond_the_last_whole_patch_are_seen():
    """A side that is not a multiple of 14 is padded, not cropped: changing only the pixels past the last whole
    patch changes the prediction (before, the patch convolution dropped them and the output did not move)."""
    bb = _backbone(arch="internvit-6b-tiny", img_size=56, out_indices=[0, 1, 2, 2], with_fpn=True).eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 50, 73)
    y = x.clone()
    y[..., 42:, :] = torch.randn(1, 3, 8, 73)  # rows 42..49 and columns 70..72: past the last whole patch
    y[..., :, 70:] = torch.randn(1, 3, 50, 3)
    with torch.no_grad():
        a, b = bb(x), bb(y)
    assert [tuple(o.shape[-2:]) for o in a] == [(16, 24), (8, 12), (4, 6), (2, 3)]  # ceil(50/14)=4, ceil(73/14)=6
    assert all((p - q).abs().max() > 1e-3 for p, q in zip(a, b))
    # a multiple of 14 is untouched: the same as padding by hand is not applied
    z = torch.randn(1, 3, 56, 42)
    with torch.no_grad():
        assert torch.equal(bb(z)[2], bb.forward_intermediates(z, indices=[2], intermediates_only=True)[0])
    with pytest.raises(ValueError, match=r"input of 20x60 px is too small: the pyramid needs at least 2 patches"):
        bb(torch.randn(1, 3, 20, 60))
