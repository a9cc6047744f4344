"""Issue 9 for indexes: nothing silently wrong (non-finite and non-unit vectors, overlapping tuning queries,
kind mismatches, empty captions, unknown ids, impossible index keys) and every bad CLI input one line, exit 2,
no new files."""
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from retrieval import (
    EmbeddingError,
    IndexMismatchError,
    add_to_index,
    build_index,
    remove_from_index,
    write_embeddings,
)
from retrieval.embeddings import EmbeddingSource
from retrieval.index import split_rows
from retrieval.search import Retriever

from .helpers import make_images, mixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def call(argv):
        try:
            return mod.run(mod.main, argv)
        except SystemExit as e:
            return e.code

    return call


def _tree(folder) -> set:
    return {os.path.relpath(os.path.join(r, f), folder) for r, ds, fs in os.walk(folder) for f in fs + ds}


def _refused(capsys, root, tool, argv, message):
    """The tool prints exactly one `error:` line containing ``message``, exits 2, and creates nothing."""
    before = _tree(root)
    capsys.readouterr()
    assert _tool(tool)([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert _tree(root) == before, sorted(_tree(root) ^ before)
    return err


# --------------------------------------------------------------------------------------- wrong results
def test_non_finite_rows_are_refused_naming_shard_and_row(tmp_path, capsys):
    x = mixture(300)
    x[217, 3] = np.nan
    write_embeddings(tmp_path / "emb", x, shard_size=100)
    for key in ("Flat", "IVF4,Flat"):
        with pytest.raises(EmbeddingError, match=r"img_emb/img_emb_2\.npy: row 17 is not finite"):
            build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key=key, progress=False)
    assert not (tmp_path / "idx").exists()
    _refused(capsys, tmp_path, "build_index", [tmp_path / "emb", tmp_path / "idx2", "--quiet"],
             "img_emb_2.npy: row 17 is not finite")
    good = mixture(300, seed=1)
    build_index(good, tmp_path / "ok", index_key="Flat", progress=False)
    bad = good[:10].copy()
    bad[4, 0] = np.inf
    with pytest.raises(EmbeddingError, match="array: row 4 is not finite"):
        add_to_index(tmp_path / "ok", bad, progress=False)
    assert Retriever.load(tmp_path / "ok").ntotal == 300


def test_non_unit_vectors_are_normalised_and_every_image_finds_itself(tmp_path):
    """The documented chain: extract with default options into clip-retrieval's layout, build_index.py."""
    import internvit

    paths = make_images(str(tmp_path / "imgs"), 12, captions=False)
    model = internvit.load_model("internvit-6b-tiny")
    fx = internvit.FeatureExtractor(model, progress=False)
    fx.write(paths, tmp_path / "emb", shard_size=5, features_pattern="img_emb/img_emb_{shard}.npy",
             metadata_pattern="metadata/metadata_{shard}.parquet")
    src = EmbeddingSource.from_folder(str(tmp_path / "emb"))
    raw = src.rows(0, src.count)
    norms = np.linalg.norm(raw, axis=1)
    assert np.abs(norms - 1).min() > 0.1  # the class token is not unit length
    assert _tool("build_index")([str(tmp_path / "emb"), str(tmp_path / "idx"), "--quiet"]) == 0
    r = Retriever.load(tmp_path / "idx")
    assert r.manifest["normalize"] is True and r.manifest["norms"]["max"] == pytest.approx(norms.max(), rel=1e-5)
    res = r.search_embedding(raw, 1)  # raw (unnormalised) queries are normalised like the index
    assert res.ids[:, 0].tolist() == list(range(src.count))  # self-retrieval top-1 = 100 %


def test_scaled_vectors_self_retrieval(tmp_path):
    x = mixture(2000, d=32)
    scaled = x * np.random.default_rng(3).uniform(1.2, 6.0, (len(x), 1)).astype(np.float32)
    build_index(scaled, tmp_path / "idx", index_key="Flat", progress=False)
    ids = Retriever.load(tmp_path / "idx").search_embedding(scaled, 1).ids[:, 0]
    assert np.mean(ids == np.arange(len(x))) == 1.0
    m = build_index(scaled, tmp_path / "raw", index_key="Flat", normalize=False, progress=False)
    assert m["normalize"] is False  # raw inner products when asked: the longest vectors win instead
    assert np.mean(Retriever.load(tmp_path / "raw").search_embedding(scaled, 1).ids[:, 0] == np.arange(len(x))) < 0.9


def test_tuning_queries_are_disjoint_from_the_training_sample(tmp_path, monkeypatch):
    for n, t, q in ((1000, 400, 1000), (5000, 5000, 1000), (300, 300, 30), (20_000, 3200, 1000)):
        train, held = split_rows(n, t, q, seed=0)
        assert not np.intersect1d(train, held).size and len(held) == min(q, n // 10)
        assert len(train) == min(t, n - len(held))
    taken = []
    orig = EmbeddingSource.take

    def take(self, rows):
        taken.append(np.asarray(rows).copy())
        return orig(self, rows)

    monkeypatch.setattr(EmbeddingSource, "take", take)
    m = build_index(mixture(4000), tmp_path / "idx", index_key="IVF32,Flat", progress=False)
    train, held = taken[0], taken[1]
    assert len(train) == m["index_choice"]["train_size"] and len(held) == m["tuning"]["n_queries"] == 400
    assert not np.intersect1d(train, held).size  # ~half overlapped before


def _img_text_folder(folder, captions):
    n = len(captions)
    img, txt = mixture(n, seed=1), mixture(n, seed=2)
    write_embeddings(folder, img, txt, metadata={"caption": captions}, shard_size=max(1, n // 2))
    return img, txt


def test_add_refuses_another_kind_and_text_index_skips_empty_captions(tmp_path, capsys):
    caps = [f"caption {i}" if i % 5 else ("" if i % 10 else None) for i in range(60)]
    img, txt = _img_text_folder(tmp_path / "emb", caps)
    m = build_index(str(tmp_path / "emb"), tmp_path / "cap", kind="text", index_key="Flat", progress=False)
    empty = [i for i, c in enumerate(caps) if not c]
    assert m["ntotal"] == 60 - len(empty) and m["skipped"] == {"empty_caption": len(empty)}
    r = Retriever.load(tmp_path / "cap")
    hits = r.search_embedding(txt[empty], 60).ids
    assert not set(hits.ravel().tolist()) & set(empty)  # "" embeddings are never hits
    with pytest.raises(IndexMismatchError, match=r"caption \(text\) index .*refusing to add image embeddings"):
        add_to_index(tmp_path / "cap", str(tmp_path / "emb"), kind="img", progress=False)
    _refused(capsys, tmp_path, "build_index", [tmp_path / "emb", tmp_path / "cap", "--add", "--kind", "img"],
             "refusing to add image embeddings")
    img2, txt2 = _img_text_folder(tmp_path / "emb2", [f"new {i}" for i in range(10)])
    m = add_to_index(tmp_path / "cap", str(tmp_path / "emb2"), progress=False)  # the index's kind: captions
    assert m["ntotal"] == 60 - len(empty) + 10
    assert Retriever.load(tmp_path / "cap").search_embedding(txt2, 1).ids[:, 0].tolist() == list(range(60, 70))


def test_remove_names_ids_that_are_not_in_the_index(tmp_path):
    build_index(mixture(500), tmp_path / "idx", index_key="Flat", progress=False)
    with pytest.raises(ValueError, match=r"2 of the 3 ids to remove are not in the index.*: -1, 500$"):
        remove_from_index(tmp_path / "idx", [3, 500, -1])
    assert Retriever.load(tmp_path / "idx").ntotal == 500  # nothing removed
    remove_from_index(tmp_path / "idx", [3])
    with pytest.raises(ValueError, match=r"not in the index.*: 3$"):
        remove_from_index(tmp_path / "idx", [3, 4])


@pytest.mark.parametrize("n, key, message", [
    (300, "IVF1024,Flat", "1024 inverted lists need at least 1024 vectors"),
    (30, "IVF64,Flat", "use Flat"),
    (200, "IVF4,PQ8", "needs at least 256 training vectors"),
    (500, "HNSW1", "M >= 2"),
    (500, "IVFbogus", "invalid index_key"),
    (1100, "IVF1024,Flat", "110 of the 1100 vectors are held out to tune"),
])
def test_impossible_index_keys_are_refused_before_any_work(tmp_path, capsys, n, key, message):
    x = mixture(n, d=16)
    with pytest.raises(ValueError, match=message):
        build_index(x, tmp_path / "idx", index_key=key, progress=False)
    assert not (tmp_path / "idx").exists()
    write_embeddings(tmp_path / "emb", x)
    _refused(capsys, tmp_path, "build_index", [tmp_path / "emb", tmp_path / "idx", "--index-key", key], message)


def test_documented_ivf_example_and_quality_after_add(tmp_path):
    """docs/retrieval.md's Python example with an explicit IVF key on enough vectors, then add."""
    vectors = np.random.default_rng(0).standard_normal((20_000, 64), dtype=np.float32)
    caps = [f"vector {i}" for i in range(len(vectors))]
    m = build_index(vectors, tmp_path / "idx3", index_key="IVF128,Flat", metadata={"caption": caps}, progress=False)
    assert m["normalize"] is True and m["ntotal"] == 20_000
    m = add_to_index(tmp_path / "idx3", vectors[:100] * 2, metadata={"caption": ["again"] * 100}, progress=False)
    assert m["ntotal"] == m["next_id"] == 20_100


def test_index_quality_right_after_add_and_remove(tmp_path):
    """docs: build from a folder, add_to_index a second folder, remove ids, then index_quality works as written."""
    from retrieval import index_quality

    a, b = mixture(3000, seed=1) * 3, mixture(1000, seed=2) * 3  # not unit length: normalised by the index
    write_embeddings(tmp_path / "emb", a)
    write_embeddings(tmp_path / "more", b)
    build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key="IVF16,Flat", progress=False)
    add_to_index(tmp_path / "idx", str(tmp_path / "more"), progress=False)
    remove_from_index(tmp_path / "idx", [5, 3500])
    rep = index_quality(tmp_path / "idx", queries=mixture(50, seed=9), n_latency=5, search_params="nprobe=16")
    assert rep["ntotal"] == 3998 and rep["recall@10"] == 1.0  # all lists probed: IVF-Flat is exact
    rep = index_quality(tmp_path / "idx", n_queries=50, n_latency=5, search_params="nprobe=16")
    assert rep["recall@10"] == 1.0


# --------------------------------------------------------------------------------------- the CLIs
@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    x = mixture(200)
    write_embeddings(root / "emb", x, metadata={"caption": [f"c{i}" for i in range(200)]}, shard_size=100)
    build_index(str(root / "emb"), root / "idx", index_key="Flat", progress=False)
    build_index(str(root / "emb"), root / "ivf", index_key="IVF4,Flat", progress=False)
    np.save(root / "q.npy", x[:3])
    return root


@pytest.mark.parametrize("extra, message", [
    (["-k", "0"], "argument -k: must be >= 1, got 0"),
    (["-k", "-5"], "argument -k: must be >= 1, got -5"),
    (["--params", "foo=bar"], "does not have 'foo'"),
    (["--params", "nprobe=4"], "does not have 'nprobe' (it accepts none"),
    (["--device", "foo"], "device 'foo'"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_search_bad_arguments(flat, capsys, extra, message):
    _refused(capsys, flat, "search", [flat / "idx", "--embedding", flat / "q.npy", *extra], message)


def test_search_ivf_params_checked(flat, capsys):
    _refused(capsys, flat, "search", [flat / "ivf", "--embedding", flat / "q.npy", "--params", "nprobe=x"],
             "nprobe must be a number")
    capsys.readouterr()
    assert _tool("search")([str(flat / "ivf"), "--embedding", str(flat / "q.npy"), "--params", "nprobe=4",
                            "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out) if r["rank"] == 1] == [0, 1, 2]


@pytest.mark.parametrize("damage, message", [
    ("truncate_index", "truncated or modified"),
    ("empty_index", "truncated or modified"),
    ("garbage_index", "not a readable faiss index"),
    ("short_metadata", "holds 99 metadata rows but the manifest says 100"),
    ("cut_metadata", "not a readable parquet file"),
])
def test_search_on_a_damaged_index_folder(flat, tmp_path, capsys, damage, message):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(flat / "idx", idx)
    m = json.loads((idx / "manifest.json").read_text())
    index_file, meta = idx / m["index_file"], idx / m["metadata_files"][1]["file"]
    if damage == "truncate_index":
        index_file.write_bytes(index_file.read_bytes()[:-100])
    elif damage == "empty_index":
        index_file.write_bytes(b"")
    elif damage == "garbage_index":
        data = bytearray(index_file.read_bytes())
        data[:8] = b"NOTFAISS"
        index_file.write_bytes(bytes(data))
    elif damage == "short_metadata":
        pq.write_table(pq.read_table(meta).slice(0, 99), meta)
    else:
        meta.write_bytes(meta.read_bytes()[:50])
    _refused(capsys, tmp_path, "search", [idx, "--embedding", flat / "q.npy"], message)


@pytest.mark.parametrize("extra, message", [
    (["--shard-size", "0"], "argument --shard-size: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--num-workers", "-1"], "argument --num-workers: must be >= 0"),
    (["--max-index-memory", "lots"], "argument --max-index-memory: expected a size"),
    (["--target-recall", "2"], "argument --target-recall: must be in (0, 1]"),
    (["--index-key", "IVF1024,Flat"], "1024 inverted lists need at least 1024 vectors"),
    (["--index-key", "NOPE"], "invalid index_key"),
    (["--device", "foo"], "device 'foo'"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_build_bad_arguments_leave_nothing(tmp_path, capsys, extra, message):
    make_images(str(tmp_path / "imgs"), 4)
    _refused(capsys, tmp_path, "build_index", [tmp_path / "imgs", tmp_path / "out", "--model",
                                               "internvit:internvit-6b-tiny", "--quiet", *extra], message)


def test_build_only_unreadable_images_leaves_nothing(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"broken_{i}.jpg").write_bytes(b"not a jpeg")
    _refused(capsys, tmp_path, "build_index", [tmp_path / "imgs", tmp_path / "out", "--model",
                                               "internvit:internvit-6b-tiny", "--quiet"], "could be read")


def test_add_with_another_model_is_refused_before_embedding(tmp_path, capsys):
    make_images(str(tmp_path / "imgs"), 4)
    make_images(str(tmp_path / "more"), 3, seed=5)
    assert _tool("build_index")([str(tmp_path / "imgs"), str(tmp_path / "out"), "--model",
                                 "internvit:internvit-6b-tiny", "--quiet"]) == 0
    for _ in range(2):  # the second attempt gets the same message (no hidden half-made folder)
        _refused(capsys, tmp_path, "build_index", [tmp_path / "more", tmp_path / "out", "--model",
                                                   "internvit:internvit-300m-tiny", "--add", "--quiet"],
                 "built with encoder")
    capsys.readouterr()
    assert _tool("build_index")([str(tmp_path / "more"), str(tmp_path / "out"), "--model",
                                 "internvit:internvit-6b-tiny", "--add", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ntotal"] == 7


def test_faiss_loader_notice_never_reaches_the_user(flat, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_index.py"), str(flat / "emb"),
                        str(tmp_path / "idx")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "AVX" not in r.stderr and "faiss.loader" not in r.stderr, r.stderr


def test_html_links_resolve_for_awkward_file_names(tmp_path):
    from PIL import Image

    from retrieval.html import write_html
    from retrieval.search import SearchResult

    names = ["a#1.png", "what?.png", "100%.png", "sp ace.png", "quote'.png"]
    (tmp_path / "imgs").mkdir()
    for n in names:
        Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / n)
    rows = [[{"id": i, "score": 1.0, "path": str(tmp_path / "imgs" / n)} for i, n in enumerate(names)]]
    page = tmp_path / "elsewhere" / "page.html"
    write_html(SearchResult(ids=np.arange(5)[None], scores=np.ones((1, 5)), rows=rows, queries=["q"]), str(page))
    import html
    import re

    srcs = [html.unescape(s) for s in re.findall(r"<img src='([^']*)'", page.read_text())]
    assert len(srcs) == 5
    for s, n in zip(srcs, names):
        u = urllib.parse.urlparse(s)
        assert u.scheme == "file" and not u.query and not u.fragment
        assert urllib.request.url2pathname(u.path) == str(tmp_path / "imgs" / n)


def test_index_of_an_older_format_is_read_but_not_extended(tmp_path):
    from retrieval.index import RetrievalError

    build_index(mixture(300), tmp_path / "idx", index_key="Flat", progress=False)
    path = tmp_path / "idx" / "manifest.json"
    m = json.loads(path.read_text())
    m.pop("_store")
    m["format_version"] = 1
    path.write_text(json.dumps(m))
    assert Retriever.load(tmp_path / "idx").ntotal == 300  # still searchable
    with pytest.raises(RetrievalError, match="older version"):
        add_to_index(tmp_path / "idx", mixture(10, seed=3), progress=False)
    with pytest.raises(RetrievalError, match="older version"):
        remove_from_index(tmp_path / "idx", [1])


@pytest.mark.parametrize("key, param", [("PCA16,HNSW8", "efSearch"), ("IVF8,SQ8,RFlat", "nprobe"),
                                        ("PCA16,IVF8,Flat", "nprobe")])
def test_wrapped_indexes_build_tune_and_add(tmp_path, key, param):
    """Keys whose IVF / HNSW sits under a pre-transform or a refinement: ids, tuning and adds still work."""
    x = mixture(1500)
    m = build_index(x, tmp_path / "idx", index_key=key, target_recall=0.5, progress=False)
    assert m["search_params"].startswith(param + "=")
    m = add_to_index(tmp_path / "idx", mixture(20, seed=7), progress=False)
    r = Retriever.load(tmp_path / "idx")
    assert r.ntotal == 1520 and r.search_embedding(x[:3], 1).ids[:, 0].tolist() == [0, 1, 2]
