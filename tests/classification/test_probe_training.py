"""Toy probe training with mmengine's Runner: on the fly and on cached features, checkpoints, tools/*.py.

The data are scikit-learn's digits (10 classes, chance = 10 % top-1); the backbone is the toy configs' tiny
frozen InternViT with fixed random weights.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from mmengine.runner import Runner

from .conftest import ROOT, TOY_CONFIGS, toy_config

CHANCE = 10.0


def _train(cfg):
    """Train; return the runner, the metrics of the trained (EMA) weights on val, and the training time."""
    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - start
    # val_loop swaps the EMA weights in, as the final validation of train() did (runner.test() after train()
    # would rebuild the EMA copy from the raw weights: mmengine's EMAHook.before_run)
    return runner, runner.val_loop.run(), seconds


def test_linear_probe_on_the_fly_and_cached(toy_digits, tmp_path):
    fly_runner, fly, fly_s = _train(toy_config("digits_linear_probe.py", toy_digits, str(tmp_path / "fly")))
    cached_cfg = toy_config("digits_linear_probe_cached.py", toy_digits, str(tmp_path / "cached"))
    _, cached, cached_s = _train(cached_cfg)
    warm_runner, warm, warm_s = _train(cached_cfg)  # a second run finds the features already cached
    assert not warm_runner.train_dataloader.dataset.extracted

    print(f"\nlinear probe, 10 epochs: on the fly {fly_s:.2f} s, cached {cached_s:.2f} s incl. extraction "
          f"({fly_s / cached_s:.1f}x faster), warm cache {warm_s:.2f} s ({fly_s / warm_s:.1f}x faster); "
          f"top-1 {fly['accuracy/top1']:.2f} / {cached['accuracy/top1']:.2f} %")
    assert fly["accuracy/top1"] > 7 * CHANCE and cached["accuracy/top1"] > 7 * CHANCE
    assert abs(fly["accuracy/top1"] - cached["accuracy/top1"]) <= 2.0
    assert warm == cached

    # the checkpoint holds the EMA weights: a fresh runner's test reproduces the validated metrics
    ckpt = os.path.join(str(tmp_path / "fly"), "epoch_10.pth")
    reload_cfg = toy_config("digits_linear_probe.py", toy_digits, str(tmp_path / "reload"), load_from=ckpt)
    from internvit import compat

    with compat.safe_checkpoint_loading():  # a Runner checkpoint (message hub, numpy values): read without code
        assert Runner.from_cfg(reload_cfg).test() == fly
    assert fly_runner.model.backbone is not None and not fly_runner.model.backbone.training


def test_attention_pooling_probe_cached(toy_digits, tmp_path):
    cfg = toy_config("digits_attn_pool_cached.py", toy_digits, str(tmp_path))
    runner, metrics, _ = _train(cfg)
    assert runner.train_dataloader.dataset.features.shape[1:] == (17, 64)  # class token + 4x4 patch tokens
    assert metrics["accuracy/top1"] > 7 * CHANCE


@pytest.mark.parametrize("head,feature", [("AttentionPoolingHead", "tokens"), ("ClsPatchConcatHead", "cls_mean")])
def test_cached_features_give_the_on_the_fly_logits(toy_digits, tmp_path, head, feature):
    """Same head weights: the model on images and the model on the cached features agree, row by row."""
    import torch

    from classification import CachedFeatureDataset, ImageFolderDataset, InternViTClassifier

    backbone = toy_config("digits_linear_probe.py", toy_digits, str(tmp_path)).backbone.to_dict()
    images = ImageFolderDataset(toy_digits, split="val", transform=dict(image_size=56))
    cached = CachedFeatureDataset(images, backbone, str(tmp_path / "cache"), feature=feature, progress=False)
    fly = InternViTClassifier(backbone, dict(type=head, num_classes=10)).eval()
    on_features = InternViTClassifier(backbone, dict(type=head, num_classes=10), from_features=True).eval()
    on_features.head.load_state_dict(fly.head.state_dict())
    rows = range(0, len(images), 7)
    x = torch.stack([images[i]["inputs"] for i in rows])
    f = torch.stack([cached[i]["inputs"] for i in rows])
    assert [cached[i]["data_samples"]["gt_label"] for i in rows] == [images.labels[i] for i in rows]
    with torch.no_grad():
        torch.testing.assert_close(on_features(f), fly(x), rtol=0, atol=1e-5)

    # another backbone invalidates the cache; a folder that is not a cache is never overwritten
    other = CachedFeatureDataset(images, dict(backbone, init_seed=1), str(tmp_path / "cache"), feature=feature,
                                 progress=False)
    assert other.extracted and not np.array_equal(np.asarray(other.features), np.asarray(cached.features))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a probe feature cache"):
        CachedFeatureDataset(images, backbone, str(tmp_path / "mine"), feature=feature, progress=False)


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "tools", "train.py")), reason="tools/train.py absent")
def test_tools_train_cached_then_test_on_the_fly_with_a_pretrained_backbone(toy_digits, capsys):
    """Train the head on cached features of a pretrained backbone file with ``tools/train.py``; the head-only
    checkpoint then evaluates on the fly (full model) with ``tools/test.py`` to the same accuracy."""
    # a short folder: the tools log the yapf-formatted config, which takes seconds with long paths in it
    with tempfile.TemporaryDirectory(prefix="cls") as tmp:
        _tools_round_trip(toy_digits, pathlib.Path(tmp), capsys)


def _tools_round_trip(toy_digits, tmp_path, capsys):
    import internvit
    from classification.probes import build_backbone

    pretrained = str(tmp_path / "vit")
    arch = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=3, image_size=56,
                initializer_factor=1.0, initializer_range=0.1)
    internvit.save_model(build_backbone(dict(arch=arch, init_seed=1)), pretrained)
    bb = dict(arch=arch, pretrained=pretrained)
    work = tmp_path / "work"
    config = tmp_path / "cached.py"
    config.write_text(
        f"_base_ = [{os.path.join(TOY_CONFIGS, 'digits_linear_probe_cached.py')!r}]\n"
        f"bb = {bb!r}\n"
        "model = dict(backbone=bb)\n"
        + "".join(f"{k}_dataloader = dict(dataset=dict(backbone=bb, cache_dir={str(work / 'cache' / s)!r}, "
                  f"dataset=dict(data_root={toy_digits!r})))\n"
                  for k, s in (("train", "train"), ("val", "val"), ("test", "val"))))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), str(config), "--work-dir",
                           str(work), "--cfg-options", "log_level=WARNING"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = str(work / "epoch_10.pth")
    from internvit.compat import load_runner_checkpoint

    saved = load_runner_checkpoint(ckpt, "cpu")["state_dict"]
    assert saved and all(k.startswith("head.") for k in saved)  # the frozen pretrained backbone is not saved

    test = _tool("test")
    assert test.main([str(config), ckpt, "--work-dir", str(tmp_path / "t1")]) == 0
    cached = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert test.main([os.path.join(TOY_CONFIGS, "digits_linear_probe.py"), ckpt, "--work-dir", str(tmp_path / "t2"),
                      "--cfg-options", f"model.backbone.pretrained={pretrained}",
                      f"test_dataloader.dataset.data_root={toy_digits}"]) == 0
    fly = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cached["accuracy/top1"] > 7 * CHANCE
    assert fly["accuracy/top1"] == pytest.approx(cached["accuracy/top1"], abs=0.6)  # at most 2 of 359 images
    assert test.main([str(config), str(tmp_path / "none.pth")]) == 2
