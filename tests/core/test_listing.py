"""Folder listing: every file path once (hard links and file symlinks included), folders entered once, so every
symlink layout terminates."""
from __future__ import annotations

import os
import signal

import pytest
from PIL import Image

from internvit.data import list_images


def _img(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    return str(path)


def _list_in_time(folder, timeout: int = 20) -> list[str]:
    """list_images under an alarm, so a listing that never ends fails the test instead of hanging it."""
    def expired(signum, frame):
        raise TimeoutError(f"list_images({folder}) did not finish in {timeout} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(timeout)
    try:
        return list_images(str(folder))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_self_link_gives_each_image_once(tmp_path):
    """The reported case: ``self -> .`` used to give 41 features for 1 image."""
    img = _img(tmp_path / "a.png")
    os.symlink(".", tmp_path / "self")
    assert _list_in_time(tmp_path) == [img]


def test_symlink_loop_terminates(tmp_path):
    """``self -> .`` plus ``sub/up -> ..`` used to never finish."""
    a = _img(tmp_path / "a.png")
    b = _img(tmp_path / "sub" / "b.png")
    os.symlink(".", tmp_path / "self")
    os.symlink("..", tmp_path / "sub" / "up")
    assert _list_in_time(tmp_path) == sorted([a, b])


def test_deep_mutual_loops_terminate(tmp_path):
    imgs = [_img(tmp_path / d / f"{d}.png") for d in ("x", "y", "z")]
    os.symlink(os.path.join("..", "y"), tmp_path / "x" / "to_y")
    os.symlink(os.path.join("..", "z"), tmp_path / "y" / "to_z")
    os.symlink(os.path.join("..", "x"), tmp_path / "z" / "to_x")
    os.symlink(str(tmp_path), tmp_path / "z" / "to_root")
    assert _list_in_time(tmp_path) == sorted(imgs)


def test_links_pointing_elsewhere_are_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    c = _img(elsewhere / "c.png")
    d = _img(elsewhere / "more" / "d.png")
    data = tmp_path / "data"
    a = _img(data / "a.png")
    os.symlink(str(elsewhere / "more"), data / "linked_dir")
    os.symlink(c, data / "linked.png")
    found = list_images(str(data))
    assert found == sorted([a, str(data / "linked.png"), str(data / "linked_dir" / "d.png")])
    assert d not in found  # listed under the path inside the folder


def test_every_file_path_is_its_own_row(tmp_path):
    """File symlinks to one file are each listed (img2dataset / clip-retrieval list paths, not inodes)."""
    a = _img(tmp_path / "a.png")
    os.symlink(a, tmp_path / "b.png")
    os.makedirs(tmp_path / "sub")
    os.symlink(a, tmp_path / "sub" / "c.png")
    assert list_images(str(tmp_path)) == [a, str(tmp_path / "b.png"), str(tmp_path / "sub" / "c.png")]


def test_hard_links_are_all_listed(tmp_path):
    """The report: ``ln h/a/x.png h/b/hard.png`` listed only h/a/x.png, silently."""
    x = _img(tmp_path / "a" / "x.png")
    os.makedirs(tmp_path / "b")
    os.link(x, tmp_path / "b" / "hard.png")
    os.link(x, tmp_path / "a" / "y.png")
    assert os.stat(x).st_nlink == 3
    assert _list_in_time(tmp_path) == sorted([x, str(tmp_path / "a" / "y.png"), str(tmp_path / "b" / "hard.png")])


def test_hard_links_and_loops_together(tmp_path):
    """Folders stay de-duplicated (loops end, a folder reached by a link and for real is listed once) while
    hard-linked files are each listed."""
    x = _img(tmp_path / "a" / "x.png")
    os.makedirs(tmp_path / "b")
    hard = str(tmp_path / "b" / "hard.png")
    os.link(x, hard)
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink(str(tmp_path / "b"), tmp_path / "a" / "to_b")
    os.symlink(".", tmp_path / "self")
    assert _list_in_time(tmp_path) == sorted([x, hard])


def test_dangling_link_is_kept_as_a_path(tmp_path):
    """A broken link is listed (it becomes a per-image read error, counted, not silently dropped)."""
    a = _img(tmp_path / "a.png")
    os.symlink(str(tmp_path / "missing.png"), tmp_path / "broken.png")
    assert list_images(str(tmp_path)) == [a, str(tmp_path / "broken.png")]


def test_hidden_and_non_images_skipped(tmp_path):
    a = _img(tmp_path / "a.JPG".lower())
    _img(tmp_path / ".hidden" / "h.png")
    _img(tmp_path / ".h.png")
    (tmp_path / "notes.txt").write_text("x")
    assert list_images(str(tmp_path)) == [a]


def test_sorted_recursive(tmp_path):
    paths = [_img(tmp_path / p) for p in ("b/2.png", "a/1.png", "a/sub/0.png", "c.png")]
    assert list_images(str(tmp_path)) == sorted(paths)


def test_bad_sources():
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images("/nonexistent/folder")
    with pytest.raises(TypeError):
        list_images({"a": 1})
    with pytest.raises(TypeError):
        list_images([1, 2])


def test_retrieval_folder_inputs_use_the_same_listing(tmp_path):
    from retrieval.inputs import image_inputs

    img = _img(tmp_path / "a.png")
    os.symlink(".", tmp_path / "self")
    os.makedirs(tmp_path / "sub")
    os.symlink("..", tmp_path / "sub" / "up")
    paths, captions = image_inputs(str(tmp_path))
    assert paths == [img] and captions is None
