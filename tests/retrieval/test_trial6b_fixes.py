"""Findings of newcomer trial 6b (retrieval): a copied index folder knows its own embeddings, caption-index
fingerprints by content, parquet cells named by file/column/row, training minimums read from the faiss objects,
a live --add folder is not called interrupted, --embeddings naming an index folder, repeated search parameters,
warning lines."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import build_index
from retrieval.faiss_ops import check_search_params, new_index
from retrieval.index_folder import read_manifest
from retrieval.index_plan import check_index_key

from .helpers import error_line, make_images, mixture, tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIT = ["--model", "internvit:internvit-6b-tiny", "--quiet"]  # dim 64, image-only, random weights from a seed
build_cli, search_cli = tool("build_index"), tool("search")


def _text_model() -> list:
    from tests.conftest import fixture_dir

    return ["--model", f"internvl-c:{fixture_dir('internvl-cg-tiny')}", "--quiet"]


# ------------------------------------------------------------------------------------------------ A1
def test_rerun_in_a_copied_index_folder_is_a_no_op_and_names_the_copy(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 4)
    args = ["--shard-size", "2"] + VIT
    assert build_cli([tmp_path / "imgs", tmp_path / "idx"] + args) == 0
    shutil.copytree(tmp_path / "idx", tmp_path / "copy", symlinks=True)
    before = (tmp_path / "copy" / "manifest.json").read_bytes()
    assert build_cli([tmp_path / "imgs", tmp_path / "copy"] + args) == 0  # was "built from other embeddings"
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == before
    capsys.readouterr()
    listing = sorted(os.listdir(tmp_path / "copy"))
    assert build_cli([tmp_path / "imgs", tmp_path / "copy", "--add"] + args) == 2  # the build's own images
    line = error_line(capsys)
    assert f"from {tmp_path / 'copy' / 'embeddings'} " in line and str(tmp_path / "idx") not in line
    assert sorted(os.listdir(tmp_path / "copy")) == listing  # the refused add's folder is removed


def test_a_build_from_other_embeddings_is_still_refused(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 4)
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--embeddings", tmp_path / "emb"] + VIT) == 0
    assert build_cli([tmp_path / "imgs", tmp_path / "idx"] + VIT) == 2
    assert "already holds an index built from other embeddings" in error_line(capsys)
    assert not os.path.exists(tmp_path / "idx" / "embeddings")


# ------------------------------------------------------------------------------------------------ A2
def test_caption_index_fingerprint_is_content_not_inode(tmp_path):
    make_images(str(tmp_path / "imgs"), 4)
    for name in ("a", "b"):
        assert build_cli([tmp_path / "imgs", tmp_path / name, "--kind", "text", "--shard-size", "2"]
                         + _text_model()) == 0
    a, b = read_manifest(str(tmp_path / "a")), read_manifest(str(tmp_path / "b"))
    assert not a["embeddings"][0]["fingerprint"].startswith("stat:")
    for key in ("checksum", "fingerprint"):
        assert a["embeddings"][0][key] == b["embeddings"][0][key]
    assert a["build"]["signature"] == b["build"]["signature"] and a["_store"]["job_id"] == b["_store"]["job_id"]


# ------------------------------------------------------------------------------------------------ A3 / B1
@pytest.mark.parametrize("column, values, message", [
    ("path", lambda ps: ps[:2] + [None], "column 'path' row 2 is null"),
    ("path", lambda ps: [1, 2, 3], "column 'path' row 0 is 1 (int)"),
    ("path", lambda ps: ps[:1] + ["", ps[2]], "column 'path' row 1 is empty"),
    ("caption", lambda ps: [4, 5, 6], "column 'caption' row 0 holds 4 (int)"),
    ("caption", lambda ps: [[1], None, [2, 3]], "column 'caption' row 0 holds 1 (int)"),
])
def test_parquet_cells_of_the_wrong_type_name_file_column_and_row(tmp_path, capsys, column, values, message):
    paths = make_images(str(tmp_path / "imgs"), 3, captions=False)
    cols = {"path": paths, "caption": ["a", "b", "c"]}
    cols[column] = values(paths)
    pq.write_table(pa.table(cols), tmp_path / "in.parquet")
    assert build_cli([tmp_path / "in.parquet", tmp_path / "idx"] + VIT) == 2
    line = error_line(capsys)
    assert str(tmp_path / "in.parquet") in line and message in line
    assert not os.path.exists(tmp_path / "idx")


def test_lists_of_captions_keep_the_first_and_count_the_others(tmp_path, caplog):
    paths = make_images(str(tmp_path / "imgs"), 3, captions=False)
    pq.write_table(pa.table({"path": paths, "caption": [["x", "y", "z"], ["one"], []]}), tmp_path / "in.parquet")
    assert build_cli([tmp_path / "in.parquet", tmp_path / "idx", "--kind", "text"] + _text_model()) == 0
    warned = [r.getMessage() for r in caplog.records if "lists of captions" in r.getMessage()]
    assert len(warned) == 1 and "2 other captions are not indexed" in warned[0]
    m = read_manifest(str(tmp_path / "idx"))
    table = pq.read_table(tmp_path / "idx" / m["metadata_files"][0]["file"])
    assert table.column("caption").to_pylist()[:2] == ["x", "one"]


# ------------------------------------------------------------------------------------------------ A4
@pytest.mark.parametrize("key, n, message", [
    ("OPQ4,IVF4,PQ4x4", 100, "OPQ4 rotation .* needs at least 256 training vectors"),
    ("OPQ4,PQ4x4", 255, "needs at least 256"),
    ("RQ2x6", 63, "residual quantiser .* needs at least 64"),
    ("PRQ2x2x4", 15, "residual quantiser .* needs at least 16"),
    ("PCA8,Flat", 7, "PCA to 8 dimensions needs at least 8"),
    ("IVF4,PQ4x4fs", 15, "4-bit codes needs at least 16"),
])
def test_every_trained_component_is_checked_before_training(key, n, message):
    from retrieval.index_plan import training_needs

    with pytest.raises(ValueError, match=message):
        check_index_key(key, n, 16)
    check_index_key(key, int(message.split("at least ")[1].split()[0]), 16)  # the minimum itself trains
    x = mixture(max(n, 256), d=16)
    need = max(v for _, v in training_needs(new_index(key, 16)))
    new_index(key, 16).train(x[:need])  # faiss agrees: the minimum trains


def test_opq_key_on_too_few_vectors_is_oneerror_line(tmp_path, capsys):
    emb = tmp_path / "emb"
    os.makedirs(emb / "img_emb")
    np.save(emb / "img_emb" / "img_emb_0.npy", mixture(100, d=16))
    assert build_cli([emb, tmp_path / "opq", "--index-key", "OPQ4,IVF4,PQ4x4", "--quiet"]) == 2
    line = error_line(capsys)
    assert "OPQ4 rotation" in line and "256" in line and "Clustering" not in line
    assert not os.path.exists(tmp_path / "opq")


# ------------------------------------------------------------------------------------------------ A5
def test_a_live_add_folder_is_not_called_interrupted(tmp_path, caplog):
    from filelock import FileLock

    from internvit.store import LOCK

    make_images(str(tmp_path / "imgs"), 4)
    make_images(str(tmp_path / "more"), 2, seed=1)
    assert build_cli([tmp_path / "imgs", tmp_path / "idx"] + VIT) == 0
    live = tmp_path / "idx" / "embeddings-add-0123456789"  # another process's add, still embedding
    os.makedirs(live / ".store")
    lock = FileLock(str(live / LOCK), timeout=0)
    lock.acquire()
    try:
        caplog.clear()
        caplog.set_level("INFO", logger="retrieval")
        assert build_cli([tmp_path / "more", tmp_path / "idx", "--add", "--overwrite"] + VIT[:2]) == 0
    finally:
        lock.release()
    text = caplog.text
    assert "being written by another process" in text and "interrupted" not in text and "--overwrite" not in text
    assert os.path.isdir(live)  # left alone, even with --overwrite


# ------------------------------------------------------------------------------------------------ A6
def test_embeddings_naming_an_index_folder_says_so(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 3)
    build_index(mixture(20, d=64), tmp_path / "other", index_key="Flat", progress=False)
    before = sorted(os.listdir(tmp_path / "other"))
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--embeddings", tmp_path / "other"] + VIT) == 2
    line = error_line(capsys)
    assert "an index folder, not an embeddings folder" in line and "dtype" not in line
    assert sorted(os.listdir(tmp_path / "other")) == before and not os.path.exists(tmp_path / "idx")


# ------------------------------------------------------------------------------------------------ C1 / C2
def test_a_search_parameter_given_twice_is_refused(tmp_path, capsys):
    build_index(mixture(400, d=16), tmp_path / "ivf", index_key="IVF4,Flat", progress=False)
    with pytest.raises(ValueError, match="nprobe is given twice"):
        check_search_params(new_index("IVF4,Flat", 16), "nprobe=1, nprobe=4")
    np.save(tmp_path / "q.npy", mixture(2, d=16))
    assert search_cli([tmp_path / "ivf", "--embedding", tmp_path / "q.npy", "--params", "nprobe=1,nprobe=4"]) == 2
    assert "nprobe is given twice" in error_line(capsys)


def test_tuning_warnings_are_warning_lines(tmp_path):
    emb = tmp_path / "emb"
    os.makedirs(emb / "img_emb")
    np.save(emb / "img_emb" / "img_emb_0.npy", np.random.default_rng(0).standard_normal((100, 16)).astype("f4"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_index.py"), str(emb), str(tmp_path / "pq"),
                        "--index-key", "PQ4x4", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["index_key"] == "PQ4x4"
    lines = [ln for ln in r.stderr.splitlines() if "recall@10" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: index PQ4x4: recall@10 is only"), r.stderr
    assert "UserWarning" not in r.stderr and "tune_index(" not in r.stderr
