"""Shared helpers for the segmentation tests: tiny segmentors built from plain config dicts."""
import copy
import os

import pytest
from mmengine.registry import DefaultScope

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_UPER = os.path.join(ROOT, "configs", "toy", "upernet_internvit_tiny_toy.py")
TOY_LINEAR = os.path.join(ROOT, "configs", "toy", "linear_internvit_tiny_toy.py")

#: the architecture of the shared fixture internvit-6b-style-tiny, in the config vocabulary
TINY_ARCH = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=3, patch_size=14,
                 qkv_bias=False, qk_normalization=True, norm_type="rms_norm")


@pytest.fixture(autouse=True)
def _mmseg_scope():
    """Build in the mmseg scope, whatever scope an earlier Runner (e.g. a classification test) left current."""
    with DefaultScope.overwrite_default_scope("mmseg"):
        yield


def segmentor_cfg(head: str = "uper", img_size: int = 56, **backbone) -> dict:
    """A tiny EncoderDecoder config dict (BN instead of SyncBN: CPU, one process)."""
    bn = dict(type="BN", requires_grad=True)
    bb = dict(type="InternViTBackbone", arch=copy.deepcopy(TINY_ARCH), img_size=img_size)
    if head == "uper":
        bb.update(out_indices=[0, 1, 1, 2], with_fpn=True)
        heads = dict(
            decode_head=dict(type="UPerHead", in_channels=[64] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2),
                             channels=32, dropout_ratio=0.0, num_classes=5, norm_cfg=bn, align_corners=False),
            auxiliary_head=dict(type="InternViTFCNHead", in_channels=64, in_index=2, channels=16, num_convs=1,
                                concat_input=False, dropout_ratio=0.0, num_classes=5, norm_cfg=bn,
                                loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4)))
    else:
        bb.update(out_indices=[2])
        heads = dict(decode_head=dict(type="InternViTFCNHead", in_channels=64, channels=64, num_convs=0,
                                      concat_input=False, dropout_ratio=0.0, num_classes=5, with_norm=True,
                                      feat_norm_cfg=bn))
    bb.update(backbone)
    return dict(type="EncoderDecoder",
                data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                                       std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0, seg_pad_val=255),
                backbone=bb, **heads,
                test_cfg=dict(mode="slide", crop_size=(img_size, img_size), stride=(28, 28)))


def build_segmentor(cfg: dict):
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules


    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(ConfigDict(cfg))
    model.init_weights()
    return model


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A small toy dataset (deterministic), shared by the training tests."""
    from segmentation.toy_data import make_toy_seg_dataset

    return make_toy_seg_dataset(str(tmp_path_factory.mktemp("toy") / "toy_seg"), num_train=48, num_val=8)


def toy_options(root: str, work_dir: str, **extra) -> dict:
    """``--cfg-options`` that point a toy config at ``root`` and keep the run short and quiet."""
    opts = {f"{split}_dataloader.dataset.data_root": root for split in ("train", "val", "test")}
    opts.update({"default_hooks.logger.interval": 10, "default_hooks.visualization.draw": False})
    opts.update(extra)
    return opts
