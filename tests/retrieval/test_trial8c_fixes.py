"""Index lifecycle findings of newcomer trial 8c (notes/trial8c.md).

F3: after a removal, search by id on an IVF index failed for every id: the direct map was built as an *array*
(faiss refuses it for non-sequential ids) and, once failed, stayed set, so every held id then read as absent
(404 "has no id"); clip-retrieval's ``deduplicate`` silently stopped deduplicating."""

import numpy as np
import pytest

from retrieval import build_index, remove_from_index, write_embeddings
from retrieval.search import Retriever

from .helpers import mixture

pytest.importorskip("fastapi")

from retrieval.serve import background_server, create_app  # noqa: E402

from .serve_util import post  # noqa: E402


@pytest.fixture(scope="module")
def ivf_removed(tmp_path_factory):
    """600 unit vectors + 100 exact duplicates of rows 0..99 (ids 600..699), IVF8,Flat, id 599 removed."""
    root = tmp_path_factory.mktemp("ivf")
    x = mixture(600, d=16, seed=2)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.concatenate([x, x[:100]]).astype(np.float32)
    write_embeddings(str(root / "emb"), x, metadata={"caption": [f"v{i % 600}" for i in range(700)]},
                     shard_size=700)
    idx = str(root / "idx")
    build_index(str(root / "emb"), idx, index_key="IVF8,Flat", progress=False)
    remove_from_index(idx, [599])
    return idx, x


def test_stored_vectors_after_a_removal_on_an_ivf_index(ivf_removed):
    idx, x = ivf_removed
    r = Retriever.load(idx)
    for i in (2, 0, 598, 600, 699):  # the first call used to fail, and every later one said "absent"
        np.testing.assert_allclose(r.stored_vector(i), x[i], atol=1e-6)
    with pytest.raises(KeyError):
        r.stored_vector(599)


def test_served_search_by_id_and_deduplication_after_a_removal(ivf_removed):
    idx, x = ivf_removed
    with background_server(create_app([idx, f"grp={idx}"])) as url:
        for name in ("idx", "grp"):
            for _ in range(2):
                status, body, _ = post(f"{url}/search", {"index": name, "id": 2, "k": 2})
                assert status == 200, body
                assert {h["id"] for h in body["results"]} == {2, 602}
        status, body, _ = post(f"{url}/search", {"index": "idx", "id": 599, "k": 2})
        assert status == 404, body
        q = {"embedding_input": x[2].tolist(), "num_images": 4, "num_result_ids": 4, "deduplicate": True,
             "modality": "image", "indice_name": "idx"}
        status, body, _ = post(f"{url}/knn-service", q)
        assert status == 200, body
        assert [h["caption"] for h in body].count("v2") == 1, body  # ids 2 and 602 hold the same vector


def test_image_route_serves_the_bytes_it_checked_while_a_link_is_swapped_in(tmp_path):
    """F5: /image checked a path and FileResponse opened it again: an indexed image swapped for a symlink to
    another file and back, in a loop, was sent as ``200 image/png`` 12-36 times in 1,500 requests. Now the file
    is opened once and its checked bytes are sent: every answer is the image or a 404, never the other file."""
    import os
    import threading
    import urllib.request

    from .serve_util import build_index as build_served

    idx = build_served(str(tmp_path), "vit", "internvit:internvit-6b-tiny", n=4, evil=False)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-" * 200)
    r = Retriever.load(idx)
    target = r.metadata(1).get("image_path") or r.metadata(1)["path"]
    with open(target, "rb") as fh:
        png = fh.read()
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            os.symlink(str(secret), target + ".l")
            os.replace(target + ".l", target)
            with open(target + ".n", "wb") as out:
                out.write(png)
            os.replace(target + ".n", target)

    seen = {"image": 0, "404": 0}
    with background_server(create_app([idx])) as url:
        t = threading.Thread(target=swap, daemon=True)
        t.start()
        try:
            for i in range(400):
                route = "image" if i % 4 else "thumb"
                try:
                    with urllib.request.urlopen(f"{url}/{route}/vit/1", timeout=30) as resp:
                        body = resp.read()
                except urllib.error.HTTPError as e:
                    assert e.code == 404, e.code
                    seen["404"] += 1
                    continue
                assert b"SECRET" not in body, (route, i)
                if route == "image":
                    assert body == png, i
                seen["image"] += 1
        finally:
            stop.set()
            t.join()
    assert seen["image"] and seen["404"], seen  # both states were met


def test_an_add_of_equal_rows_from_another_folder_is_a_duplicate_not_a_rerun(tmp_path):
    """F2: the same vectors as the last add, from another folder with other captions (the same pictures under
    new paths), were taken for a rerun of that add: "nothing to do", exit 0, the new captions never indexed.
    They are a duplicate (refused, naming the add; allow_duplicate adds them); the same folder again is still
    a rerun, also after another commit (a removal)."""
    from retrieval import add_to_index

    x, y = mixture(40, d=16, seed=5), mixture(30, d=16, seed=6)
    write_embeddings(str(tmp_path / "a"), x, metadata={"caption": [f"a{i}" for i in range(40)]}, shard_size=40)
    write_embeddings(str(tmp_path / "b"), y, metadata={"caption": [f"b{i}" for i in range(30)]}, shard_size=30)
    write_embeddings(str(tmp_path / "b2"), y, metadata={"caption": [f"new{i}" for i in range(30)]}, shard_size=30)
    idx = str(tmp_path / "idx")
    build_index(str(tmp_path / "a"), idx, index_key="Flat", progress=False)
    add_to_index(idx, str(tmp_path / "b"), progress=False)
    assert add_to_index(idx, str(tmp_path / "b"), progress=False)["ntotal"] == 70  # the same add: nothing to do
    with pytest.raises(ValueError, match=r"already in the index, added by add #1 .*ids 40\.\.69"):
        add_to_index(idx, str(tmp_path / "b2"), progress=False)  # right after that add (the last commit)
    remove_from_index(idx, [0])
    m = add_to_index(idx, str(tmp_path / "b"), progress=False)  # the same add again, after another commit
    assert m["ntotal"] == 69 and len(m["embeddings"]) == 2
    with pytest.raises(ValueError, match=r"already in the index, added by add #1 .*ids 40\.\.69"):
        add_to_index(idx, str(tmp_path / "b2"), progress=False)
    m = add_to_index(idx, str(tmp_path / "b2"), progress=False, allow_duplicate=True)
    assert m["ntotal"] == 99
    assert Retriever.load(idx).metadata(70)["caption"] == "new0"


@pytest.mark.parametrize("change", ["add", "remove"])
def test_a_rebuild_that_would_undo_adds_or_removals_is_refused(tmp_path, change):
    """F4: a build with overwrite (the way to change the index key) over an index that was added to or removed
    from replaced it with the build source's rows alone: removed rows back, added rows dropped and next_id
    restarted, so the next add handed out ids already given to other items. Refused, naming what it would
    undo; the index is left as it was. An index without adds or removals is still replaced."""
    from retrieval import add_to_index

    write_embeddings(str(tmp_path / "a"), mixture(40, d=16, seed=5), shard_size=40)
    write_embeddings(str(tmp_path / "b"), mixture(30, d=16, seed=6), shard_size=30)
    idx = str(tmp_path / "idx")
    build_index(str(tmp_path / "a"), idx, index_key="Flat", progress=False)
    m = build_index(str(tmp_path / "a"), idx, index_key="HNSW16", overwrite=True, progress=False)
    assert m["index_key"] == "HNSW16"
    build_index(str(tmp_path / "a"), idx, index_key="Flat", overwrite=True, progress=False)
    if change == "add":
        add_to_index(idx, str(tmp_path / "b"), progress=False)
        what = r"1 add\(s\) \(ids 40\.\.69\)"
    else:
        remove_from_index(idx, [3, 11])
        what = r"2 removed id\(s\)"
    before = Retriever.load(idx).manifest
    with pytest.raises(ValueError, match=what + r" since its build.*build into a new folder"):
        build_index(str(tmp_path / "a"), idx, index_key="HNSW16", overwrite=True, progress=False)
    assert Retriever.load(idx).manifest == before


def test_an_index_emptied_by_removals_returns_no_hits(tmp_path):
    """F6b: after every id was removed, a search answered one fake hit per query (id -1, score -3.4e38)."""
    write_embeddings(str(tmp_path / "a"), mixture(12, d=16, seed=5), shard_size=12)
    idx = str(tmp_path / "idx")
    build_index(str(tmp_path / "a"), idx, index_key="Flat", progress=False)
    remove_from_index(idx, list(range(12)))
    res = Retriever.load(idx).search_embedding(mixture(2, d=16, seed=1), 3)
    assert res.ids.shape == res.scores.shape == (2, 0) and res.rows == [[], []]
