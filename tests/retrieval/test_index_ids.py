"""Ids of an index folder: global offsets (kept by --add, range-checked), integer-only id arguments, removed ids
hidden everywhere, duplicate adds refused, search parameters within faiss's C++ types, failed builds rolled
back, and the CLI's messages naming its own flags."""
import json
import os

import numpy as np
import pytest

from retrieval import add_to_index, build_index, remove_from_index
from retrieval.faiss_ops import RetrievalError, set_search_params
from retrieval.index_folder import read_manifest
from retrieval.search import Retriever, SearchResult, format_table
from retrieval.sharded import ShardedRetriever, set_id_offset

from .helpers import error_line, mixture, tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_ID = 2**63 - 1




build_cli, search_cli = tool("build_index"), tool("search")


@pytest.fixture()
def parts(tmp_path):
    """Embedding folders A (300 rows), B (40), C (30), D (30) of one 400-row mixture, with captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = mixture(400, 16)
    bounds = {"A": (0, 300), "B": (300, 340), "C": (340, 370), "D": (370, 400)}
    for name, (lo, hi) in bounds.items():
        os.makedirs(tmp_path / name / "img_emb")
        os.makedirs(tmp_path / name / "metadata")
        np.save(tmp_path / name / "img_emb" / "img_emb_0.npy", x[lo:hi])
        pq.write_table(pa.table({"caption": [f"row {i}" for i in range(lo, hi)]}),
                       tmp_path / name / "metadata" / "metadata_0.parquet")
    return tmp_path, x


def _generation(folder) -> int:
    return int(read_manifest(str(folder))["_store"]["generation"])


# ------------------------------------------------------------------------------------------------ bug 1
def test_add_keeps_the_id_offset_and_commits_a_given_one_with_the_rows(parts, capsys):
    tmp, x = parts
    assert build_cli([tmp / "A", tmp / "i0", "--quiet"]) == 0
    assert build_cli([tmp / "B", tmp / "i1", "--id-offset", "1000", "--quiet"]) == 0
    assert _generation(tmp / "i1") == 1  # the offset came in the build's own commit
    assert build_cli([tmp / "C", tmp / "i1", "--add", "--quiet"]) == 0
    m = read_manifest(str(tmp / "i1"))
    assert m["id_offset"] == 1000 and m["next_id"] == 70 and _generation(tmp / "i1") == 2
    group = Retriever.load([tmp / "i0", tmp / "i1"])  # no overlap: 0..299 and 1000..1069
    assert group.search_embedding(x[345], 1).ids[0, 0] == 1045
    # another offset on --add would renumber every id already handed out (1045 -> 2045): refused, naming both
    before = (tmp / "i1" / "manifest.json").read_bytes()
    assert build_cli([tmp / "D", tmp / "i1", "--add", "--id-offset", "2000", "--quiet"]) == 2
    line = error_line(capsys)
    message = line.split("i1: ", 1)[1]
    assert "--id-offset 2000" in message and "1000" in message and "id_offset" not in message
    assert (tmp / "i1" / "manifest.json").read_bytes() == before
    with pytest.raises(ValueError, match="id_offset 2000 differs from the folder's recorded id_offset 1000"):
        add_to_index(tmp / "i1", tmp / "D", id_offset=2000, progress=False)
    # the recorded offset itself is accepted (nothing changes)
    assert build_cli([tmp / "D", tmp / "i1", "--add", "--id-offset", "1000", "--quiet"]) == 0
    m = read_manifest(str(tmp / "i1"))
    assert (m["id_offset"], m["next_id"], m["ntotal"], _generation(tmp / "i1")) == (1000, 100, 100, 3)
    r = Retriever.load(tmp / "i1")
    assert r.search_embedding(x[375], 1).ids[0, 0] == 1075 and r.search_embedding(x[345], 1).ids[0, 0] == 1045
    # the Python API: None keeps the offset
    add_to_index(tmp / "i1", mixture(5, 16, seed=5), progress=False)
    assert read_manifest(str(tmp / "i1"))["id_offset"] == 1000


# ------------------------------------------------------------------------------------------------ bug 2
def test_global_ids_beyond_int64_are_refused_before_anything_is_written(parts, capsys):
    tmp, x = parts
    # 40 rows from 2**63 - 8: the last id would be 2**63 + 31
    assert build_cli([tmp / "B", tmp / "big", "--id-offset", str(MAX_ID - 7), "--quiet"]) == 2
    assert "beyond the largest id faiss can hold" in error_line(capsys)
    assert not os.path.exists(tmp / "big")
    assert build_cli([tmp / "B", tmp / "big", "--id-offset", str(2**63), "--quiet"]) == 2
    assert "--id-offset" in error_line(capsys) and not os.path.exists(tmp / "big")
    # the largest offset that fits is accepted, and its ids come back exact (not negative, not dropped)
    assert build_cli([tmp / "B", tmp / "big", "--id-offset", str(MAX_ID - 39), "--quiet"]) == 0
    assert build_cli([tmp / "A", tmp / "i0", "--quiet"]) == 0
    res = Retriever.load([tmp / "i0", tmp / "big"]).search_embedding(x[339], 1)
    assert res.ids[0, 0] == MAX_ID
    # an add that would grow past int64 is refused, the folder unchanged
    before = (tmp / "big" / "manifest.json").read_bytes()
    assert build_cli([tmp / "C", tmp / "big", "--add", "--quiet"]) == 2
    assert "beyond the largest id" in error_line(capsys)
    assert (tmp / "big" / "manifest.json").read_bytes() == before
    assert not os.path.exists(tmp / "big" / ".store" / "journal.jsonl")
    with pytest.raises(ValueError, match="beyond the largest id"):
        set_id_offset(tmp / "big", MAX_ID - 38)
    with pytest.raises(ValueError, match="id_offset must be an integer >= 0"):
        set_id_offset(tmp / "big", -1)
    with pytest.raises(ValueError, match="id_offset must be an integer >= 0"):
        build_index(x[:10], tmp / "neg", index_key="Flat", id_offset=-5, progress=False)
    # a manifest written before offsets were checked: one line at load, not negative ids at search
    m = json.loads((tmp / "big" / "manifest.json").read_text())
    m["id_offset"] = 2**63
    (tmp / "big" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RetrievalError, match="beyond the largest id"):
        Retriever.load(tmp / "big")


# ------------------------------------------------------------------------------------------------ bug 3
@pytest.mark.parametrize("bad", [[1.5], [True], [np.float64(2.0)], np.array([1.0]), ["3"], [None], [2**64]])
def test_non_integer_ids_are_refused_not_rounded(tmp_path, bad):
    x = mixture(50, 16)
    build_index(x, tmp_path / "idx", index_key="Flat", metadata={"caption": [f"c{i}" for i in range(50)]},
                progress=False)
    with pytest.raises(ValueError, match="ids must be integers"):
        remove_from_index(tmp_path / "idx", bad)
    m = read_manifest(str(tmp_path / "idx"))
    assert m["ntotal"] == 50 and m["removed"] == 0  # id 1 (or 2) is still there
    r = Retriever.load(tmp_path / "idx")
    with pytest.raises(ValueError, match="must be integers"):
        r.metadata_rows(bad)
    if not isinstance(bad, np.ndarray) and len(bad) == 1:
        with pytest.raises(ValueError, match="must be an integer"):
            r.metadata(bad[0])
        with pytest.raises(ValueError, match="must be an integer"):
            r.stored_vector(bad[0])
        with pytest.raises(ValueError, match="must be an integer"):
            ShardedRetriever([r]).metadata(bad[0])
    assert r.metadata(np.int64(1))["caption"] == "c1"  # numpy integers are integers


# ------------------------------------------------------------------------------------------------ bug 4
def test_search_params_beyond_their_cpp_type_are_refused(parts, capsys):
    tmp, x = parts
    build_index(x, tmp / "hnsw", index_key="HNSW32", progress=False)
    build_index(x, tmp / "ivf", index_key="IVF8,Flat", n_tune_queries=20, progress=False)
    for folder, params, name, high in (("hnsw", "efSearch=4294967297", "efSearch", 2**31 - 1),
                                       ("ivf", "nprobe=2147483648", "nprobe", 2**31 - 1),
                                       ("ivf", "max_codes=9007199254740993", "max_codes", 2**53)):
        with pytest.raises(ValueError, match=f"{name} must be an integer from [01] to {high}"):
            Retriever.load(tmp / folder, search_params=params)
    np.save(tmp / "q.npy", x[:2])
    assert search_cli([tmp / "hnsw", "--embedding", tmp / "q.npy", "-k", "3", "--params",
                       "efSearch=4294967297"]) == 2
    assert "efSearch must be an integer from 1 to 2147483647" in error_line(capsys)
    # the largest value of the type is taken as it is (faiss probes at most nlist lists)
    r = Retriever.load(tmp / "ivf", search_params="nprobe=2147483647")
    assert r.index.nprobe == 2**31 - 1 and r.search_embedding(x[:2], 3).ids[:, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="must be an integer"):
        Retriever.load(tmp / "ivf", search_params="nprobe=2.5")
    # IndexRefine's factor is faiss's k_factor_rf ('k_factor' is IVFPQR's and faiss refuses it here)
    import faiss

    refine = faiss.index_factory(16, "Flat,RFlat", faiss.METRIC_INNER_PRODUCT)
    refine.add(x)
    set_search_params(refine, "k_factor_rf=4")
    assert faiss.downcast_index(refine).k_factor == 4
    with pytest.raises(ValueError, match="does not have 'k_factor'"):
        set_search_params(refine, "k_factor=4")


# ------------------------------------------------------------------------------------------------ bug 5
def test_id_map_key_builds_and_a_failed_build_rolls_back(parts, capsys, monkeypatch):
    tmp, x = parts
    assert build_cli([tmp / "A", tmp / "ik", "--index-key", "IDMap,Flat", "--quiet"]) == 0
    r = Retriever.load(tmp / "ik")
    assert r.search_embedding(x[7], 1).ids[0, 0] == 7 and r.metadata(7)["caption"] == "row 7"
    # a deterministic failure mid-build (here: faiss refusing the vectors) leaves nothing behind
    import retrieval.index_build as ib
    import retrieval.index_job as ij  # the add pass (_populate) lives there; the build adds held-out rows itself

    def refuse(index, batch, ids):
        raise RuntimeError("Error in add at Index.cpp:1: refused")

    monkeypatch.setattr(ij, "add_vectors", refuse)
    monkeypatch.setattr(ib, "add_vectors", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        build_index(str(tmp / "A"), tmp / "new", index_key="Flat", progress=False)
    assert not os.path.exists(tmp / "new")
    before = (tmp / "ik" / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="refused"):
        build_index(str(tmp / "A"), tmp / "ik", index_key="Flat", overwrite=True, progress=False)
    assert (tmp / "ik" / "manifest.json").read_bytes() == before
    assert sorted(os.listdir(tmp / "ik" / ".store")) == ["lock"]  # no journal: nothing pending
    monkeypatch.undo()
    # a kill (here an interrupt) keeps the job pending; the CLI names its own way out and offers it
    calls = []

    def interrupt(index, batch, ids):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ij, "add_vectors", interrupt)
    monkeypatch.setattr(ib, "add_vectors", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_index(str(tmp / "A"), tmp / "ik2", index_key="IDMap,Flat", progress=False)
    monkeypatch.undo()
    assert os.path.exists(tmp / "ik2" / ".store" / "journal.jsonl")
    assert build_cli([tmp / "A", tmp / "ik2", "--quiet"]) == 2
    line = error_line(capsys)
    assert "interrupted job is pending" in line and "--overwrite" in line and "overwrite=True" not in line
    assert build_cli([tmp / "A", tmp / "ik2", "--overwrite", "--quiet"]) == 0
    assert read_manifest(str(tmp / "ik2"))["index_key"] == "Flat"
    assert build_cli([tmp / "B", tmp / "ik2", "--quiet"]) == 2  # another index there: the flag, not Python
    line = error_line(capsys)
    assert "--overwrite" in line and "overwrite=True" not in line
    assert build_cli([tmp / "B", tmp / "ik2", "--overwrite", "--quiet"]) == 0
    assert read_manifest(str(tmp / "ik2"))["ntotal"] == 40


# ------------------------------------------------------------------------------------------------ bug 6
def test_ids_are_global_alone_in_a_group_and_in_the_cli(parts, capsys):
    tmp, x = parts
    build_index(str(tmp / "A"), tmp / "a", index_key="Flat", progress=False)
    build_index(str(tmp / "B"), tmp / "b", index_key="Flat", id_offset=1000, progress=False)
    q = x[[300, 311, 331]]
    alone = Retriever.load(tmp / "b")
    ids = alone.search_embedding(q, 1).ids[:, 0]
    assert ids.tolist() == [1000, 1011, 1031]
    group = Retriever.load([tmp / "a", tmp / "b"])
    assert group.search_embedding(q, 1).ids[:, 0].tolist() == [1000, 1011, 1031]
    for r in (alone, group):
        assert r.metadata(1011)["caption"] == "row 311" and r.metadata(1011)["id"] == 1011
        np.testing.assert_array_equal(r.stored_vector(1011), x[311])
        assert r.metadata_rows([1000, 1031])[1031]["caption"] == "row 331"
        assert r.search_embedding(q, 1).rows[1][0]["caption"] == "row 311"
    assert alone.metadata(11) == {}  # a local id is not this folder's global id
    with pytest.raises(KeyError):
        alone.stored_vector(11)
    np.save(tmp / "q.npy", q)
    assert search_cli([tmp / "b", "--embedding", tmp / "q.npy", "-k", "1", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["caption"]) for r in recs] == [(1000, "row 300"), (1011, "row 311"), (1031, "row 331")]
    # remove takes the same global ids
    remove_from_index(tmp / "b", [1011])
    r = Retriever.load(tmp / "b")
    assert r.metadata(1011) == {} and 1011 not in r.search_embedding(q, 5).ids
    with pytest.raises(ValueError, match="not in the index"):
        remove_from_index(tmp / "b", [5])


# ------------------------------------------------------------------------------------------------ bug 7
def test_removed_ids_have_no_metadata_and_no_vector(tmp_path):
    x = mixture(60, 16)
    caps = {"caption": [f"c{i}" for i in range(60)]}
    build_index(x, tmp_path / "idx", index_key="Flat", metadata=caps, progress=False)
    remove_from_index(tmp_path / "idx", [5, 9])
    r = Retriever.load(tmp_path / "idx")
    assert r.metadata(5) == {} and r.metadata(6)["caption"] == "c6"
    rows = r.metadata_rows([5, 6, 9])
    assert rows[5] == {} and rows[9] == {} and rows[6]["caption"] == "c6"
    with pytest.raises(KeyError):
        r.stored_vector(5)
    np.testing.assert_array_equal(r.stored_vector(6), x[6])
    group = ShardedRetriever([r])
    assert group.metadata(9) == {} and not group.holds(9) and group.holds(6)


# ------------------------------------------------------------------------------------------------ bug 8
def test_adding_embeddings_the_index_holds_is_refused(parts, capsys):
    tmp, x = parts
    assert build_cli([tmp / "A", tmp / "i0", "--quiet"]) == 0
    before = (tmp / "i0" / "manifest.json").read_bytes()
    assert build_cli([tmp / "A", tmp / "i0", "--add", "--quiet"]) == 2
    line = error_line(capsys)
    assert "already in the index, added by the build" in line and "--allow-duplicate" in line
    assert (tmp / "i0" / "manifest.json").read_bytes() == before
    assert build_cli([tmp / "B", tmp / "i0", "--add", "--quiet"]) == 0
    assert build_cli([tmp / "C", tmp / "i0", "--add", "--quiet"]) == 0
    assert build_cli([tmp / "B", tmp / "i0", "--add", "--quiet"]) == 2  # not the last add: refused, named
    assert "added by add #1" in error_line(capsys)
    assert build_cli([tmp / "C", tmp / "i0", "--add", "--quiet"]) == 0  # a rerun of the last add: a no-op
    m = read_manifest(str(tmp / "i0"))
    assert m["ntotal"] == 370 and all(e["fingerprint"] for e in m["embeddings"])
    assert build_cli([tmp / "A", tmp / "i0", "--add", "--allow-duplicate", "--quiet"]) == 0
    assert read_manifest(str(tmp / "i0"))["ntotal"] == 670
    # arrays: the build's fingerprint and the add's checksum are the same kind
    build_index(x[:100], tmp / "arr", index_key="Flat", progress=False)
    with pytest.raises(ValueError, match="already in the index, added by the build"):
        add_to_index(tmp / "arr", x[:100].copy(), progress=False)
    add_to_index(tmp / "arr", x[100:150], progress=False)
    add_to_index(tmp / "arr", x[150:160], progress=False)  # add #1 is no longer the last one
    with pytest.raises(ValueError, match=r"added by add #1 \(ids 100..149\)"):
        add_to_index(tmp / "arr", x[100:150], progress=False)
    assert read_manifest(str(tmp / "arr"))["ntotal"] == 160


# ------------------------------------------------------------------------------------------------ table
def test_table_keeps_one_line_per_hit_with_newlines_in_captions():
    res = SearchResult(ids=np.array([[3, 4]]), scores=np.array([[0.9, 0.8]], np.float32),
                       rows=[[{"id": 3, "score": 0.9, "caption": "two\nlines"},
                              {"id": 4, "score": 0.8, "caption": "cr\r\u2028end\ttab"}]], queries=["a\nquery"])
    lines = format_table(res).splitlines()
    assert len(lines) == 4
    assert lines[0] == "query 0: a\\nquery"
    assert lines[2].endswith("two\\nlines") and lines[3].endswith("cr\\r\\u2028end\\ttab")


def test_model_builds_commit_the_id_offset_with_the_rows(tmp_path):
    """build_index.py --model ... --id-offset: the offset lands in the build's own commit (it used to be a
    second commit, so readers could see the folder with offset 0 in between), and --add keeps it."""
    from .helpers import make_images

    imgs, more = tmp_path / "imgs", tmp_path / "more"
    make_images(str(imgs), 6)
    make_images(str(more), 3, seed=5)
    out = tmp_path / "idx"
    common = ["--model", "internvit:internvit-6b-tiny", "--quiet"]
    assert build_cli([imgs, out, *common, "--id-offset", 500]) == 0
    m = read_manifest(str(out))
    assert (m["id_offset"], m["next_id"], _generation(out)) == (500, 6, 1)
    assert build_cli([more, out, *common, "--add"]) == 0
    m = read_manifest(str(out))
    assert (m["id_offset"], m["next_id"]) == (500, 9)
    hits = Retriever.load(str(out)).search_embedding(np.ones(Retriever.load(str(out)).manifest["dim"], "f4"), 9)
    assert sorted(hits.ids[0].tolist()) == list(range(500, 509))


def test_untunable_key_below_the_target_recall_warns(parts):
    """PCA4,Flat has no search parameter: its recall on a 16-d mixture is far below 0.95, which used to pass
    without a word (keys with nprobe / efSearch already warned)."""
    tmp, _ = parts
    with pytest.warns(UserWarning, match=r"index PCA4,Flat: recall@10 is only 0\.\d+ < target 0.95"):
        m = build_index(str(tmp / "A"), str(tmp / "pca"), index_key="PCA4,Flat", progress=False)
    assert m["tuning"]["recall"] < 0.95
