"""build_index without a separate read pass (issue 12 §3): the job is identified without reading the rows
(EmbeddingSource.fingerprint), and the rows are checked and the normalisation decided by the passes that read
them anyway (training sample, add pass). The guarantees stay: a NaN / inf or (normalised) zero row anywhere is
refused naming shard and row with nothing left behind; a row that is not unit length anywhere normalises the
whole index; a changed embeddings folder is never resumed as the same job."""
import os

import numpy as np
import pytest

from internvit.store import PendingJobError, Store
from retrieval import EmbeddingError, build_index, write_embeddings
from retrieval.embeddings import EmbeddingSource, row_facts
from retrieval.faiss_ops import serialize
from retrieval.index import split_rows
from retrieval.index_plan import plan_index
from retrieval.search import Retriever

from .helpers import mixture

N, D, SHARD = 5000, 8, 1000  # Flat: the sample is the first 4096 rows, so rows 4096.. are met by the add pass


def _tree(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs} | {
        os.path.relpath(d, root) + "/" for d, _, _ in os.walk(root)}


def _plain(folder, x):
    """clip-retrieval's layout written by hand (no store manifest)."""
    os.makedirs(folder / "img_emb", exist_ok=True)
    for s in range(0, len(x), SHARD):
        np.save(folder / "img_emb" / f"img_emb_{s // SHARD}.npy", x[s:s + SHARD])


def _outside_sample(key, n, row_hint):
    """A row >= row_hint that the training / held-out sample of ``key`` does not contain."""
    plan = plan_index(n - min(1000, n // 10), D, key, "4G")
    train, held = split_rows(n, plan.train_size, min(1000, n // 10), 0)
    sample = set(train.tolist()) | set(held.tolist())
    return next(r for r in range(row_hint, n) if r not in sample)


@pytest.mark.parametrize("key", ["Flat", "IVF8,Flat"])
def test_a_nan_only_the_add_pass_reads_is_refused_naming_shard_and_row_leaving_nothing(tmp_path, key):
    x = mixture(N, d=D)
    row = 4700 if key == "Flat" else _outside_sample(key, N, 4600)
    x[row, 2] = np.nan
    write_embeddings(tmp_path / "emb", x, shard_size=SHARD)
    before = _tree(tmp_path)
    with pytest.raises(EmbeddingError, match=rf"img_emb/img_emb_4\.npy: row {row - 4000} is not finite"):
        build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key=key, batch_rows=500, checkpoint_every_s=0,
                    n_tune_queries=100, progress=False)
    assert _tree(tmp_path) == before  # no index folder, no pending job, no checkpoint
    # an existing index is not touched by a refused overwrite: no pending job, the old state committed
    good = mixture(N, d=D, seed=1)
    m = build_index(good, tmp_path / "ok", index_key=key, n_tune_queries=100, progress=False)
    before = _tree(tmp_path / "ok")
    with pytest.raises(EmbeddingError, match=rf"row {row - 4000} is not finite"):
        build_index(str(tmp_path / "emb"), tmp_path / "ok", index_key=key, batch_rows=500, checkpoint_every_s=0,
                    n_tune_queries=100, overwrite=True, progress=False)
    assert _tree(tmp_path / "ok") - {".store/journal.jsonl"} == before - {".store/journal.jsonl"}
    assert not os.path.exists(tmp_path / "ok" / ".store" / "journal.jsonl")
    assert Retriever.load(tmp_path / "ok").manifest == m
    assert build_index(good, tmp_path / "ok", index_key=key, n_tune_queries=100, progress=False) == m  # no-op


def test_a_zero_row_only_the_add_pass_reads_is_refused_when_normalising(tmp_path):
    x = mixture(N, d=D)
    x[4321] = 0
    write_embeddings(tmp_path / "emb", x, shard_size=SHARD)
    before = _tree(tmp_path)
    with pytest.raises(EmbeddingError, match=r"img_emb/img_emb_4\.npy: row 321 is all zeros"):
        build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key="Flat", batch_rows=500, progress=False)
    assert _tree(tmp_path) == before
    m = build_index(str(tmp_path / "emb"), tmp_path / "raw", index_key="Flat", normalize=False, progress=False)
    assert m["normalize"] is False and m["ntotal"] == N and m["norms"]["min"] == 0.0


@pytest.mark.parametrize("key", ["Flat", "IVF8,Flat", "HNSW8"])
def test_a_non_unit_row_the_sample_missed_normalises_the_whole_index(tmp_path, key):
    """The decision is the one a full scan made: any non-unit row normalises every row (the job restarts
    normalised when the add pass meets it); the result equals the explicitly normalised build."""
    import faiss

    faiss.omp_set_num_threads(1)
    x = mixture(N, d=D)
    row = 4800 if key == "Flat" else _outside_sample(key, N, 4700)
    x[row] *= 1.5
    write_embeddings(tmp_path / "emb", x, shard_size=SHARD)
    kw = dict(index_key=key, batch_rows=500, checkpoint_every_s=0, n_tune_queries=100, progress=False)
    auto = build_index(str(tmp_path / "emb"), tmp_path / "auto", **kw)
    explicit = build_index(str(tmp_path / "emb"), tmp_path / "explicit", normalize=True, **kw)
    assert auto["normalize"] is True and auto["normalize_mode"] == "auto"
    assert auto["norms"] == explicit["norms"]
    assert auto["norms"]["max"] == pytest.approx(1.5, rel=1e-5)
    assert auto["norms"]["max"] == float(np.linalg.norm(x, axis=1).max())
    a, b = Retriever.load(tmp_path / "auto"), Retriever.load(tmp_path / "explicit")
    assert serialize(a.index) == serialize(b.index)
    # unit vectors: not normalised, norms recorded as np.linalg.norm computes them
    unit = build_index(mixture(N, d=D), tmp_path / "unit", **kw)
    assert unit["normalize"] is False
    norms = np.linalg.norm(mixture(N, d=D), axis=1)
    assert unit["norms"] == {"min": float(norms.min()), "max": float(norms.max())}


class _Killed(BaseException):
    pass


def _interrupted_build(monkeypatch, emb, idx):
    commit = Store.commit

    def killed(self, manifest, files):
        raise _Killed("killed before the manifest")

    monkeypatch.setattr(Store, "commit", killed)
    with pytest.raises(_Killed):
        build_index(str(emb), idx, index_key="IVF8,Flat", batch_rows=500, n_tune_queries=100, progress=False)
    monkeypatch.setattr(Store, "commit", commit)


@pytest.mark.parametrize("layout", ["plain", "store"])
def test_a_changed_embeddings_folder_is_not_resumed_as_the_same_job(tmp_path, monkeypatch, layout):
    x, y = mixture(N, d=D), mixture(N, d=D, seed=7)
    emb = tmp_path / "emb"

    def write(data):
        if layout == "plain":
            _plain(emb, data)
        else:
            import shutil

            shutil.rmtree(emb, ignore_errors=True)
            write_embeddings(emb, data, shard_size=SHARD)

    write(x)
    _interrupted_build(monkeypatch, emb, tmp_path / "idx")
    # unchanged: the rerun resumes and finishes the job
    m = build_index(str(emb), tmp_path / "idx", index_key="IVF8,Flat", batch_rows=500, n_tune_queries=100,
                    progress=False)
    assert m["ntotal"] == N and m["_store"]["generation"] == 1
    _interrupted_build(monkeypatch, emb, tmp_path / "idx2")
    if layout == "plain":  # one shard rewritten in place, same shape and size
        changed = x.copy()
        changed[2500] = y[2500]
        np.save(emb / "img_emb" / "img_emb_2.npy", changed[2000:3000])
    else:  # the folder written again with other content
        write(y)
    with pytest.raises(PendingJobError, match="checksum"):
        build_index(str(emb), tmp_path / "idx2", index_key="IVF8,Flat", batch_rows=500, n_tune_queries=100,
                    progress=False)


def test_fingerprint_reads_no_rows_and_reuses_the_recorded_checksum(tmp_path):
    x = mixture(3000, d=D)
    m = write_embeddings(tmp_path / "emb", x, shard_size=SHARD)
    src = EmbeddingSource.from_folder(str(tmp_path / "emb"))
    assert src.fingerprint() == m["checksums"]["img"] == src.checksum()  # the content checksum, not recomputed
    _plain(tmp_path / "plain", x)
    plain = EmbeddingSource.from_folder(str(tmp_path / "plain"))
    fp = plain.fingerprint()
    assert fp.startswith("stat:") and fp == plain.fingerprint()
    os.utime(tmp_path / "plain" / "img_emb" / "img_emb_1.npy")  # a touch counts as a change (conservative)
    assert plain.fingerprint() != fp
    assert EmbeddingSource.from_array(x).fingerprint() == src.checksum()


def test_row_facts_match_a_full_numpy_scan():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[10] *= 1 + 1e-3  # on the tolerance edge: decided as np.linalg.norm decides
    x[20] *= 3e19  # finite but its square overflows float32: not "non-finite"
    x[30] = 0
    x[40, 5] = np.inf
    f = row_facts(x)
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(x, axis=1)
    finite = np.isfinite(x).all(axis=1)
    assert f["nonfinite"] == 40 and f["zero"] == 30
    assert f["min_norm"] == norms[finite].min() and f["max_norm"] == norms[finite].max() == np.inf
    off = np.flatnonzero(finite & (np.abs(norms - 1) > 1e-3))
    assert f["nonunit"] == off[0]
    assert row_facts(np.ones((3, 4), np.float32) / 2)["nonunit"] is None


def test_extracted_folder_is_identified_by_its_rows_not_by_its_job(tmp_path):
    """FeatureExtractor.write records each shard's sha256: a folder deleted and extracted again with the same
    arguments from images whose bytes changed under the same paths is other content (the job id, which hashes
    paths and options, is the same), so an interrupted build over it is not resumed; the same images give the
    same identity (a rerun, or torchrun, commits the same record)."""
    import shutil

    from PIL import Image

    import internvit

    from .helpers import make_images

    paths = make_images(str(tmp_path / "imgs"), 6, captions=False)
    fx = internvit.FeatureExtractor(internvit.load_model("internvit-6b-tiny"), progress=False)
    emb = tmp_path / "emb"

    def extract():
        shutil.rmtree(emb, ignore_errors=True)
        m = fx.write(paths, emb, shard_size=4, features_pattern="img_emb/img_emb_{shard}.npy",
                     metadata_pattern="metadata/metadata_{shard}.parquet")
        return m, EmbeddingSource.from_folder(str(emb)).fingerprint()

    m1, fp1 = extract()
    assert fp1.startswith("content:") and all(len(s["sha256"]) == 64 for s in m1["shards"])
    raw = np.load(emb / "img_emb" / "img_emb_0.npy")
    import hashlib

    assert m1["shards"][0]["sha256"] == hashlib.sha256(np.ascontiguousarray(raw, np.float32).data).hexdigest()
    m2, fp2 = extract()
    assert fp2 == fp1 and m2["_store"]["job_id"] == m1["_store"]["job_id"]
    kw = dict(index_key="Flat", n_tune_queries=0, progress=False)

    class Killed(BaseException):
        pass

    def killed(self, manifest, files):
        raise Killed

    commit = Store.commit
    Store.commit = killed
    try:
        with pytest.raises(Killed):
            build_index(str(emb), tmp_path / "idx", **kw)
    finally:
        Store.commit = commit
    Image.new("RGB", (40, 52), (250, 10, 10)).save(paths[1])  # other bytes under the same path
    m3, fp3 = extract()
    assert m3["_store"]["job_id"] == m1["_store"]["job_id"] and fp3 != fp1
    with pytest.raises(PendingJobError, match="checksum"):
        build_index(str(emb), tmp_path / "idx", **kw)
