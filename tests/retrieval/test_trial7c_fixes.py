"""Trial 7c findings (notes/trial7c.md): eval_retrieval --out never replaces what it did not write (an index's
manifest.json above all), its index report refuses changed embeddings folders, --index-key training checks
before embedding, serve.py's --tokenizer, the clip-retrieval routes' field names and num_result_ids, exact vs
Flat on near-ties, and three messages. Each test fails on the code before the fixes."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .helpers import error_line, make_images, tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.environ.get("INTERNVIT_FIXTURES", os.path.join(os.path.dirname(ROOT), "shared", "fixtures"))
CG = os.path.join(FIXTURES, "internvl-cg-tiny")


def _fx():
    if not os.path.isdir(CG):
        pytest.skip(f"fixture {CG} absent")
    return CG


def _digest(folder):
    out = {}
    for dp, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dp, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _bare_vectors(folder, n, d=16, seed=1):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "img_emb"))
    os.makedirs(os.path.join(folder, "metadata"))
    x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 3, (n, 1))).astype(np.float32)
    np.save(os.path.join(folder, "img_emb", "img_emb_0.npy"), x)
    pq.write_table(pa.table({"image_path": [f"/x/{i}.jpg" for i in range(n)]}),
                   os.path.join(folder, "metadata", "metadata_0.parquet"))
    return x


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    """A bare-vector Flat index (an index folder with manifest.json, .store/ and embeddings recorded)."""
    root = tmp_path_factory.mktemp("t7c")
    _bare_vectors(str(root / "emb"), 40)
    assert tool("build_index")([root / "emb", root / "idx", "--quiet"]) == 0
    return root


# -- F1 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("target", ["idx/manifest.json", "idx/report.json", "idx/embeddings/manifest.json"])
def test_out_in_an_index_folder_is_refused_and_the_index_survives(idx, capsys, target, overwrite):
    before = _digest(idx / "idx")
    argv = ["index", idx / "idx", "--out", idx / target, "--queries", "4"] + (["--overwrite"] if overwrite else [])
    assert tool("eval_retrieval")(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --out {idx / target}: inside ") and "even with --overwrite" in line
    assert _digest(idx / "idx") == before
    assert tool("search")([idx / "idx", "--embedding", _query(idx), "-k", "2"]) == 0


def _query(idx):
    path = idx / "q.npy"
    if not path.exists():
        np.save(path, np.ones((1, 16), np.float32))
    return path


def test_recall_out_onto_an_index_manifest_is_refused_before_the_model_loads(idx, capsys):
    before = _digest(idx / "idx")
    ann = idx / "ann.json"
    ann.write_text("[]")
    argv = ["recall", "--model", "internvl-g:/nonexistent", "--annotations", ann, "--out", idx / "idx/manifest.json"]
    assert tool("eval_retrieval")(argv) == 2
    assert "inside" in error_line(capsys)
    assert _digest(idx / "idx") == before


def test_only_marked_reports_of_the_same_command_are_replaced(idx, tmp_path, capsys):
    out = tmp_path / "r.json"
    for _ in range(2):  # its own report: replaced by a rerun
        assert tool("eval_retrieval")(["index", idx / "idx", "--out", out, "--queries", "4"]) == 0
    assert json.loads(out.read_text())["written_by"] == "tools/eval_retrieval.py index"
    capsys.readouterr()
    # a file with the keys the old test looked for (a copy of a manifest, an unmarked old report): --overwrite
    for look_alike in ({"index_key": "Flat", "ntotal": 3, "bytes_per_vector": 1.0},
                       {"exact": {}, "index": {}, "n_images": 3},
                       {"written_by": "tools/eval_retrieval.py recall"}):
        out.write_text(json.dumps(look_alike))
        assert tool("eval_retrieval")(["index", idx / "idx", "--out", out, "--queries", "4"]) == 2
        line = error_line(capsys)
        assert "refusing to replace it (pass --overwrite)" in line, line
        assert json.loads(out.read_text()) == look_alike
    assert tool("eval_retrieval")(["index", idx / "idx", "--out", out, "--queries", "4", "--overwrite"]) == 0
    assert "written_by" in json.loads(out.read_text())


def test_zeroshot_output_in_an_index_folder_is_refused_even_with_overwrite(idx, tmp_path, capsys):
    zs = tool("zeroshot_eval")
    make_images(str(tmp_path / "cls" / "cat"), 1)
    make_images(str(tmp_path / "cls" / "dog"), 1)
    before = _digest(idx / "idx")
    argv = ["--model", _fx(), "--data", tmp_path / "cls", "--workers", "0", "--output", idx / "idx/manifest.json",
            "--overwrite"]
    assert zs(argv) == 2
    assert "inside" in error_line(capsys)
    assert _digest(idx / "idx") == before


def test_zeroshot_result_carries_its_marker(tmp_path, capsys):
    make_images(str(tmp_path / "cls" / "cat"), 1)
    make_images(str(tmp_path / "cls" / "dog"), 1)
    out = tmp_path / "res.json"
    argv = ["--model", _fx(), "--data", tmp_path / "cls", "--workers", "0", "--templates", "imagenet1k",
            "--output", out]
    assert tool("zeroshot_eval")(argv) == 0
    assert json.loads(out.read_text())["written_by"] == "classification.zero_shot"
    capsys.readouterr()
    assert tool("zeroshot_eval")(argv) == 2
    assert "exists and holds a zero-shot result;" in error_line(capsys)


# -- F2 -----------------------------------------------------------------------------------------------------------
def _ivf(root, n):
    x = _bare_vectors(str(root / "emb"), n)
    assert tool("build_index")([root / "emb", root / "ivf", "--index-key", "IVF8,Flat", "--target-recall", "0.5",
                                "--quiet"]) == 0
    return x


def test_index_report_refuses_a_changed_embeddings_folder(tmp_path, capsys):
    x = _ivf(tmp_path, 600)
    capsys.readouterr()
    ev = tool("eval_retrieval")
    assert ev(["index", tmp_path / "ivf", "--params", "nprobe=8"]) == 0
    assert json.loads(capsys.readouterr().out)["recall@10"] == 1.0
    shard = tmp_path / "emb" / "img_emb" / "img_emb_0.npy"
    np.save(shard, x)  # rewritten with the same rows: still scored
    assert ev(["index", tmp_path / "ivf", "--params", "nprobe=8"]) == 0
    assert json.loads(capsys.readouterr().out)["recall@10"] == 1.0
    np.save(shard, np.random.default_rng(0).permutation(x))  # same count, other order
    assert ev(["index", tmp_path / "ivf", "--params", "nprobe=8"]) == 2
    line = error_line(capsys)
    assert str(tmp_path / "emb") in line and "changed since it was indexed" in line
    # the same rows given explicitly are accepted, the shuffled folder is not
    assert ev(["index", tmp_path / "ivf", "--params", "nprobe=8", "--embeddings", tmp_path / "emb"]) == 2
    assert "not the ones the build indexed" in error_line(capsys)


def test_index_report_refuses_changes_past_the_first_rows(tmp_path, capsys):
    x = _ivf(tmp_path, 1200)
    shard = tmp_path / "emb" / "img_emb" / "img_emb_0.npy"
    y = x.copy()
    y[-5:] = y[-5:][::-1]
    np.save(shard, y)
    assert tool("eval_retrieval")(["index", tmp_path / "ivf", "--params", "nprobe=8"]) == 2
    line = error_line(capsys)
    assert str(tmp_path / "emb") in line and "changed since it was indexed" in line and "--embeddings" in line


# -- F4 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["PQ8", "OPQ4,Flat", "IVF2,PQ4", "PCA64,Flat"])
def test_recall_index_key_training_is_checked_before_embedding(tmp_path, monkeypatch, key):
    from retrieval.encoders import load_encoder
    from retrieval.evaluate import evaluate_retrieval

    make_images(str(tmp_path), 3)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": f"img_{i:03d}.png", "caption": f"picture {i}"} for i in range(3)]))
    enc = load_encoder(f"internvl-c:{_fx()}")

    def never(*a, **k):
        raise AssertionError("embedded before the index key was checked")

    monkeypatch.setattr(type(enc), "embed_images", never)
    monkeypatch.setattr(type(enc), "encode_texts", never)
    with pytest.raises(ValueError, match="training vectors"):
        evaluate_retrieval(enc, str(ann), index_key=key, progress=False)


# -- F3, F5, F6 ---------------------------------------------------------------------------------------------------
def test_serve_missing_tokenizer_is_an_error_at_start_up(idx, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), str(idx / "idx"), "--port", "0",
                        "--tokenizer", str(tmp_path / "nope.model")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and lines == [f"error: --tokenizer {tmp_path / 'nope.model'}: no such tokenizer file"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi")
    import shutil

    from retrieval.serve import background_server, create_app

    from .serve_util import build_index

    root = tmp_path_factory.mktemp("t7c_serve")
    model = root / "model"
    shutil.copytree(_fx(), model)
    img = build_index(str(root), "img", f"internvl-c:{model}", n=8, evil=False)
    cap = build_index(str(root), "cap", f"internvl-c:{model}", n=8, evil=False, kind="text")
    os.remove(model / "tokenizer.model")  # the recorded tokenizer is gone: images can still be searched
    with background_server(create_app({"img": img, "cap": cap})) as url:
        yield url, root


def test_missing_tokenizer_refuses_text_queries_only(served):
    import base64

    from .serve_util import post

    url, root = served
    q = base64.b64encode(open(root / "img_imgs" / "img_003.png", "rb").read()).decode()
    status, ans, _ = post(url + "/knn-service", {"image": q, "modality": "image", "indice_name": "img",
                                                 "num_images": 3})
    assert status == 200 and ans[0]["id"] == 3, ans
    status, ans, _ = post(url + "/knn-service", {"text": "a picture", "modality": "image", "indice_name": "img"})
    assert status == 422 and "cannot encode text queries" in ans["error"] and "tokenizer" in ans["error"], ans


def test_clip_routes_name_indice_name(served):
    from .serve_util import post

    url, _ = served
    for route, body in (("/knn-service", {"embedding_input": [0.1] * 32, "modality": "image"}),
                        ("/metadata", {"ids": [1]})):
        status, ans, _ = post(url + route, body)
        assert status == 422 and ans["error"].endswith("name one with 'indice_name'"), ans
    status, ans, _ = post(url + "/search", {"embedding": [0.1] * 32, "k": 2})
    assert status == 422 and ans["error"].endswith("name one with 'index'"), ans


@pytest.mark.parametrize("num_images,num_ids,expected", [(5, 2, 2), (2, 5, 2), (4, None, 4), (3, 3, 3)])
def test_knn_service_returns_at_most_num_result_ids(served, num_images, num_ids, expected):
    from .serve_util import post

    url, _ = served
    body = {"embedding_input": [0.1] * 32, "modality": "image", "indice_name": "img", "num_images": num_images}
    if num_ids is not None:
        body["num_result_ids"] = num_ids
    status, ans, _ = post(url + "/knn-service", body)
    assert status == 200 and len(ans) == expected, ans


# -- F7 -----------------------------------------------------------------------------------------------------------
def test_flat_index_reproduces_the_exact_numbers_on_near_ties():
    """The trial's crafted near-ties (vectors of a few levels: many scores within one float32 rounding); trial 25
    differed before (a positive and a negative 4e-9 apart rounded apart in float64, tied in faiss)."""
    import faiss

    from retrieval.evaluate import _search_closed, retrieval_recall

    rng = np.random.default_rng(0)
    lv = np.array([-3, -1, 0, 1, 3], np.float32)
    for trial in range(30):
        img = lv[rng.integers(0, 5, (60, 64))]
        img = (img / np.linalg.norm(img, axis=1, keepdims=True)).astype(np.float32)
        t2i = rng.integers(0, 60, 120)
        txt = lv[rng.integers(0, 5, (120, 64))]
        txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
        ex = retrieval_recall(img, txt, t2i)
        fi, ft = faiss.IndexFlatIP(64), faiss.IndexFlatIP(64)
        fi.add(img)
        ft.add(txt)
        si, ii = _search_closed(fi, txt, 10)
        st, it = _search_closed(ft, img, 10)
        ix = retrieval_recall(img, txt, t2i, image_topk=ii, text_topk=it, image_topk_scores=si,
                              text_topk_scores=st)
        assert ex == ix, (trial, {k: (ex[k], ix[k]) for k in ex if ex[k] != ix[k]})


# -- F8 -----------------------------------------------------------------------------------------------------------
def test_string_query_vectors_name_the_flag_and_file(idx, tmp_path, capsys):
    from retrieval.evaluate import index_quality

    q = tmp_path / "qstr.npy"
    np.save(q, np.array(["a", "b"]))
    assert tool("eval_retrieval")(["index", idx / "idx", "--query-embeddings", q]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --query-embeddings {q}: ") and "not numbers" in line
    with pytest.raises(ValueError, match="qstr.npy: not an .npy array of query vectors"):
        index_quality(str(idx / "idx"), queries=str(q))
    assert tool("search")([idx / "idx", "--embedding", q]) == 2  # the same kind in search.py
    line = error_line(capsys)
    assert line.startswith(f"error: --embedding {q}: ") and "not numbers" in line, line


def test_split_on_a_list_without_splits_is_refused(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "a.png", "caption": "x"}]))
    argv = ["recall", "--model", f"internvl-g:{_fx()}", "--annotations", ann, "--split", "train"]
    assert tool("eval_retrieval")(argv) == 2
    assert "has no splits" in error_line(capsys)


def test_empty_list_file_message_names_no_split(tmp_path):
    from retrieval.finetune.data import load_pairs

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError) as e:
        load_pairs(str(empty), split="train")
    assert str(e.value) == f"{empty}: no image-caption pairs"


# -- the same kind in the other tools writing a file of their own ---------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_search_html_inside_an_index_folder_is_refused(idx, capsys, overwrite):
    before = _digest(idx / "idx")
    argv = [idx / "idx", "--embedding", _query(idx), "-k", "2", "--html", idx / "idx" / "manifest.json"]
    assert tool("search")(argv + (["--overwrite"] if overwrite else [])) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --html {idx / 'idx' / 'manifest.json'}: inside ") and "even with --overwrite" \
        in line, line
    assert _digest(idx / "idx") == before


def test_test_outputs_inside_an_index_folder_are_refused(idx):
    from internvit.run_checks import check_output_path

    for flag, path, folder in (("--out", idx / "idx" / "preds.pkl", False), ("--show-dir", idx / "idx", True),
                               ("--out", idx / "idx" / "embeddings" / "pngs", True)):
        with pytest.raises(ValueError, match="inside .*even with --overwrite"):
            check_output_path(flag, str(path), folder, True)
    check_output_path("--out", str(idx / "elsewhere.pkl"), False, True)  # outside: allowed
