"""Findings of a newcomer trial: --add of model embeddings onto an index of bare vectors, --id-offset on --add,
--overwrite at every stage, what a refused or interrupted --add leaves behind, recall on tiny collections, k
beyond the index, and the library's rules for k, metadata rows and metadata columns."""
import os
import warnings

import numpy as np
import pytest

import internvit.store as store
from retrieval import add_to_index, build_index
from retrieval.faiss_ops import IndexMismatchError
from retrieval.index_folder import read_manifest
from retrieval.index_tune import recall_at_k
from retrieval.search import Retriever

from .helpers import make_images, mixture, tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIT = ["--model", "internvit:internvit-6b-tiny", "--quiet"]  # dim 64, image-only, random weights from a seed




build_cli, search_cli, eval_cli = tool("build_index"), tool("search"), tool("eval_retrieval")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _interrupt_first_commit(monkeypatch):
    """The next store commit raises KeyboardInterrupt (a kill at the commit point: the job stays pending)."""
    orig = store.Store.commit

    def boom(self, *a, **k):
        monkeypatch.setattr(store.Store, "commit", orig)
        raise KeyboardInterrupt

    monkeypatch.setattr(store.Store, "commit", boom)


# ------------------------------------------------------------------------------------------------ finding 1
def test_add_of_model_embeddings_to_an_index_of_bare_vectors_is_refused_before_embedding(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 3)
    build_index(mixture(20, 64), tmp_path / "raw", index_key="Flat", progress=False)
    before = (tmp_path / "raw" / "manifest.json").read_bytes()
    assert build_cli([tmp_path / "imgs", tmp_path / "raw", "--add"] + VIT) == 2
    line = _error_line(capsys)
    assert "records no model" in line and "internvit" in line
    assert (tmp_path / "raw" / "manifest.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "raw")) == [".store", "image.g0001.index", "manifest.json"]  # nothing embedded
    # the library too: an embeddings folder that records an encoder, added to an index that records none
    assert build_cli([tmp_path / "imgs", tmp_path / "vit"] + VIT) == 0
    with pytest.raises(IndexMismatchError, match="records no model"):
        add_to_index(tmp_path / "raw", tmp_path / "vit" / "embeddings", progress=False)
    assert read_manifest(str(tmp_path / "raw"))["ntotal"] == 20


def test_search_text_on_an_index_without_model_names_the_cli_flags(tmp_path, capsys):
    build_index(mixture(20, 64), tmp_path / "raw", index_key="Flat", progress=False)
    assert search_cli([tmp_path / "raw", "--text", "seven"]) == 2
    line = _error_line(capsys)
    assert "--model" in line and "encoder=" not in line and "search_embedding" not in line


# ------------------------------------------------------------------------------------------------ finding 2
def test_id_offset_on_add_never_renumbers_the_ids_handed_out(tmp_path, capsys):
    x = mixture(60, 16)
    build_index(x[:40], tmp_path / "idx", index_key="Flat", id_offset=1000, progress=False)
    assert Retriever.load(tmp_path / "idx").search_embedding(x[3], 1).ids[0, 0] == 1003
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="id_offset 5000 differs from the folder's recorded id_offset 1000"):
        add_to_index(tmp_path / "idx", x[40:], id_offset=5000, progress=False)
    _emb_folder(tmp_path / "more", x[40:])
    assert build_cli([tmp_path / "more", tmp_path / "idx", "--add", "--id-offset", "5000", "--quiet"]) == 2
    line = _error_line(capsys)
    assert "--id-offset 5000" in line and "1000" in line
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before
    assert build_cli([tmp_path / "more", tmp_path / "idx", "--add", "--quiet"]) == 0
    r = Retriever.load(tmp_path / "idx")
    assert r.search_embedding(x[3], 1).ids[0, 0] == 1003 and r.search_embedding(x[45], 1).ids[0, 0] == 1045


def test_id_offset_on_add_with_a_model_is_refused_before_embedding(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 3)
    make_images(str(tmp_path / "more"), 2, seed=1)
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--id-offset", "1000"] + VIT) == 0
    assert build_cli([tmp_path / "more", tmp_path / "idx", "--add", "--id-offset", "5000"] + VIT) == 2
    assert "--id-offset 5000" in _error_line(capsys)
    assert not [d for d in os.listdir(tmp_path / "idx") if d.startswith("embeddings-add")]


# ------------------------------------------------------------------------------------------------ finding 3
@pytest.mark.parametrize("key", ["HNSW32", "IDMap,Flat"])
def test_tiny_collection_tunes_to_full_recall_without_warning(tmp_path, key):
    x = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "recall@10 is only 0.900" was a warning
        m = build_index(x, tmp_path / "idx", index_key=key, normalize=False, progress=False)
    assert m["tuning"]["recall"] == 1.0
    if key == "HNSW32":
        assert m["search_params"] == "efSearch=16"  # the smallest, not 4096


def test_recall_at_k_divides_by_the_neighbours_a_query_has():
    truth = np.array([[0, 1, 2, -1], [3, 4, -1, -1]])
    assert recall_at_k(np.array([[2, 1, 0, -1], [4, 3, -1, -1]]), truth, 4) == 1.0
    assert recall_at_k(np.array([[2, 9, -1, -1], [4, -1, -1, -1]]), truth, 4) == pytest.approx((1 / 3 + 1 / 2) / 2)


# ------------------------------------------------------------------------------------------------ finding 5
def _emb_folder(folder, x) -> None:
    os.makedirs(folder / "img_emb")
    np.save(folder / "img_emb" / "img_emb_0.npy", x)


def test_k_is_clamped_to_the_index_and_must_be_an_integer(tmp_path, capsys):
    x = mixture(30, 16)
    _emb_folder(tmp_path / "emb", x)  # a folder: eval_retrieval index reads the ground truth from it
    build_index(tmp_path / "emb", tmp_path / "idx", index_key="Flat", progress=False)
    r = Retriever.load(tmp_path / "idx")
    assert r.search_embedding(x[:1], k=40).ids.shape == (1, 30)  # checked first: a cheap failure on old code
    res = r.search_embedding(x[:2], k=10**9)  # was a (2, 10**9) allocation
    assert res.ids.shape == (2, 30) and (res.ids >= 0).all() and len(res.rows[0]) == 30
    assert r.search_embedding(x[:1], k=10**30).ids.shape == (1, 30)
    assert r.search_embedding(x[:1], k=np.int64(3)).ids.shape == (1, 3)
    for bad in (2.0, True, 0, "3"):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            r.search_embedding(x[:1], k=bad)
    group = Retriever.load([tmp_path / "idx"])
    assert group.search_embedding(x[:1], k=10**9).ids.shape == (1, 30)
    # the CLIs: a huge -k is one line naming -k; a large one within the bound answers the whole index
    np.save(tmp_path / "q.npy", x[:2])
    for k in ("99999999999999999999999", str(2**31)):
        assert search_cli([tmp_path / "idx", "--embedding", tmp_path / "q.npy", "-k", k]) == 2
        assert "-k" in _error_line(capsys)
    assert search_cli([tmp_path / "idx", "--embedding", tmp_path / "q.npy", "-k", "1000000000", "--json"]) == 0
    assert eval_cli(["index", tmp_path / "idx", "-k", "100000000", "--queries", "5"]) == 0
    out = capsys.readouterr().out
    assert '"recall@100000000": 1.0' in out
    assert eval_cli(["index", tmp_path / "idx", "-k", "99999999999999999999999"]) == 2
    assert "-k" in _error_line(capsys)


# ------------------------------------------------------------------------------------------------ finding 6
def test_overwrite_discards_an_interrupted_embedding_job_of_other_arguments(tmp_path, capsys, monkeypatch):
    make_images(str(tmp_path / "imgs"), 5)
    _interrupt_first_commit(monkeypatch)  # killed while the embeddings were being committed
    assert build_cli([tmp_path / "imgs", tmp_path / "idx"] + VIT) == 130
    capsys.readouterr()
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--shard-size", "2"] + VIT) == 2
    line = _error_line(capsys)
    assert "--overwrite" in line and "--discard-pending" not in line and "discard_pending" not in line
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--shard-size", "2", "--overwrite"] + VIT) == 0
    assert read_manifest(str(tmp_path / "idx"))["ntotal"] == 5


# ------------------------------------------------------------------------------------------------ finding 7
def test_refused_add_leaves_no_embeddings_folder(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 4)
    assert build_cli([tmp_path / "imgs", tmp_path / "idx"] + VIT) == 0
    listing = sorted(os.listdir(tmp_path / "idx"))
    assert build_cli([tmp_path / "imgs", tmp_path / "idx", "--add"] + VIT) == 2
    assert "already in the index" in _error_line(capsys)
    assert sorted(os.listdir(tmp_path / "idx")) == listing


def test_stale_add_folders_are_named_and_removed_with_overwrite(tmp_path, capsys, monkeypatch, caplog):
    make_images(str(tmp_path / "imgs"), 4)
    make_images(str(tmp_path / "more"), 3, seed=1)
    make_images(str(tmp_path / "third"), 2, seed=2)
    assert build_cli([tmp_path / "imgs", tmp_path / "idx"] + VIT) == 0
    _interrupt_first_commit(monkeypatch)  # an --add killed while embedding
    assert build_cli([tmp_path / "more", tmp_path / "idx", "--add"] + VIT) == 130
    stale = [d for d in os.listdir(tmp_path / "idx") if d.startswith("embeddings-add-")]
    assert len(stale) == 1
    caplog.clear()
    assert build_cli([tmp_path / "third", tmp_path / "idx", "--add"] + VIT) == 0  # named, kept (resumable)
    assert stale[0] in caplog.text and "--overwrite" in caplog.text
    assert stale[0] in os.listdir(tmp_path / "idx")
    assert build_cli([tmp_path / "third", tmp_path / "idx", "--add", "--overwrite"] + VIT) == 0
    assert stale[0] not in os.listdir(tmp_path / "idx")
    m = read_manifest(str(tmp_path / "idx"))
    assert m["ntotal"] == 6 and all(os.path.isdir(e["source"]) for e in m["embeddings"])  # referenced ones stay


# ------------------------------------------------------------------------------------------------ finding 10
def test_metadata_of_a_live_id_without_columns_differs_from_a_removed_id(tmp_path):
    from retrieval import remove_from_index

    x = mixture(30, 16)
    build_index(x[:20], tmp_path / "idx", index_key="Flat", metadata={"caption": [f"c{i}" for i in range(20)]},
                progress=False)
    add_to_index(tmp_path / "idx", x[20:25], progress=False)  # no metadata
    remove_from_index(tmp_path / "idx", [21])
    r = Retriever.load(tmp_path / "idx")
    assert r.metadata(3) == {"id": 3, "caption": "c3"}
    assert r.metadata(22) == {"id": 22}  # held, no columns
    assert r.metadata(21) == {} and r.metadata(99) == {}  # removed / never assigned


def test_add_with_metadata_of_wholly_other_columns_is_refused(tmp_path):
    x = mixture(30, 16)
    build_index(x[:20], tmp_path / "idx", index_key="Flat", metadata={"caption": [f"c{i}" for i in range(20)]},
                progress=False)
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="column.*other.*share none.*caption"):
        add_to_index(tmp_path / "idx", x[20:25], metadata={"other": list("abcde")}, progress=False)
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before
    # sharing a column: the union (the rows of this add have both)
    add_to_index(tmp_path / "idx", x[20:25], metadata={"caption": list("abcde"), "url": list("vwxyz")},
                 progress=False)
    assert Retriever.load(tmp_path / "idx").metadata(21) == {"id": 21, "caption": "b", "url": "w"}


def test_eval_query_embeddings_object_array_names_the_file(tmp_path, capsys):
    build_index(mixture(30, 16), tmp_path / "idx", index_key="Flat", progress=False)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert eval_cli(["index", tmp_path / "idx", "--query-embeddings", tmp_path / "obj.npy"]) == 2
    line = _error_line(capsys)
    assert "--query-embeddings" in line and "obj.npy" in line
    from retrieval.evaluate import index_quality

    with pytest.raises(ValueError, match="obj.npy"):
        index_quality(str(tmp_path / "idx"), queries=str(tmp_path / "obj.npy"))
