import os

import numpy as np
import pytest

from internvit.fileio import atomic_write


def test_replaces_existing_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_write(target) as tmp:
        # in a hidden temporary folder beside the target, under the target's own name
        tmp_dir = os.path.dirname(tmp)
        assert os.path.dirname(tmp_dir) == str(tmp_path) and os.path.basename(tmp_dir).startswith(".out.json.")
        assert os.path.basename(tmp) == "out.json" and tmp != str(target)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_creates_missing_parent(tmp_path):
    target = tmp_path / "a" / "b" / "x.txt"
    with atomic_write(str(target)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("hi")
    assert target.read_text() == "hi"


def test_replaces_existing_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"x")
    with atomic_write(target, is_dir=True) as tmp:
        assert os.path.isdir(tmp) and os.path.dirname(tmp) == str(tmp_path)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write("{}")
        assert (target / "stale.bin").exists()
    assert sorted(os.listdir(target)) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no lock or temporary file left beside it


@pytest.mark.parametrize("is_dir", [False, True])
def test_error_keeps_old_target_and_removes_temp(tmp_path, is_dir):
    target = tmp_path / ("old_dir" if is_dir else "old.npy")
    if is_dir:
        target.mkdir()
        (target / "keep.txt").write_text("old")
    else:
        target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, is_dir=is_dir) as tmp:
            if is_dir:
                with open(os.path.join(tmp, "half.txt"), "w", encoding="utf-8") as f:
                    f.write("half")
            else:
                with open(tmp, "wb") as f:
                    f.write(b"half")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == [target.name]
    if is_dir:
        assert sorted(os.listdir(target)) == ["keep.txt"] and (target / "keep.txt").read_text() == "old"
    else:
        assert target.read_bytes() == b"old"


def test_keyboard_interrupt_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "x.txt"):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_temp_file_keeps_extension(tmp_path):
    target = tmp_path / "emb.npy"
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    with atomic_write(target) as tmp:
        assert tmp.endswith(".npy") and os.path.basename(os.path.dirname(tmp)).startswith(".")
        np.save(tmp, arr)  # np.save appends '.npy' unless the name already ends with it
        assert sorted(os.listdir(tmp_path)) == [os.path.basename(os.path.dirname(tmp))]
        assert sorted(os.listdir(os.path.dirname(tmp))) == ["emb.npy"]
    assert sorted(os.listdir(tmp_path)) == ["emb.npy"]
    np.testing.assert_array_equal(np.load(target), arr)


def test_result_gets_default_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.txt") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("x")
        with atomic_write(tmp_path / "d", is_dir=True):
            pass
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_killed_writes_temporary_folder_is_removed_but_never_a_live_one(tmp_path):
    """A kill leaves a whole temporary copy beside the target; the next write of that name removes it, while a
    write still in progress (its folder locked) keeps its own."""
    from internvit.store import TMP_SUFFIX

    target = tmp_path / "w.bin"
    stale = tmp_path / f".w.bin.killed{TMP_SUFFIX}"
    stale.mkdir()
    (stale / "w.bin").write_bytes(b"x" * 1000)
    with atomic_write(target) as outer:
        open(outer, "wb").write(b"outer")
        assert not stale.exists()  # removed on entry
        with atomic_write(target) as inner:  # a second writer of the same name meanwhile
            open(inner, "wb").write(b"inner")
        assert os.path.exists(outer) and target.read_bytes() == b"inner"
    assert target.read_bytes() == b"outer" and sorted(os.listdir(tmp_path)) == ["w.bin"]
