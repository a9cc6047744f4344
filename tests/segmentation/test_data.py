"""Test-time SETR resize, reproducible few-shot subsets, deterministic toy data (the hook runs in a real Runner
in test_toy_training.py)."""
import os

import numpy as np
import pytest

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)


def test_setr_resize_short_side_then_multiple_of_14():
    from segmentation.transforms import SETRResize

    t = SETRResize(short_side=504, size_divisor=14)
    # 333x500: short side -> 504, long side round(500 * 504 / 333) = 757, then up to a multiple of 14 -> 770
    out = t(dict(img=np.zeros((333, 500, 3), np.uint8), seg_fields=[]))
    assert out["img"].shape == (504, 770, 3) and out["img_shape"] == (504, 770)
    assert out["scale_factor"] == pytest.approx((770 / 500, 504 / 333))
    # portrait, upscale-free long side: 700x400 -> 882x504 (882 = 63 * 14 already)
    out = t(dict(img=np.zeros((700, 400, 3), np.uint8), seg_fields=[]))
    assert out["img"].shape[:2] == (882, 504)
    # no size_divisor: only the proportional resize; label maps use nearest (values stay in the label set)
    seg = np.random.default_rng(0).integers(0, 3, (100, 150)).astype(np.uint8)
    out = SETRResize(short_side=56, size_divisor=None)(dict(img=np.zeros((100, 150, 3), np.uint8),
                                                            gt_seg_map=seg, seg_fields=["gt_seg_map"]))
    assert out["img"].shape[:2] == (56, 84) and out["gt_seg_map"].shape == (56, 84)
    assert set(np.unique(out["gt_seg_map"])) <= {0, 1, 2}


def test_toy_dataset_is_deterministic(tmp_path):
    from segmentation.toy_data import make_toy_seg_dataset

    a = make_toy_seg_dataset(str(tmp_path / "a"), num_train=3, num_val=2, seed=5)
    b = make_toy_seg_dataset(str(tmp_path / "b"), num_train=3, num_val=2, seed=5)
    for sub in ("images/training/toy_0002.png", "annotations/validation/toy_0001.png"):
        with open(os.path.join(a, sub), "rb") as fa, open(os.path.join(b, sub), "rb") as fb:
            assert fa.read() == fb.read()
    from PIL import Image

    label = np.array(Image.open(os.path.join(a, "annotations/validation/toy_0000.png")))
    assert label.shape == (120, 150) and set(np.unique(label)) <= {0, 1, 2, 3} and len(np.unique(label)) > 1


def _few_shot(root, **kw):
    from mmseg.registry import DATASETS


    return DATASETS.build(dict(
        type="FewShotSegDataset", data_root=root, img_suffix=".png", seg_map_suffix=".png",
        metainfo=dict(classes=("background", "disc", "square", "triangle")), pipeline=[],
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"), **kw))


def test_few_shot_subset_seeded_recorded_and_reproducible(toy_data, tmp_path):
    full = _few_shot(toy_data)
    a, a2 = _few_shot(toy_data, subset_divisor=8, subset_seed=1), _few_shot(toy_data, subset_divisor=8, subset_seed=1)
    b = _few_shot(toy_data, subset_divisor=8, subset_seed=2)
    assert len(full) == 48 and len(a) == 6 and a.subset_files == a2.subset_files != b.subset_files
    assert set(a.subset_files) <= set(full.subset_files)

    (tmp_path / "list.txt").write_text("\n".join(a.subset_files) + "\n")  # as SaveSubsetListHook writes it
    again = _few_shot(toy_data, subset_file=str(tmp_path / "list.txt"))
    assert [d["img_path"] for d in again.data_list] == [d["img_path"] for d in a.data_list]
    (tmp_path / "bad.txt").write_text("toy_9999.png\n")
    with pytest.raises(FileNotFoundError, match="toy_9999"):
        _few_shot(toy_data, subset_file=str(tmp_path / "bad.txt"))


def test_labels_the_metric_would_miscount_are_refused(tmp_path):
    """mmseg's IoUMetric silently leaves label values >= num_classes out of every class's areas (a metric on
    fewer pixels than the data has) and fails on a size mismatch deep in the test loop: the toy and ADE20K
    pipelines check each map right after loading it, naming the file."""
    from mmengine.config import Config
    from mmseg.registry import DATASETS
    from PIL import Image

    from segmentation.toy_data import make_toy_seg_dataset

    root = make_toy_seg_dataset(str(tmp_path / "toy"), num_train=1, num_val=2, seed=1)
    cfg = Config.fromfile(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy",
                                       "upernet_internvit_tiny_toy.py"))
    assert any(t["type"] == "CheckSegLabels" for t in cfg.test_pipeline)
    ds_cfg = dict(cfg.test_dataloader.dataset, data_root=root)
    ann = os.path.join(root, "annotations", "validation")
    first, second = sorted(os.listdir(ann))[:2]
    assert len(DATASETS.build(ds_cfg)[0]["data_samples"].gt_sem_seg.data.shape) == 3  # the data as made loads
    label = np.array(Image.open(os.path.join(ann, first)))
    label[0, :3] = [7, 255, 9]  # 255 is the ignore index: allowed; 7 and 9 are no class of 4
    Image.fromarray(label).save(os.path.join(ann, first))
    with pytest.raises(ValueError, match=rf"{first}: label values \[7, 9\] are neither classes 0..3"):
        DATASETS.build(ds_cfg)[0]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(os.path.join(ann, second))
    with pytest.raises(ValueError, match=rf"{second}: 10x12 label map for a 120x150 image"):
        DATASETS.build(ds_cfg)[1]
    # a 16-bit map (257 was cast to 1 and scored as class 1) and multi-channel maps (RGB, LA: the metric failed)
    good = np.zeros((120, 150), np.uint8)
    good[:10] = 2
    Image.fromarray(good).save(os.path.join(ann, second))
    assert DATASETS.build(ds_cfg)[1] is not None
    wide = good.astype(np.uint16)
    wide[0, 0] = 257
    for _kind, im in (("16-bit", Image.fromarray(wide)), ("RGB", Image.fromarray(np.stack([good] * 3, -1))),
                     ("LA", Image.fromarray(good).convert("LA"))):
        im.save(os.path.join(ann, second))
        with pytest.raises(ValueError, match=rf"{second}: a label map must be one 8-bit channel.*mode '{im.mode}'"):
            DATASETS.build(ds_cfg)[1]
    for name in ("ade20k_504x504.py", "ade20k_504x504_few_shot.py"):
        ade = Config.fromfile(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "segmentation",
                                           "_base_", "datasets", name))
        assert dict(type="CheckSegLabels", num_classes=150) in [dict(t) for t in ade.test_pipeline]
