"""Classification data integrity: a stale feature cache, integer class names, empty classes, a toy split that
leaves a class out, and top-k / mean_recall that cannot mean what their names say. Each is detected, refused
or reported, never passed on as a number."""
from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from classification.datasets import ImageFolderDataset, make_toy_digits, read_csv
from classification.feature_cache import CachedFeatureDataset, cache_key
from classification.metrics import Accuracy
from internvit.cli import run

from .conftest import ROOT, TOY_CONFIGS

TINY = "internvit-6b-tiny"


def _bmp(path, seed: int) -> None:
    """An 8x8 RGB BMP: every such file has the same size, whatever its pixels."""
    pixels = np.random.RandomState(seed).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="BMP")


@pytest.fixture()
def tree(tmp_path):
    """``data/train/<a|b>/<i>.bmp``: two classes of three same-size images."""
    for c, name in enumerate("ab"):
        os.makedirs(tmp_path / "data" / "train" / name)
        for i in range(3):
            _bmp(tmp_path / "data" / "train" / name / f"{i}.bmp", seed=10 * c + i)
    return tmp_path / "data"


# ---------------------------------------------------------------------------------------------------
# 1. The feature cache follows the images' contents, not only their paths
# ---------------------------------------------------------------------------------------------------
def test_an_image_rewritten_in_place_is_extracted_again(tree, tmp_path):
    images = ImageFolderDataset(str(tree), split="train", transform=dict(image_size=28))
    cache = str(tmp_path / "cache")
    first = CachedFeatureDataset(images, dict(arch=TINY), cache, progress=False)
    before = np.asarray(first.features).copy()
    assert first.extracted
    assert not CachedFeatureDataset(images, dict(arch=TINY), cache, progress=False).extracted  # nothing changed

    target = tree / "train" / "a" / "1.bmp"
    size, mtime = os.path.getsize(target), os.stat(target).st_mtime_ns
    _bmp(target, seed=99)  # other pixels, same path, same size: only the bytes and the mtime differ
    assert os.path.getsize(target) == size and os.stat(target).st_mtime_ns != mtime

    again = CachedFeatureDataset(images, dict(arch=TINY), cache, progress=False)
    assert again.extracted  # the stale features were not reused
    after = np.asarray(again.features)
    row = images.paths.index(str(target))
    assert not np.array_equal(after[row], before[row])
    others = [i for i in range(len(images)) if i != row]
    np.testing.assert_array_equal(after[others], before[others])
    fresh = CachedFeatureDataset(images, dict(arch=TINY), str(tmp_path / "fresh"), progress=False)
    np.testing.assert_array_equal(np.asarray(fresh.features), after)


def test_weights_rewritten_within_the_same_second_change_the_key(tree, tmp_path):
    """The weight stamp has nanoseconds: a same-size file rewritten within one second is another backbone."""
    images = ImageFolderDataset(str(tree), split="train", transform=dict(image_size=28))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"A" * 64)
    os.utime(weights, ns=(1_700_000_000_000_000_100, 1_700_000_000_000_000_100))
    spec = dict(arch=TINY, pretrained=str(weights))
    key = cache_key(spec, "cls_mean", images)
    weights.write_bytes(b"B" * 64)
    os.utime(weights, ns=(1_700_000_000_000_000_200, 1_700_000_000_000_000_200))
    assert cache_key(spec, "cls_mean", images) != key


def test_cache_key_names_a_missing_image(tree):
    images = ImageFolderDataset(str(tree), split="train", transform=dict(image_size=28))
    gone = tree / "train" / "b" / "2.bmp"
    os.remove(gone)
    with pytest.raises(FileNotFoundError, match=rf"{gone}: image listed in the dataset not found"):
        cache_key(dict(arch=TINY, pretrained=None), "cls_mean", images)


# ---------------------------------------------------------------------------------------------------
# 2. Integer class names: a label is a name, never an index
# ---------------------------------------------------------------------------------------------------
def test_integer_class_names_never_take_a_label_as_an_index(tmp_path):
    (tmp_path / "classes.txt").write_text("3\n5\n7\n")
    (tmp_path / "train.csv").write_text("path,label\na.png,3\nb.png,5\nc.png,7\nd.png,1\ne.png,0\n")
    with pytest.raises(ValueError, match=r"train\.csv:5: unknown label '1' \(not one of the 3 classes listed in "
                                         r".*classes\.txt; the class names are integers"):
        read_csv(str(tmp_path / "train.csv"))
    (tmp_path / "train.csv").write_text("path,label\ne.png,0\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: unknown label '0'"):
        read_csv(str(tmp_path / "train.csv"))
    with pytest.raises(ValueError, match=r"train\.csv:2: unknown label '0'"):
        read_csv(str(tmp_path / "train.csv"), classes=["cat", "7"])  # one integer name is enough
    (tmp_path / "train.csv").write_text("path,label\na.png,7\nb.png,3\nc.png,5\n")
    samples, classes = read_csv(str(tmp_path / "train.csv"))
    assert classes == ["3", "5", "7"] and [label for _, label in samples] == [2, 0, 1]  # by name


def test_indices_stay_indices_where_unambiguous(tmp_path):
    """The documented behaviour kept: indices into a list of non-integer names; a CSV of indices alone."""
    (tmp_path / "a.csv").write_text("a.png,1\nb.png,cat\n")
    samples, _ = read_csv(str(tmp_path / "a.csv"), classes=["cat", "dog"])
    assert [label for _, label in samples] == [1, 0]
    (tmp_path / "i.csv").write_text("a.png,2\nb.png,0\n")
    samples, classes = read_csv(str(tmp_path / "i.csv"))
    assert classes == ["0", "1", "2"] and [label for _, label in samples] == [2, 0]


# ---------------------------------------------------------------------------------------------------
# 3. Classes without a sample
# ---------------------------------------------------------------------------------------------------
def test_an_empty_class_folder_is_refused_unless_allowed(tree):
    os.makedirs(tree / "train" / "c")
    (tree / "train" / "c" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"train: no images for class 'c' \(empty class folder; 3 classes\).*"
                                         r"allow_empty=True"):
        ImageFolderDataset(str(tree), split="train")
    with pytest.warns(UserWarning, match=r"train: no samples of class 'c' \(6 samples in 2 of 3 classes\)") as w:
        ds = ImageFolderDataset(str(tree), split="train", allow_empty=True)
    assert len([x for x in w if "no samples" in str(x.message)]) == 1
    assert ds.classes == ["a", "b", "c"] and ds.class_counts == {"a": 3, "b": 3, "c": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete split: no warning
        os.remove(tree / "train" / "c" / "notes.txt")
        os.rmdir(tree / "train" / "c")
        assert ImageFolderDataset(str(tree), split="train").class_counts == {"a": 3, "b": 3}


def test_a_csv_class_without_rows_is_named_in_a_warning(tree):
    (tree / "few.csv").write_text("train/a/0.bmp,a\ntrain/a/1.bmp,a\n")
    with pytest.warns(UserWarning, match=r"few\.csv: no samples of classes 'b', 'c' \(2 samples in 1 of 3"):
        ds = ImageFolderDataset(str(tree), ann_file="few.csv", classes=["a", "b", "c"])
    assert ds.class_counts == {"a": 2, "b": 0, "c": 0}


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_with_an_empty_class_folder_is_one_error_line(tree, tmp_path, capsys):
    """The newcomer's case through tools/train.py: ``train/c/`` empty stops at set-up, nothing trained."""
    for split in ("train", "val"):
        for name in "abc":
            os.makedirs(tree / split / name, exist_ok=True)
            if name != "c" or split == "val":
                _bmp(tree / split / name / "0.bmp", seed=ord(name))
    roots = [f"{s}_dataloader.dataset.data_root={tree}" for s in ("train", "val", "test")]
    work = tmp_path / "work"
    rc = run(_tool("train").main, [os.path.join(TOY_CONFIGS, "digits_linear_probe.py"), "--work-dir", str(work),
                                   "--cfg-options", *roots, "model.head.num_classes=3", "train_cfg.max_epochs=1",
                                   "train_dataloader.batch_size=2", "val_dataloader.batch_size=2",
                                   "test_dataloader.batch_size=2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {tree / 'train'}: no images for class 'c' (empty class folder")
    assert not work.exists()


def test_cached_probe_refuses_a_bad_val_split_before_extracting_train_features(tree, tmp_path, capsys):
    """The cached probe config built (and extracted) the train split's features, then refused the val split's
    empty class folder: every split's source is now checked first (``CachedFeatureDataset.precheck``), so the
    error comes before any extraction and no cache folder is made."""
    for split in ("train", "val"):
        for name in "abc":
            os.makedirs(tree / split / name, exist_ok=True)
            if name != "c" or split == "train":
                _bmp(tree / split / name / "0.bmp", seed=ord(name))
    cache = tmp_path / "cache"
    opts = [*(f"{s}_dataloader.dataset.dataset.data_root={tree}" for s in ("train", "val", "test")),
            f"train_dataloader.dataset.cache_dir={cache}/train", f"val_dataloader.dataset.cache_dir={cache}/val",
            f"test_dataloader.dataset.cache_dir={cache}/val", "model.head.num_classes=3", "train_cfg.max_epochs=1",
            "train_dataloader.batch_size=2", "val_dataloader.batch_size=2", "test_dataloader.batch_size=2"]
    work = tmp_path / "work"
    rc = run(_tool("train").main, [os.path.join(TOY_CONFIGS, "digits_linear_probe_cached.py"), "--work-dir",
                                   str(work), "--cfg-options", *opts])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {tree / 'val'}: no images for class 'c' (empty class folder")
    assert not cache.exists() and not work.exists()


# ---------------------------------------------------------------------------------------------------
# 4. The toy set never leaves a class out of a split
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction,message", [
    (0.001, "leaves the val split empty: 1797 train / 0 val images"),
    (0.999, "leaves the train split empty: 0 train / 1797 val images"),
    (0.0028, "leaves 3 classes without a val image: 1790 train / 7 val images (no val image of class 0, 2, 8)"),
])
def test_toy_val_fraction_that_empties_a_split_is_refused(tmp_path, fraction, message):
    out = tmp_path / "toy"
    with pytest.raises(ValueError) as e:
        make_toy_digits(str(out), image_size=8, val_fraction=fraction)
    assert f"val_fraction {fraction} (--val-fraction) {message}" in str(e.value)
    assert "use a value between 0.003 and 0.997" in str(e.value)
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary sibling


def test_toy_bounds_named_in_the_error_are_accepted(tmp_path):
    m = make_toy_digits(str(tmp_path / "lo"), image_size=8, val_fraction=0.003)
    assert (m["num_train"], m["num_val"]) == (1787, 10)
    ds = ImageFolderDataset(str(tmp_path / "lo"), split="val")  # every class folder has an image
    assert set(ds.class_counts.values()) == {1}


# ---------------------------------------------------------------------------------------------------
# 5. Accuracy: topk checked when built; no top-k for more classes than exist; mean_recall names absent classes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [0, (1, 0), (), -5, 1.5, True, "5", (1, "5")])
def test_a_bad_topk_is_refused_when_the_metric_is_built(topk):
    with pytest.raises(ValueError, match=r"Accuracy: topk must be a positive integer .*got"):
        Accuracy(topk=topk)


def test_topk_build_through_the_registry_names_topk():
    from mmengine.registry import METRICS

    with pytest.raises(ValueError, match="topk"):
        METRICS.build(dict(type="classification.Accuracy", topk=0))


def _scores(n: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [dict(pred_score=torch.rand(num_classes, generator=g), gt_label=i % num_classes) for i in range(n)]


def test_top5_of_three_classes_is_not_reported_as_100():
    metric = Accuracy(topk=(1, 5), mean_recall=True)
    with pytest.warns(UserWarning, match=r"topk=\(1, 5\) but the dataset has 3 classes: top5 would be 100"):
        metric.dataset_meta = dict(classes=("a", "b", "c"))
    metric.process(None, _scores(12, 3))
    out = metric.evaluate(12)
    assert "accuracy/top5" not in out and set(out) == {"accuracy/top1", "accuracy/mean_recall"}
    bare = Accuracy(topk=(1, 3, 5))  # no dataset_meta: the scores themselves tell the class count
    bare.process(None, _scores(12, 3))
    with pytest.warns(UserWarning, match=r"topk=\(1, 3, 5\) but the model scores 3 classes: top3, top5 would"):
        out = bare.evaluate(12)
    assert set(out) == {"accuracy/top1"}  # top-3 of 3 classes is a hit for every sample too


def test_top5_of_five_classes_is_not_reported_as_100():
    """The newcomer's case: random scores over exactly 5 classes gave ``top5: 100.0`` (top-C counts every sample
    as a hit, as top-k above C does); 6 classes report it."""
    metric = Accuracy(topk=(1, 5))
    metric.process(None, _scores(50, 5))
    with pytest.warns(UserWarning, match=r"but the model scores 5 classes: top5 would be 100"):
        out = metric.evaluate(50)
    assert set(out) == {"accuracy/top1"}
    metric = Accuracy(topk=(1, 5))
    metric.process(None, _scores(50, 6))
    out = metric.evaluate(50)
    assert set(out) == {"accuracy/top1", "accuracy/top5"} and out["accuracy/top5"] < 100.0


def test_mean_recall_names_classes_without_samples():
    metric = Accuracy(topk=1, mean_recall=True)
    metric.dataset_meta = dict(classes=("a", "b", "c", "d"))
    samples = [s for s in _scores(12, 4) if s["gt_label"] != 2]
    metric.process(None, samples)
    with pytest.warns(UserWarning, match=r"mean_recall averages over the 3 of 4 classes that have samples here "
                                         r"\(none of 'c'\)"):
        metric.evaluate(len(samples))
