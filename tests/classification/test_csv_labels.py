"""Classification CSVs: an unknown label is an error naming file and line, never an extra class."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from classification.datasets import ImageFolderDataset, make_toy_digits, read_csv


@pytest.fixture()
def digits_like(tmp_path):
    """Ten class folders with one image each, a classes.txt and a good CSV (the toy digits layout)."""
    for c in range(10):
        os.makedirs(tmp_path / "train" / str(c))
        Image.new("RGB", (8, 8), (c * 20, 0, 0)).save(tmp_path / "train" / str(c) / f"{c}.png")
    (tmp_path / "classes.txt").write_text("\n".join(str(c) for c in range(10)) + "\n")
    (tmp_path / "good.csv").write_text("path,label\n" + "".join(f"train/{c}/{c}.png,{c}\n" for c in range(10)))
    return tmp_path


def test_unknown_label_with_classes_file_beside(digits_like):
    """The documented message: ``…/bad.csv:2: unknown label 'zero' (not one of the 10 classes)``."""
    (digits_like / "bad.csv").write_text("path,label\ntrain/0/0.png,zero\ntrain/1/1.png,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: unknown label 'zero' \(not one of the 10 classes"):
        ImageFolderDataset(str(digits_like), ann_file="bad.csv")


def test_unknown_label_among_indices_without_a_class_list(digits_like):
    """The reported case: no class list, labels 0..9 plus a typo used to become an 11th class."""
    os.remove(digits_like / "classes.txt")
    lines = [f"train/{c}/{c}.png,{c}" for c in range(10)]
    lines.insert(3, "train/0/extra.png,zero")  # another file: one file with two labels is refused first
    (digits_like / "bad.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.csv:5: unknown label 'zero' \(the other labels are class indices"):
        ImageFolderDataset(str(digits_like), ann_file="bad.csv")
    ds = ImageFolderDataset(str(digits_like), ann_file="good.csv")
    assert len(ds.classes) == 10 and ds.labels == list(range(10))


def test_index_among_names_and_negative_index(tmp_path):
    (tmp_path / "a.csv").write_text("a.png,cat\nb.png,dog\nc.png,cat\nd.png,3\n")
    with pytest.raises(ValueError, match=r"a\.csv:4: unknown label '3' \(the other labels are class names"):
        read_csv(str(tmp_path / "a.csv"))
    (tmp_path / "n.csv").write_text("a.png,2\nb.png,-1\n")
    with pytest.raises(ValueError, match=r"n\.csv:2: unknown label '-1' \(negative class index\)"):
        read_csv(str(tmp_path / "n.csv"))


def test_label_set_from_classes_file_and_explicit_list(digits_like):
    samples, classes = read_csv(str(digits_like / "good.csv"))
    assert classes == [str(c) for c in range(10)] and [label for _, label in samples] == list(range(10))
    (digits_like / "few.csv").write_text("train/3/3.png,3\ntrain/7/7.png,7\n")
    _, classes = read_csv(str(digits_like / "few.csv"))  # classes.txt keeps all ten, not just 3 and 7
    assert len(classes) == 10
    names = ["cat", "dog"]
    (digits_like / "names.csv").write_text("train/0/0.png,dog\ntrain/1/1.png,1\ntrain/2/2.png,2\n")
    with pytest.raises(ValueError, match=r"names\.csv:3: unknown label '2' \(not one of the 2 classes\)"):
        read_csv(str(digits_like / "names.csv"), classes=names)


def test_names_only_without_a_list_are_the_sorted_names(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\na.png,dog\nb.png,cat\n")
    samples, classes = read_csv(str(tmp_path / "a.csv"))
    assert classes == ["cat", "dog"] and [label for _, label in samples] == [1, 0]


def test_toy_digits_never_replaces_what_it_did_not_make(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        make_toy_digits(str(user), image_size=8)
    assert (user / "precious.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError):
        make_toy_digits(str(tmp_path / "afile"), image_size=8)
    assert (tmp_path / "afile").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    m = make_toy_digits(str(empty), image_size=8)
    assert m["num_train"] + m["num_val"] == 1797 and (empty / "classes.txt").is_file()
