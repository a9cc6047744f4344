"""Search across several index folders: equal to one index over the union; mismatches refused in one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval import build_index
from retrieval.faiss_ops import IndexMismatchError
from retrieval.ondisk import build_ondisk_index
from retrieval.search import Retriever
from retrieval.sharded import ShardedRetriever, set_id_offset

from .helpers import mixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    x = mixture(9000, 32, seed=11)
    meta = [{"caption": f"row {i}"} for i in range(len(x))]
    build_index(x, tmp / "union", index_key="Flat", metadata=meta, progress=False)
    build_index(x[:3000], tmp / "a", index_key="Flat", metadata=meta[:3000], progress=False)
    build_index(x[3000:5000], tmp / "b", index_key="Flat", metadata=meta[3000:5000], progress=False)
    set_id_offset(tmp / "b", 3000)
    # an on-disk IVF part, searched exhaustively (nprobe = nlist), with its offset recorded at build time
    build_ondisk_index(x[5000:], tmp / "c", index_key="IVF8,Flat", metadata=meta[5000:], id_offset=5000,
                       n_tune_queries=100, max_index_memory="256K", progress=False)
    return tmp, x


def test_sharded_search_equals_one_index_over_the_union(folders):
    tmp, x = folders
    q = mixture(100, 32, seed=12)
    union = Retriever.load(tmp / "union").search_embedding(q, 10)
    parts = [Retriever.load(tmp / "a"), Retriever.load(tmp / "b"), Retriever.load(tmp / "c", search_params="nprobe=8")]
    sharded = ShardedRetriever(parts)
    assert sharded.ntotal == 9000
    res = sharded.search_embedding(q, 10)
    np.testing.assert_array_equal(res.ids, union.ids)
    np.testing.assert_allclose(res.scores, union.scores, rtol=1e-5, atol=1e-6)
    assert [h["caption"] for h in res.rows[0]] == [h["caption"] for h in union.rows[0]]  # metadata of global ids
    assert res.rows[0][0]["caption"] == f"row {res.ids[0, 0]}"
    # the Retriever entry point takes a list of folders too; k beyond one folder's size still fills up
    r = Retriever.load([tmp / "c", tmp / "a", tmp / "b"], search_params="nprobe=8")
    big = r.search_embedding(q[:3], 5000)
    assert (big.ids >= 0).all() and len(np.unique(big.ids[0])) == 5000


def test_mismatched_folders_are_refused_in_one_line(folders, tmp_path):
    tmp, x = folders
    build_index(mixture(500, 16, seed=1), tmp_path / "dim16", index_key="Flat", progress=False)
    with pytest.raises(IndexMismatchError, match="dimension 16 differs") as e:
        ShardedRetriever.load([tmp / "a", tmp_path / "dim16"])
    assert "\n" not in str(e.value)
    with pytest.raises(IndexMismatchError, match="overlap"):
        ShardedRetriever.load([tmp / "a", tmp / "union"])  # both hold ids from 0
    with pytest.raises(ValueError, match="twice"):
        ShardedRetriever.load([tmp / "a", tmp / "a"])
    build_index(x[:100] * 3, tmp_path / "raw", index_key="Flat", normalize=False, progress=False,
                encoder_info={"name": "other-model"})
    set_id_offset(tmp_path / "raw", 100_000)
    with pytest.raises(IndexMismatchError, match="encoder 'other-model'"):
        ShardedRetriever.load([tmp / "a", tmp_path / "raw"])


def test_cli_searches_several_folders(folders, tmp_path):
    tmp, x = folders
    q = mixture(3, 32, seed=13)
    np.save(tmp_path / "q.npy", q)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "search.py"), str(tmp / "a"), str(tmp / "b"),
                          str(tmp / "c"), "--embedding", str(tmp_path / "q.npy"), "-k", "4", "--params", "nprobe=8",
                          "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    union = Retriever.load(tmp / "union").search_embedding(q, 4)
    assert [r["id"] for r in records] == union.ids.ravel().tolist()
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "search.py"), str(tmp / "a"), str(tmp / "union"),
                          "--embedding", str(tmp_path / "q.npy")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ") and "overlap" in bad.stderr
