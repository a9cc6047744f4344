"""Evaluation at the edges: k larger than the index, a 1-vector index, -1 results, bad query vectors, and ties
(duplicate captions / images) counted by one rule in the exact and the via-index numbers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval import build_index, write_embeddings
from retrieval.evaluate import (
    _exact_ranks,
    _list_ranks,
    _search_closed,
    evaluate_retrieval,
    index_quality,
    knn_recall,
    retrieval_recall,
)

from .helpers import mixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """i0: Flat over 300 mixture rows; i1: Flat over 1 row; i2: Flat over non-unit rows (normalised); i3: the
    same rows, not normalised (``normalize=False``)."""
    root = tmp_path_factory.mktemp("eval_edges")
    x = mixture(400, 16)
    for name, rows in (("i0", x[:300]), ("i1", x[:1]), ("i2", 3 * x[:300])):
        write_embeddings(root / f"{name}_emb", rows)
        build_index(str(root / f"{name}_emb"), root / name, progress=False)
    build_index(str(root / "i2_emb"), root / "i3", normalize=False, progress=False)
    np.save(root / "q.npy", x[[0, 300, 331]])
    return root, x


def test_knn_recall_definition_by_hand():
    truth = np.array([[5, 6, -1, -1], [7, -1, -1, -1], [-1, -1, -1, -1], [1, 2, 3, 4]])
    found = np.array([[6, -1, -1, -1], [-1, 7, -1, -1], [-1, -1, -1, -1], [4, 9, 1, -1]])
    r = knn_recall(found, truth, 4)
    # query 0: {6} of {5, 6} = 1/2; query 1: {7} of {7} = 1; query 2: nothing to find, not counted;
    # query 3: {4, 1} of {1, 2, 3, 4} = 1/2. 1-recall: 5 missed, 7 found, 1 found -> 2/3
    assert r == {"recall@4": pytest.approx((0.5 + 1 + 0.5) / 3), "1-recall@4": pytest.approx(2 / 3),
                 "n_evaluated": 3}
    # -1 in both lists is not a match (it used to make 1-recall 1.0 for a query with no neighbour)
    with pytest.raises(ValueError, match="no query has a neighbour"):
        knn_recall(np.full((2, 3), -1), np.full((2, 3), -1), 3)


def test_k_larger_than_the_index_is_full_recall_on_a_flat_index(indexes):
    root, _ = indexes
    rep = index_quality(str(root / "i0"), queries=str(root / "q.npy"), k=400)
    assert rep["recall@400"] == 1.0 and rep["1-recall@400"] == 1.0   # was 300/400 = 0.75
    rep = index_quality(str(root / "i1"), queries=str(root / "q.npy"), k=10)
    assert rep["recall@10"] == 1.0 and rep["1-recall@10"] == 1.0     # was 1/10
    assert "min(k, neighbours the query has)" in rep["recall_definition"]


def test_one_vector_index_leave_one_out_has_nothing_to_measure(indexes):
    root, _ = indexes
    with pytest.raises(ValueError, match="no query has a neighbour"):  # was recall 0.0 and 1-recall 1.0
        index_quality(str(root / "i1"), k=10)


def test_queries_are_validated_as_retriever_validates_them(indexes, tmp_path):
    from retrieval.search import Retriever

    root, x = indexes
    # on a normalising index and on one that is not: a zero query has no direction (inner product scores it 0
    # against everything), whatever the index does to its queries
    for index in ("i2", "i3"):
        r = Retriever.load(str(root / index))
        assert r.manifest["normalize"] == (index == "i2")
        for name, q, msg in (("zero", np.zeros((2, 16), np.float32), "all zeros"),
                             ("one_zero_row", np.vstack([x[:1], np.zeros((1, 16), np.float32)]), "all zeros"),
                             ("nan", np.full((1, 16), np.nan, np.float32), "NaN or inf"),
                             ("inf", np.full((1, 16), np.inf, np.float32), "NaN or inf")):
            with pytest.raises(ValueError, match=msg):
                r.search_embedding(q, 5)
            np.save(tmp_path / f"{name}.npy", q)
            with pytest.raises(ValueError, match=msg):
                index_quality(str(root / index), queries=str(tmp_path / f"{name}.npy"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_retrieval.py"), "index",
                          str(root / "i2"), "--query-embeddings", str(tmp_path / "zero.npy")],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and err[0].startswith("error:") and "all zeros" in err[0], err
    # queries of any length are normalised like the index: 3x a query scores like the query
    np.save(tmp_path / "big.npy", 5 * x[[0, 300, 331]])
    assert index_quality(str(root / "i2"), queries=str(tmp_path / "big.npy"))["recall@10"] == 1.0


def test_retrieval_recall_edges_by_hand():
    img = np.eye(3, dtype=np.float32)
    txt = np.eye(3, dtype=np.float32)[[0, 1, 1]]   # image 2 has no caption: it is not an image -> text query
    r = retrieval_recall(img, txt, [0, 1, 1], ks=(1, 10))
    assert r["text_retrieval_recall@1"] == 1.0 and r["text_retrieval_recall@10"] == 1.0   # was 2/3
    assert r["image_retrieval_recall@10"] == 1.0
    # -1 results are skipped and never match; without scores a rank is the position among the real results
    lists = np.array([[-1, -1], [1, -1], [-1, 1]])   # caption 0: nothing found; captions 1, 2: image 1 at rank 1
    r = retrieval_recall(img, txt, [0, 1, 1], ks=(1, 2), image_topk=lists,
                         text_topk=np.array([[-1, 0], [-1, -1], [0, 1]]))   # image 1 found nothing (a miss)
    assert r["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert r["image_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert r["text_retrieval_recall@1"] == pytest.approx(1 / 2) and r["text_retrieval_recall@2"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="one image id"):
        retrieval_recall(img, txt, [0, 1, 3])


# ------------------------------------------------------------------------------------------ ties
E = np.eye(8, dtype=np.float32)
#: images: 0 = e0, 1 = e1, 2 = e0 (a duplicate of image 0); captions: c0 = e0 (image 0), c1 = e0 (image 1: the
#: same caption as image 0's), c2 = e1 (image 1), c3 = e2 (image 2)
IMAGES = {"i0.jpg": E[0], "i1.jpg": E[1], "i2.jpg": E[0]}
CAPTIONS = {"c0": E[0], "c1": E[0], "c2": E[1], "c3": E[2]}


class _TableEncoder:
    name = "table"
    dim = 8

    def embed_images(self, images, **_):
        from types import SimpleNamespace

        return SimpleNamespace(features=np.stack([IMAGES[os.path.basename(p)] for p in images]),
                               ids=np.arange(len(images)), errors=[])

    def encode_texts(self, texts):
        return np.stack([CAPTIONS[t] for t in texts])

    def info(self) -> dict:
        return {"name": self.name, "kind": "test", "dim": self.dim}


def test_ties_count_the_same_exactly_and_through_a_flat_index(tmp_path):
    """Ranks worked out by hand (rank = 1 + non-positives scoring >= the best positive):
    text -> image: c0 ties images 0 and 2 -> 2; c1 (positive image 1 scores 0, images 0 and 2 score 1) -> 3;
    c2 -> 1; c3 (all images score 0) -> 3.  image -> text: image 0 ties c0 with c1 -> 2; image 1 -> 1 (c2);
    image 2 (positive c3 scores 0, c0 c1 c2 score >= 0) -> 4.
    Before, the exact numbers broke ties by lower id (c0 -> image 0, image 0 -> c0: hits at 1) and faiss by
    higher id, so exact and via-index recall@1 differed."""
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "i0.jpg", "caption": "c0"},
                                                   {"image": "i1.jpg", "caption": ["c1", "c2"]},
                                                   {"image": "i2.jpg", "caption": "c3"}]))
    with pytest.warns(UserWarning, match=r"^recall: image_retrieval_recall@3, image_retrieval_recall@4, "
                                         r"image_retrieval_recall@10, text_retrieval_recall@4, "
                                         r"text_retrieval_recall@10 not reported \(k >= the gallery: 3 images, "
                                         r"4 captions; every query is a hit\)"):
        res = evaluate_retrieval(_TableEncoder(), str(tmp_path / "ann.json"), ks=(1, 2, 3, 4, 10), progress=False,
                                 work_dir=str(tmp_path / "work"), index_key="Flat")
    # k at least the gallery (3 images, 4 captions) is 1.0 for any model: left out, as RetrievalRecall does
    expect = {"image_retrieval_recall@1": 1 / 4, "image_retrieval_recall@2": 2 / 4,
              "text_retrieval_recall@1": 1 / 3, "text_retrieval_recall@2": 2 / 3, "text_retrieval_recall@3": 2 / 3}
    for which in ("exact", "index"):
        assert res[which] == pytest.approx({**expect, "mean_recall": np.mean(list(expect.values()))}), which
    with pytest.raises(ValueError, match=r"^ks=\[4, 10\]: every k is at least the gallery \(3 images, 4 captions\)"):
        evaluate_retrieval(_TableEncoder(), str(tmp_path / "ann.json"), ks=(4, 10), progress=False)


def test_a_tie_group_cut_by_the_list_is_read_whole():
    """Three captions equal to the query, two of them its positives: rank 2 (one non-positive ties). A list
    of k + 1 = 2 holding only the two positives would say rank 1; _search_closed extends it."""
    import faiss

    v, w = E[0], E[1]
    base = np.stack([v, v, v, w]).astype(np.float32)   # caption 0 is the non-positive, 1 and 2 the positives
    index = faiss.IndexFlatIP(8)
    index.add(base)
    q = v[None].copy()
    pos = [{1, 2}]
    assert _exact_ranks(q, base, pos, 1)[0] == np.inf  # rank 2: beyond a max_rank of 1
    assert _exact_ranks(q, base, pos, 2)[0] == 2
    scores, ids = _search_closed(index, q, 1)
    assert set(ids[0][:3].tolist()) == {0, 1, 2}
    assert _list_ranks(ids, scores, pos)[0] == 2


def _full_ranks(queries, base, positives):
    """Every item of the base scored (faiss' float32 flat kernel, one query per call), then 1 + non-positives
    scoring >= the best positive: the definition, at the cost of a sort of the whole base per query."""
    import faiss

    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    ranks = np.full(len(queries), np.inf)
    for r, q in enumerate(queries):
        d, i = flat.search(q[None], len(base))
        row = np.empty(len(base), np.float32)
        row[i[0]] = d[0]
        pos = np.fromiter(positives[r], np.int64)
        if len(pos):
            best = row[pos].max()
            ranks[r] = 1 + int((row >= best).sum()) - int((row[pos] >= best).sum())
    return ranks


@pytest.mark.parametrize("max_rank", [1, 3, 10, 500])
def test_exact_ranks_up_to_max_rank_are_those_of_the_whole_base(max_rank):
    """The exact path lists the top max_rank (ties at the cut read whole) instead of sorting the whole base per
    query: every rank up to max_rank equals the full-base rank, ties and several positives included, and every
    rank beyond it is inf (recall@k for k <= max_rank cannot tell them apart)."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    base[100:140] = base[0]  # a tie group of 41 identical items
    base[200:210] = np.round(base[200:210], 1)
    queries = np.concatenate([base[:60] + 0.3 * rng.standard_normal((60, 16)).astype(np.float32),
                              base[[0, 100, 120]]]).astype(np.float32)
    positives = [set(rng.choice(300, size=int(rng.integers(0, 4)), replace=False).tolist()) for _ in range(60)]
    positives += [{100, 7}, {139}, set()]
    full = _full_ranks(queries, base, positives)
    got = _exact_ranks(queries, base, positives, max_rank)
    within = full <= max_rank
    assert within.any() and (~within).any() or max_rank == 500
    np.testing.assert_array_equal(got[within], full[within])
    assert np.isinf(got[~within]).all()
