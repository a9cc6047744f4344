"""Findings of newcomer trial 7b (segmentation metrics): a misspelt ``iou_metrics`` failed after the whole test set
(or the first training interval) with a traceback; a split with no labelled pixel printed ``mIoU: NaN`` (not
JSON) and exited 0; with ``reduce_zero_label`` a bad label was named by its reduced value."""
import importlib.util
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)

from .conftest import ROOT, TOY_LINEAR, toy_options


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}_7b", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    from internvit.runner import train
    from segmentation.toy_data import make_toy_seg_dataset

    data = make_toy_seg_dataset(str(tmp_path_factory.mktemp("toy7b") / "toy_seg"), num_train=4, num_val=3)
    work_dir = str(tmp_path_factory.mktemp("lin7b"))
    train(TOY_LINEAR, work_dir=work_dir, cfg_options=toy_options(data, work_dir, **{
        "train_cfg.max_iters": 2, "train_cfg.val_interval": 1000, "default_hooks.checkpoint.interval": 2}))
    return data, os.path.join(work_dir, "iter_2.pth")


def _run(capsys, tool: str, argv: list) -> tuple[int, list]:
    capsys.readouterr()
    try:
        rc = _tool(tool).main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-1500:]
    return rc, [line for line in err.splitlines() if line.startswith("error: ")]


def _options(data: str, **extra) -> list:
    opts = {f"{s}_dataloader.dataset.data_root": data for s in ("train", "val", "test")}
    opts.update({"default_hooks.logger.interval": 10, "default_hooks.visualization.draw": False}, **extra)
    return ["--cfg-options", *[f"{k}={v}" for k, v in opts.items()]]


# ------------------------------------------------------------------------------------------------ B1
def test_a_misspelt_iou_metric_is_refused_before_testing(linear_run, tmp_path, capsys):
    data, ckpt = linear_run
    work = tmp_path / "t"
    rc, errors = _run(capsys, "test", [TOY_LINEAR, ckpt, "--work-dir", work,
                                       *_options(data, **{"test_evaluator.iou_metrics": "[mFoo]"})])
    assert rc == 2 and errors == ["error: test_evaluator.iou_metrics: 'mFoo' is not one of mIoU, mDice, mFscore"]
    assert not os.path.exists(work)  # nothing written: refused at set-up


def test_a_misspelt_iou_metric_is_refused_before_training(linear_run, tmp_path, capsys):
    data, _ = linear_run
    work = tmp_path / "w"
    rc, errors = _run(capsys, "train", [TOY_LINEAR, "--work-dir", work, *_options(data, **{
        "val_evaluator.iou_metrics": "[mIoU,mDcie]", "train_cfg.max_iters": 2, "train_cfg.val_interval": 2})])
    assert rc == 2 and errors == ["error: val_evaluator.iou_metrics: 'mDcie' is not one of mIoU, mDice, mFscore"]
    assert not os.path.exists(work) or not [n for n in os.listdir(work) if n.endswith(".pth")]


# ------------------------------------------------------------------------------------------------ B2
def test_a_split_without_labelled_pixels_has_no_miou(linear_run, tmp_path, capsys):
    data, ckpt = linear_run
    ignored = str(tmp_path / "ignored")
    shutil.copytree(data, ignored)
    folder = os.path.join(ignored, "annotations", "validation")
    for name in os.listdir(folder):
        label = np.array(Image.open(os.path.join(folder, name)))
        Image.fromarray(np.full_like(label, 255)).save(os.path.join(folder, name))
    rc, errors = _run(capsys, "test", [TOY_LINEAR, ckpt, "--work-dir", tmp_path / "t", *_options(ignored)])
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: test: aAcc=nan, mIoU=nan") and "undefined over this split" in errors[0]


# ------------------------------------------------------------------------------------------------ B3
def test_reduce_zero_label_errors_name_the_files_values(linear_run, tmp_path, capsys):
    data, ckpt = linear_run
    ade = str(tmp_path / "ade")
    shutil.copytree(data, ade)
    folder = os.path.join(ade, "annotations", "validation")
    names = sorted(os.listdir(folder))
    for name in names:  # ADE-style labels: 0 is "other" (ignored), classes 1..4
        label = np.array(Image.open(os.path.join(folder, name))).astype(np.int64)
        label = np.where(label == 255, 255, label + 1)
        if name == names[1]:
            label[0, 0] = 5  # the one bad value in the file
        Image.fromarray(label.astype(np.uint8)).save(os.path.join(folder, name))
    rc, errors = _run(capsys, "test", [TOY_LINEAR, ckpt, "--work-dir", tmp_path / "t", *_options(ade, **{
        "test_dataloader.dataset.reduce_zero_label": True})])
    assert rc == 2 and len(errors) == 1, errors
    assert f"{names[1]}: label values [5] are neither classes 1..4 (reduce_zero_label" in errors[0], errors
