"""Index lifecycle findings of trial 10b (an index kept up to date with ``tools/build_index.py --add``).

F1: rerunning the last ``--add`` in a copied or moved index folder was refused as a duplicate of itself (its
own ``embeddings-add-*`` folder, now at another path), while the same rerun in place is a no-op (exit 0) and a
build's rerun in a copy is one too.

F2: an embeddings folder in clip-retrieval's layout whose metadata files do not pair with its shards
(``metadata_N`` of another row count than ``img_emb_N``, or of another shard) was indexed whenever the totals
agreed, attaching captions and paths to other vectors.

F3: rerunning an ``--add`` (or a build) with other embedding arguments (``--shard-size``) than the ones that made
the embeddings the index holds was told "delete it, or pass --overwrite (--overwrite)" - deleting them loses what
the index was built from, and ``--overwrite``, which leaves a folder the index holds alone, got the same advice.

F4: metadata with both an ``id`` and a ``source_id`` column (a dataset's own ids) was indexed and committed
with two ``source_id`` columns (the source's ``id`` is kept as ``source_id``): every search then failed with
pyarrow's "Multiple matches for FieldRef.Name(source_id)".

F5: a metadata column named like a search hit's own fields (``rank``, ``query``, ``score``) was indexed; in
``search.py --json`` a ``rank`` column replaced every hit's rank (and ``query`` its query), silently.

F6: re-adding a batch after removing its ids (``--add`` of the folder added last) answered "nothing to do" with
exit 0: the removal was not seen, none of the rows came back.

F7: an ``--add`` to a caption index (``--kind text``) whose captions are all empty committed nothing and exited 0
(its ids spent, a source recorded), where a build of the same rows is refused ("nothing to index").

F8: ``--add`` of a folder holding only ``text_emb/`` to a caption index, without ``--kind`` (documented to default
to the index's kind), was refused: "without --model the source must be an embeddings folder".

F9: ``--add`` with ``--model`` to a folder whose id range is full (ids up to ``2**63 - 1``) embedded every image
first and was refused only then, advising "use an id_offset <= ..." - which an add cannot change."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import add_to_index, build_index, remove_from_index, write_embeddings
from retrieval.embeddings import EmbeddingError, EmbeddingSource
from retrieval.search import Retriever, SearchResult

from .helpers import error_line, make_images, mixture, tool

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


def _clip_layout(folder, shards: dict, metadata: dict, d: int = 8) -> np.ndarray:
    """clip-retrieval's layout: ``img_emb/img_emb_N.npy`` of ``shards[N]`` rows, ``metadata/metadata_N.parquet``
    of ``metadata[N]`` rows (captions ``rN`` numbering the metadata rows in file order); returns the vectors
    in shard order."""
    os.makedirs(os.path.join(folder, "img_emb"))
    os.makedirs(os.path.join(folder, "metadata"))
    x = mixture(sum(shards.values()), d=d, seed=4)
    start = 0
    for n, rows in sorted(shards.items()):
        np.save(os.path.join(folder, "img_emb", f"img_emb_{n}.npy"), x[start:start + rows])
        start += rows
    start = 0
    for n, rows in sorted(metadata.items()):
        pq.write_table(pa.table({"caption": [f"r{start + i}" for i in range(rows)]}),
                       os.path.join(folder, "metadata", f"metadata_{n}.parquet"))
        start += rows
    return x


@pytest.mark.parametrize("shards, metadata, named", [
    # partial inference output: img_emb_5 lost, metadata_7 lost; 33 rows on each side
    ({n: 3 for n in range(12) if n != 5}, {n: 3 for n in range(12) if n != 7}, "metadata_5.parquet"),
    # the same number of files and rows, shard 1 of another size than its metadata
    ({0: 3, 1: 3, 2: 3}, {0: 3, 1: 2, 2: 4}, "img_emb_1.npy"),
])
def test_metadata_files_must_pair_with_their_shards(tmp_path, capsys, shards, metadata, named):
    """F2: equal totals were enough: the captions and paths of one shard were attached to another shard's
    vectors (a search answered with the wrong image), by build, --add and the on-disk build alike."""
    _clip_layout(tmp_path / "emb", shards, metadata)
    assert build([tmp_path / "emb", tmp_path / "idx", "--quiet"]) == 2
    assert named in error_line(capsys)
    assert not os.path.exists(tmp_path / "idx")
    assert build([tmp_path / "emb", tmp_path / "disk", "--quiet", "--on-disk", "--index-key", "IVF2,SQ8"]) == 2
    assert named in error_line(capsys)
    ok = tmp_path / "ok"
    _clip_layout(ok, {0: 4}, {0: 4})
    build_index(str(ok), str(tmp_path / "grown"), progress=False)
    with pytest.raises(EmbeddingError, match=named):
        add_to_index(str(tmp_path / "grown"), str(tmp_path / "emb"), progress=False)
    with pytest.raises(EmbeddingError, match=named):
        EmbeddingSource.from_folder(str(tmp_path / "emb")).metadata_table()


@pytest.mark.parametrize("shards, metadata", [
    ({0: 3, 1: 3, 2: 3}, {0: 9}),              # one metadata table for every shard
    ({0: 3, 1: 0, 2: 3}, {0: 3, 2: 3}),        # a shard without rows needs no metadata file
    ({0: 3, 1: 3}, {0: 3, 1: 3, 2: 0}),        # nor a metadata file without rows a shard
])
def test_layouts_whose_rows_pair_are_accepted(tmp_path, shards, metadata):
    x = _clip_layout(tmp_path / "emb", shards, metadata)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    r = Retriever.load(str(tmp_path / "idx"))
    res = r.search_embedding(x, k=1)
    assert [r.metadata(int(i))["caption"] for i in res.ids[:, 0]] == [f"r{i}" for i in range(len(x))]


def test_embeddings_the_index_holds_are_not_offered_for_deletion(tmp_path, capsys):
    make_images(str(tmp_path / "a"), 4)
    make_images(str(tmp_path / "b"), 3, seed=3)
    idx = tmp_path / "idx"
    assert build([tmp_path / "a", idx, "--model", MODEL, "--quiet", "--shard-size", "2"]) == 0
    assert build([tmp_path / "b", idx, "--model", MODEL, "--quiet", "--shard-size", "2", "--add"]) == 0
    before = _manifest(idx)
    capsys.readouterr()
    for argv in ([tmp_path / "b", idx, "--add", "--overwrite"], [tmp_path / "b", idx, "--add"],
                 [tmp_path / "a", idx]):
        assert build([*argv, "--model", MODEL, "--quiet"]) == 2
        line = error_line(capsys)
        assert "shard_size: 2 there, 10000 now" in line and "so they are kept, also with --overwrite" in line
        assert "delete it" not in line and "(--overwrite)" not in line
    assert _manifest(idx) == before
    assert Retriever.load(str(idx)).metadata(6)["image_path"].endswith("img_002.png")


def test_metadata_with_id_and_source_id_is_refused_before_anything_is_written(tmp_path, capsys):
    x = mixture(12, d=8, seed=1)
    meta = {"id": [f"laion-{i}" for i in range(12)], "source_id": list(range(100, 112)), "caption": ["c"] * 12}
    write_embeddings(str(tmp_path / "emb"), x, metadata=meta)
    assert build([tmp_path / "emb", tmp_path / "idx", "--quiet"]) == 2
    assert "both an 'id' and a 'source_id' column" in error_line(capsys)
    assert not os.path.exists(tmp_path / "idx")
    build_index(x, str(tmp_path / "ok"), metadata={"caption": ["c"] * 12}, progress=False)
    before = _manifest(tmp_path / "ok")
    for call in (lambda: add_to_index(str(tmp_path / "ok"), str(tmp_path / "emb"), progress=False),
                 lambda: add_to_index(str(tmp_path / "ok"), x, metadata=meta, allow_duplicate=True, progress=False),
                 lambda: build_index(x, str(tmp_path / "arr"), metadata=meta, progress=False)):
        with pytest.raises(EmbeddingError, match="source_id"):
            call()
    assert _manifest(tmp_path / "ok") == before and not os.path.exists(tmp_path / "arr")
    # an 'id' alone is kept as source_id, as before
    build_index(x, str(tmp_path / "own"), metadata={"id": meta["id"]}, progress=False)
    assert Retriever.load(str(tmp_path / "own")).metadata(3) == {"id": 3, "source_id": "laion-3"}


@pytest.mark.parametrize("column", ["rank", "query", "score", "similarity", "id_str", "thumb_url"])
def test_metadata_columns_named_like_a_hits_fields_are_refused(tmp_path, capsys, column):
    x = mixture(6, d=8, seed=2)
    write_embeddings(str(tmp_path / "emb"), x, metadata={column: list(range(100, 106)), "caption": ["c"] * 6})
    assert build([tmp_path / "emb", tmp_path / "idx", "--quiet"]) == 2
    assert f"'{column}' would clash" in error_line(capsys)
    assert not os.path.exists(tmp_path / "idx")
    with pytest.raises(EmbeddingError, match=column):
        build_index(x, str(tmp_path / "arr"), metadata={column: list(range(6))}, progress=False)


def test_records_keep_the_hits_own_rank_and_query():
    """An index built before the refusal may hold a ``rank`` / ``query`` column: the records' own win."""
    res = SearchResult(ids=np.array([[4, 5]]), scores=np.array([[0.9, 0.5]], np.float32),
                       rows=[[{"id": 4, "rank": 100, "query": "stored", "score": 0.9},
                              {"id": 5, "rank": 200, "score": 0.5}]], queries=["a dog"])
    assert [(r["query"], r["rank"], r["id"], r["score"]) for r in res.to_records()] == [("a dog", 1, 4, 0.9),
                                                                                       ("a dog", 2, 5, 0.5)]


def test_re_adding_the_last_batch_after_removing_it_is_not_a_silent_no_op(tmp_path, capsys):
    write_embeddings(str(tmp_path / "a"), mixture(20, d=8, seed=1))
    write_embeddings(str(tmp_path / "b"), mixture(6, d=8, seed=2), metadata={"caption": list("uvwxyz")})
    idx = str(tmp_path / "idx")
    assert build([tmp_path / "a", idx, "--quiet"]) == 0
    assert build([tmp_path / "b", idx, "--quiet", "--add"]) == 0
    assert build([tmp_path / "b", idx, "--quiet", "--add"]) == 0  # a rerun: nothing to do
    assert _manifest(idx)["ntotal"] == 26
    remove_from_index(idx, list(range(20, 26)))
    capsys.readouterr()
    assert build([tmp_path / "b", idx, "--quiet", "--add"]) == 2  # was 0, with the 6 rows still removed
    line = error_line(capsys)
    assert "6 id(s) have been removed" in line and "--allow-duplicate" in line
    assert build([tmp_path / "b", idx, "--quiet", "--add", "--allow-duplicate"]) == 0
    r = Retriever.load(idx)
    assert r.ntotal == 26 and r.metadata(26)["caption"] == "u" and r.metadata(20) == {}


def test_an_add_of_only_empty_captions_is_refused_like_a_build(tmp_path, capsys):
    t = mixture(10, d=8, seed=3)
    write_embeddings(str(tmp_path / "caps"), text=t, metadata={"caption": [f"c{i}" for i in range(10)]})
    write_embeddings(str(tmp_path / "blank"), text=t[:4], metadata={"caption": ["", None, "  ", "\t"]})
    idx = tmp_path / "idx"
    assert build([tmp_path / "caps", idx, "--kind", "text", "--quiet"]) == 0
    before = _manifest(idx)
    capsys.readouterr()
    assert build([tmp_path / "blank", idx, "--add", "--quiet"]) == 2  # was 0, nothing added, 4 ids spent
    assert "all 4 captions are empty" in error_line(capsys)
    assert _manifest(idx) == before
    assert build([tmp_path / "blank", tmp_path / "new", "--kind", "text", "--quiet"]) == 2
    assert "all 4 captions are empty" in error_line(capsys)
    write_embeddings(str(tmp_path / "more"), text=mixture(3, d=8, seed=5), metadata={"caption": ["x", "y", "z"]})
    assert build([tmp_path / "more", idx, "--add", "--quiet"]) == 0, capsys.readouterr().err  # F8: the index's kind
    assert Retriever.load(str(idx)).metadata(12)["caption"] == "z"


def test_an_add_past_the_last_int64_id_is_refused_before_embedding_with_advice_that_applies(tmp_path, capsys):
    make_images(str(tmp_path / "a"), 4)
    make_images(str(tmp_path / "b"), 3, seed=3)
    idx = tmp_path / "idx"
    assert build([tmp_path / "a", idx, "--model", MODEL, "--quiet", "--id-offset", 2**63 - 6]) == 0  # 2 ids left
    before = _manifest(idx)
    capsys.readouterr()
    assert build([tmp_path / "b", idx, "--model", MODEL, "--quiet", "--add"]) == 2
    line = error_line(capsys)
    assert "has room for 2 more" in line and "new folder" in line and "use an id_offset" not in line
    assert _manifest(idx) == before and sorted(os.listdir(idx)) == sorted(
        ["embeddings", "image.g0001.index", "manifest.json", "metadata", ".store"])
    with pytest.raises(ValueError, match="has room for 2 more"):
        add_to_index(str(idx), mixture(3, d=before["dim"], seed=1), progress=False)
