"""make_toy_seg_dataset never deletes or replaces what it did not create (issue 9 §2)."""
import json
import os

import pytest

from segmentation.toy_data import make_toy_seg_dataset

SMALL = dict(num_train=2, num_val=1)


def _cli(argv):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_toy_seg_dataset.py")
    spec = importlib.util.spec_from_file_location("make_toy_seg_dataset", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_existing_user_folder_is_refused_and_kept(tmp_path, capsys):
    """The reported case: ``make_toy_seg_dataset.py EXISTING_DIR`` deleted the folder and exited 0."""
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    assert _cli([str(user), "--num-train", "2", "--num-val", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--overwrite" in err[0]
    assert sorted(os.listdir(user)) == ["holiday.jpg"] and (user / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["photos"]   # no temporary folder left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        make_toy_seg_dataset(str(tmp_path / "file"), **SMALL)
    assert (tmp_path / "file").read_text() == "x"


def test_own_output_is_kept_other_arguments_need_overwrite(tmp_path):
    root = str(tmp_path / "toy")
    make_toy_seg_dataset(root, **SMALL)
    meta = json.loads(open(os.path.join(root, "meta.json")).read())
    assert meta["generator"] == "internvit toy segmentation"
    stamp = os.stat(os.path.join(root, "images", "training", "toy_0000.png")).st_mtime_ns
    make_toy_seg_dataset(root, **SMALL)   # the same dataset: kept as it is
    assert os.stat(os.path.join(root, "images", "training", "toy_0000.png")).st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other arguments"):
        make_toy_seg_dataset(root, num_train=3, num_val=1)
    make_toy_seg_dataset(root, num_train=3, num_val=1, overwrite=True)
    assert len(os.listdir(os.path.join(root, "images", "training"))) == 3


def test_empty_folder_and_overwrite(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    make_toy_seg_dataset(str(empty), **SMALL)
    assert (empty / "meta.json").is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "x.txt").write_text("x")
    assert _cli([str(user), "--num-train", "2", "--num-val", "1", "--overwrite"]) == 0
    assert not (user / "x.txt").exists() and (user / "meta.json").is_file()


@pytest.mark.parametrize("argv", [["--num-train", "0"], ["--num-val", "-1"], ["--seed", "x"]])
def test_bad_numbers_exit_2(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        _cli([str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
