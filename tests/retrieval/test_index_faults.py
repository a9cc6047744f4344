"""Index folders under kills (tests/faults.py kills build / add / remove at every durable write point) and the
interrupted-operation cases of issue 8: a reader sees the old or the new state, never a mix; rerunning finishes
the job byte-identically; a different job meanwhile is refused naming what differs."""
import json
import os

import numpy as np
import pytest

from internvit.store import PendingJobError, Store
from retrieval import add_to_index, build_index, remove_from_index, write_embeddings
from retrieval.faiss_ops import stored_ids
from retrieval.index import RetrievalError
from retrieval.search import Retriever
from tests.faults import kill_sweep, run
from tests.store.zygote import Zygote

from .helpers import mixture

N, D = 480, 16
QUERY_ROWS = [0, 7, 123, 479]


@pytest.fixture(scope="module")
def zygote():
    """Forks a process that imported faiss and the retrieval package once (a fresh interpreter per command: 3 s)."""
    with Zygote(["faiss", "pyarrow.parquet", "retrieval", "retrieval.search"]) as z:
        yield z


def _py(z, code: str) -> list:
    return z.cmd(["-c", code])


def _vectors(seed=0, n=N):
    return mixture(n, d=D, centers=16, seed=seed)


def _emb(folder, seed=0, n=N, tag="a"):
    x = _vectors(seed, n)
    write_embeddings(folder, x, metadata={"caption": [f"{tag}{i}" for i in range(n)]}, shard_size=n)
    return x


def _reader(idx):
    """What a reader of the folder sees: counts, and for a few known vectors their top hit and its caption."""
    try:
        r = Retriever.load(idx, search_params=None)
    except RetrievalError as e:
        assert "does not exist" in str(e) or "not a finished index" in str(e), e
        return ("no index",)  # no folder, or one with nothing committed: a reader finds no index either way
    m = dict(r.manifest)
    probes = np.concatenate([_vectors(0)[QUERY_ROWS], _vectors(1)[QUERY_ROWS]])
    res = r.search_embedding(probes, 1)
    hits = [(int(i), row[0]["caption"] if row else None) for i, row in zip(res.ids[:, 0], res.rows)]
    for e in m["embeddings"]:
        e.pop("source", None)  # absolute path of the copy under test
    m["build"] = {k: v for k, v in m["build"].items() if k != "timings"}
    return json.dumps(m, sort_keys=True), hits


def _manifest_ignored(rel):
    return rel == "manifest.json"  # its timings differ run to run; its content is compared by _reader


def _ignored_with_retired(tmp_path):
    """Also ignore the files the committed manifest retired: the uninterrupted run leaves them for readers of
    the previous state until the next writer opens the folder, which a rerun after a kill already is."""
    def ignore(rel):
        manifest = json.loads((tmp_path / "reference" / "idx" / "manifest.json").read_text())
        return _manifest_ignored(rel) or rel in manifest["_store"]["retired"]
    return ignore


def _build_code(d):
    return (f"import faiss; faiss.omp_set_num_threads(1)\n"
            f"from retrieval import build_index\n"
            f"build_index({str(d / 'emb')!r}, {str(d / 'idx')!r}, index_key='IVF8,Flat', batch_rows=240, "
            f"checkpoint_every_s=0, n_tune_queries=40, progress=False)\n")


def _add_code(d, emb="emb2"):
    return (f"import faiss; faiss.omp_set_num_threads(1)\n"
            f"from retrieval import add_to_index\n"
            f"add_to_index({str(d / 'idx')!r}, {str(d / emb)!r}, batch_rows=240, checkpoint_every_s=0, "
            f"progress=False)\n")


def _pending(idx) -> bool:
    """Whether a job is pending in the store's journal (begun on the committed generation)."""
    path = idx / ".store" / "journal.jsonl"
    if not path.exists():
        return False
    header = next((json.loads(line) for line in path.read_text().splitlines() if '"begin"' in line), None)
    committed = 0
    if (idx / "manifest.json").exists():
        committed = json.loads((idx / "manifest.json").read_text())["_store"]["generation"]
    return header is not None and header.get("generation") == committed


def test_build_survives_a_kill_at_every_write_point(tmp_path, zygote):
    """After each kill, features written with overwrite=True onto the folder are refused (the folder's kind,
    index, is recorded from the journal's first record on: before 2026-12-04 they took the folder of a killed
    first build); the index rerun then ends byte-identical."""
    import internvit
    from internvit.features import FeatureExtractor
    from internvit.store import ForeignFolderError

    from ..features.images import make_images

    images = make_images(str(tmp_path / "images"), 2)
    fx = FeatureExtractor(internvit.load_model("internvit-6b-tiny"), progress=False)
    refused = []

    def features_refused(d, n):
        idx = d / "idx"
        if not ((idx / "manifest.json").exists() or (idx / ".store" / "journal.jsonl").exists()):
            return  # nothing of the index was written yet
        before = {p: p.read_bytes() for p in idx.rglob("*") if p.is_file() and p.name != "lock"}
        with pytest.raises((ForeignFolderError, ValueError, FileExistsError), match="index"):
            fx.write(images, idx, overwrite=True)
        assert {p: p.read_bytes() for p in idx.rglob("*") if p.is_file() and p.name != "lock"} == before
        refused.append(n)

    names = kill_sweep(tmp_path, prepare=lambda d: _emb(d / "emb"), command=lambda d: _py(zygote, _build_code(d)),
                       read=lambda d: _reader(d / "idx"), output=lambda d: d / "idx", ignore=_manifest_ignored,
                       after_kill=features_refused, min_points=10)
    assert any("partial" in n or n == "journal:state" for n in names)
    assert len(refused) >= len(names) - 1, (refused, names)  # every point from the journal's first record on


def test_add_survives_a_kill_at_every_write_point_and_refuses_another_add(tmp_path, zygote):
    def prepare(d):
        _emb(d / "emb")
        _emb(d / "emb2", seed=1, tag="b")
        _emb(d / "emb3", seed=2, tag="c")
        build_index(str(d / "emb"), d / "idx", index_key="IVF8,Flat", n_tune_queries=40, progress=False)

    def another_add(d, n):
        if not _pending(d / "idx"):
            return
        r = run(_py(zygote, _add_code(d, "emb3")))
        assert r.returncode != 0 and "interrupted job is pending" in r.stderr and "checksum" in r.stderr, (
            f"point {n}: a different add must be refused while one is pending:\n{r.stderr[-1500:]}")

    kill_sweep(tmp_path, prepare=prepare, command=lambda d: _py(zygote, _add_code(d)),
               read=lambda d: _reader(d / "idx"), output=lambda d: d / "idx", ignore=_ignored_with_retired(tmp_path),
               after_kill=another_add, min_points=8)


def test_remove_survives_a_kill_at_every_write_point(tmp_path, zygote):
    def prepare(d):
        _emb(d / "emb")
        build_index(str(d / "emb"), d / "idx", index_key="IVF8,Flat", n_tune_queries=40, progress=False)

    code = (lambda d: "from retrieval import remove_from_index\n"
                      f"remove_from_index({str(d / 'idx')!r}, [7, 123, 5])\n")
    kill_sweep(tmp_path, prepare=prepare, command=lambda d: _py(zygote, code(d)), read=lambda d: _reader(d / "idx"),
               output=lambda d: d / "idx", ignore=_ignored_with_retired(tmp_path), min_points=4)


class _Killed(BaseException):
    pass


def _kill_before_commit(monkeypatch):
    def commit(self, manifest, files):
        raise _Killed("killed after the data files, before the manifest")

    monkeypatch.setattr(Store, "commit", commit)


def test_add_interrupted_before_its_manifest_then_a_different_add(tmp_path, monkeypatch):
    """Issue 8: the first add's index file is written, its manifest is not; another add must not silently
    build on it (duplicated ids, lost metadata, wrong captions)."""
    a = _emb(tmp_path / "emb")
    b = _emb(tmp_path / "emb2", seed=1, tag="b")
    c = _emb(tmp_path / "emb3", seed=2, tag="c")
    build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key="Flat", progress=False)
    commit = Store.commit
    _kill_before_commit(monkeypatch)
    with pytest.raises(_Killed):
        add_to_index(tmp_path / "idx", str(tmp_path / "emb2"), progress=False)
    monkeypatch.setattr(Store, "commit", commit)
    assert os.path.exists(tmp_path / "idx" / "image.g0002.index")  # the new index file is on disk...
    assert Retriever.load(tmp_path / "idx").ntotal == N  # ...but readers still see the committed state

    with pytest.raises(PendingJobError, match=r"checksum: \"sha256:.*there, \"sha256:.*now"):
        add_to_index(tmp_path / "idx", str(tmp_path / "emb3"), progress=False)

    add_to_index(tmp_path / "idx", str(tmp_path / "emb2"), progress=False)  # the interrupted add finishes
    m = add_to_index(tmp_path / "idx", str(tmp_path / "emb3"), progress=False)
    assert m["ntotal"] == m["next_id"] == 3 * N
    r = Retriever.load(tmp_path / "idx")
    for x, tag, first in ((a, "a", 0), (b, "b", N), (c, "c", 2 * N)):
        res = r.search_embedding(x[QUERY_ROWS], 1)
        assert res.ids[:, 0].tolist() == [first + i for i in QUERY_ROWS]
        assert [row[0]["caption"] for row in res.rows] == [f"{tag}{i}" for i in QUERY_ROWS]
    ids = stored_ids(r.index)
    assert len(ids) == len(np.unique(ids)) == 3 * N  # no duplicated id


def test_remove_interrupted_before_its_manifest_removes_exactly_once(tmp_path, monkeypatch):
    """Issue 8: today the folder cannot be opened and rerunning reports removed=0."""
    x = _emb(tmp_path / "emb")
    build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key="IVF8,Flat", n_tune_queries=40, progress=False)
    commit = Store.commit
    _kill_before_commit(monkeypatch)
    with pytest.raises(_Killed):
        remove_from_index(tmp_path / "idx", [5, 6, 7])
    monkeypatch.setattr(Store, "commit", commit)
    r = Retriever.load(tmp_path / "idx")  # opens: the old state
    assert r.ntotal == N and r.manifest["removed"] == 0
    m = remove_from_index(tmp_path / "idx", [5, 6, 7])
    assert m["removed"] == 3 and m["ntotal"] == N - 3
    assert remove_from_index(tmp_path / "idx", [5, 6, 7]) == m  # the committed remove again: a no-op
    res = Retriever.load(tmp_path / "idx", search_params="nprobe=8").search_embedding(x[[5, 6, 7]], 5)
    assert not set(res.ids.ravel().tolist()) & {5, 6, 7}
    with pytest.raises(ValueError, match=r"2 of the 3 ids to remove are not in the index.*: 6, 7$"):
        remove_from_index(tmp_path / "idx", [6, 7, 8])


def test_second_writer_is_refused_while_one_holds_the_folder(tmp_path):
    from internvit.store import StoreBusyError

    _emb(tmp_path / "emb")
    build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key="Flat", progress=False)
    _emb(tmp_path / "emb2", seed=1, tag="b")
    with Store(tmp_path / "idx", job={"op": "other"}, description="index"):
        with pytest.raises(StoreBusyError, match="another process is writing this index"):
            add_to_index(tmp_path / "idx", str(tmp_path / "emb2"), progress=False)
    assert Retriever.load(tmp_path / "idx").ntotal == N
