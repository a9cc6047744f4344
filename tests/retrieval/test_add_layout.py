"""An --add of rows the index already holds, written in another shard layout (another --shard-size, the same
vectors split into other files), is recognised as a duplicate: the source records keep a layout-free hash of
the row count and first rows (``head``), compared in full where the recorded source can still be read."""
import os
import shutil

import numpy as np
import pytest

from retrieval import add_to_index, build_index
from retrieval.index_build import HEAD_ROWS
from retrieval.index_folder import read_manifest

from .helpers import error_line, make_images, mixture, tool

VIT = ["--model", "internvit:internvit-6b-tiny", "--quiet"]  # dim 64, image-only, random weights from a seed
build_cli = tool("build_index")


def _folder(root, name, x, splits=()) -> str:
    """An embeddings folder ``root/name`` holding the rows ``x`` split into ``.npy`` shards at ``splits``."""
    os.makedirs(root / name / "img_emb")
    for i, part in enumerate(np.split(x, list(splits))):
        np.save(root / name / "img_emb" / f"img_emb_{i}.npy", part)
    return str(root / name)


def test_add_of_the_builds_images_with_another_shard_size_is_refused(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 5)
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--shard-size", "2"] + VIT) == 0
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--add", "--shard-size", "3"] + VIT) == 2
    line = error_line(capsys)
    assert "already in the index, added by the build" in line and "ids 0..4" in line, line
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before
    assert read_manifest(str(tmp_path / "idx"))["ntotal"] == 5


def test_same_rows_in_other_shards_are_compared_in_full(tmp_path):
    n = HEAD_ROWS + 200
    x = mixture(n + 50, 16)
    a = _folder(tmp_path, "A", x[:n])
    build_index(a, str(tmp_path / "idx"), index_key="Flat", progress=False)
    b = _folder(tmp_path, "B", x[:n], splits=(300, 700))  # the same rows, other files
    with pytest.raises(ValueError, match=r"already in the index, added by the build from .*A \(ids 0\.\.1223\);"):
        add_to_index(str(tmp_path / "idx"), b, progress=False)
    changed = x[:n].copy()
    changed[-1] = x[n]  # the same count and first rows, another last row: not a duplicate
    c = _folder(tmp_path, "C", changed, splits=(500,))
    add_to_index(str(tmp_path / "idx"), c, progress=False)
    assert read_manifest(str(tmp_path / "idx"))["ntotal"] == 2 * n
    shutil.rmtree(a)  # the build's source is gone: the match on count and head is reported as such
    with pytest.raises(ValueError, match=f"first {HEAD_ROWS} rows only, since that source cannot be read"):
        add_to_index(str(tmp_path / "idx"), b, progress=False)
    add_to_index(str(tmp_path / "idx"), b, progress=False, allow_duplicate=True)
    assert read_manifest(str(tmp_path / "idx"))["ntotal"] == 3 * n
