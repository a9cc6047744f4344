"""Index lifecycle findings of trial 10b (an index kept up to date with ``tools/build_index.py --add``).

F1: rerunning the last ``--add`` in a copied or moved index folder was refused as a duplicate of itself (its
own ``embeddings-add-*`` folder, now at another path), while the same rerun in place is a no-op (exit 0) and a
build's rerun in a copy is one too."""
import json
import os
import shutil

from .helpers import error_line, make_images, tool

build = tool("build_index")
MODEL = "internvit:internvit-6b-tiny"


def _manifest(folder) -> dict:
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def test_rerunning_the_last_add_in_a_copied_index_folder_is_a_no_op(tmp_path, capsys):
    make_images(str(tmp_path / "a"), 6)
    make_images(str(tmp_path / "b"), 4, seed=3)
    idx, copy = tmp_path / "idx", tmp_path / "copy"
    assert build([tmp_path / "a", idx, "--model", MODEL, "--quiet"]) == 0
    assert build([tmp_path / "b", idx, "--model", MODEL, "--quiet", "--add"]) == 0
    shutil.copytree(idx, copy)
    before = _manifest(copy)
    capsys.readouterr()
    # the same command as the last one, on the copy: nothing to do, as in the original folder
    assert build([tmp_path / "b", copy, "--model", MODEL, "--quiet", "--add"]) == 0, capsys.readouterr().err
    assert _manifest(copy) == before
    # the build's images are still a duplicate, in the copy too
    assert build([tmp_path / "a", copy, "--model", MODEL, "--quiet", "--add"]) == 2
    assert "already in the index" in error_line(capsys)
    assert _manifest(copy) == before
