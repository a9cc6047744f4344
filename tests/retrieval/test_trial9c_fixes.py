"""Search service and search findings of newcomer trial 9c (redone: an earlier fix was lost).

1. ids above 2**53: every result carries the exact ``id_str`` (JavaScript rounds a JSON number above 2**53 to
   another item's id); a string id is accepted by ``/search``.
2. index names: one needing percent-encoding works end to end (its URLs are encoded); one that cannot be routed
   (empty, ``.``, ``..``, holding ``/``) is refused at start-up.
3. request validation: one query per form too, unknown fields named, form text over the limit 413, repeated query
   parameters refused, content types case-insensitive, non-UTF-8 bodies 422, MIME base64, /knn-service's default
   ``num_images`` within ``max_k``, HEAD answered, 405 with ``Allow``.
4. an index folder deleted while served: the last good state is served, /health says "degraded" and /indices
   the ``reload_error``.
5. query vectors of any float dtype are searched; integers, complex numbers and NaN are refused naming the
   file and the dtype.
6. the 413 of too many pixels names --max-pixels; the page's limits come from /indices (browser test in
   test_serve_browser.py).
"""
import base64
import json
import os
import shutil
import time
import urllib.parse

import numpy as np
import pytest

from retrieval import build_index, write_embeddings
from retrieval.search import Retriever, check_query_dtype
from retrieval.sharded import set_id_offset

from .helpers import error_line, mixture, tool

pytest.importorskip("fastapi")

from retrieval.serve import ServeLimits, _index_names, background_server, create_app  # noqa: E402

from .serve_util import build_index as build_served  # noqa: E402
from .serve_util import get, multipart, post, request  # noqa: E402

BIG = 2**53  # the first integer above which JavaScript's numbers skip integers


@pytest.fixture(scope="module")
def vec_index(tmp_path_factory):
    """30 unit vectors of dim 16 (captions, no encoder), ids from 2**53."""
    root = tmp_path_factory.mktemp("vec")
    x = mixture(30, d=16, seed=3)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_embeddings(str(root / "emb"), x, metadata={"caption": [f"c{i}" for i in range(30)]}, shard_size=30)
    idx = str(root / "idx")
    build_index(str(root / "emb"), idx, progress=False, id_offset=BIG)
    return idx, x.astype(np.float32)


@pytest.fixture(scope="module")
def img_index(tmp_path_factory):
    """6 generated images indexed with the tiny InternViT (image queries; thumbnails), ids from 2**53."""
    root = tmp_path_factory.mktemp("img")
    idx = build_served(str(root), "photos", "internvit:internvit-6b-tiny", n=6, evil=False)
    set_id_offset(idx, BIG)
    return idx, str(root / "photos_imgs")


@pytest.fixture(scope="module")
def vec_url(vec_index):
    with background_server(create_app({"v": vec_index[0]}, limits=ServeLimits(max_k=10, max_text_chars=100))) as u:
        yield u


# ------------------------------------------------------------------------------------------ 1. ids above 2**53
def test_results_carry_the_exact_id_as_a_string_and_string_ids_are_accepted(vec_url, vec_index):
    _, x = vec_index
    for id_ in (BIG + 1, str(BIG + 1)):
        status, body, _ = post(vec_url + "/search", {"id": id_, "k": 3})
        assert status == 200, body
        assert body["results"][0]["id_str"] == str(BIG + 1)
        assert all(r["id_str"] == str(r["id"]) for r in body["results"])
    status, body, _ = post(vec_url + "/knn-service", {"embedding_input": x[7].tolist(), "indice_name": "v",
                                                       "num_images": 2})
    assert status == 200 and body[0]["id_str"] == str(BIG + 7), body
    status, body, _ = post(vec_url + "/metadata", {"indice_name": "v", "ids": [str(BIG + 3)]})
    assert status == 200 and body[0]["id_str"] == str(BIG + 3) and body[0]["metadata"]["caption"] == "c3", body


# ------------------------------------------------------------------------------------------ 2. index names
@pytest.mark.parametrize("name", ["a/b", "", ".", "..", "tab\there"])
def test_names_that_cannot_be_routed_are_refused(name, vec_index):
    if name:  # NAME=DIR on the command line ("=DIR" is a folder named by itself)
        with pytest.raises(ValueError, match="cannot appear in the service's URLs"):
            _index_names([f"{name}={vec_index[0]}"])
    with pytest.raises(ValueError, match="cannot appear in the service's URLs"):
        create_app({name: vec_index[0]})


def test_a_folder_given_as_dot_is_named_after_the_folder(vec_index, monkeypatch):
    monkeypatch.chdir(vec_index[0])
    assert _index_names(["."]) == {"idx": "."}


def test_a_name_needing_percent_encoding_works_end_to_end(img_index):
    idx, imgs = img_index
    name = "my photos #1?%é"
    with background_server(create_app({name: idx})) as url:
        png = open(os.path.join(imgs, "img_002.png"), "rb").read()
        body, ctype = multipart({"index": name, "k": "3"}, {"image": ("q.png", png)})
        status, res, _ = post(url + "/search", body, headers={"Content-Type": ctype})
        assert status == 200, res
        top = res["results"][0]
        quoted = urllib.parse.quote(name, safe="")
        assert top["thumb_url"] == f"/thumb/{quoted}/{BIG + 2}"
        assert top["image_url"] == f"/image/{quoted}/{BIG + 2}"
        for u in (top["image_url"], top["thumb_url"]):
            status, raw, h = get(url + u)
            assert status == 200 and h["content-type"].startswith("image/"), raw
        status, res, _ = post(url + "/knn-service", {"image": base64.b64encode(png).decode(), "indice_name": name,
                                                      "num_images": 1})
        assert status == 200 and res[0]["url"] == f"{url}/image/{quoted}/{BIG + 2}", res
        assert get(res[0]["url"])[0] == 200


# ------------------------------------------------------------------------------------------ 3. validation
def test_a_form_with_two_queries_is_refused_like_json(img_index):
    idx, imgs = img_index
    png = open(os.path.join(imgs, "img_001.png"), "rb").read()
    with background_server(create_app([idx])) as url:
        body, ctype = multipart({"text": "a dog"}, {"image": ("q.png", png)})
        status, res, _ = post(url + "/search", body, headers={"Content-Type": ctype})
        assert status == 422 and "exactly one" in res["error"] and "text and image" in res["error"], res
        body, ctype = multipart({"id": str(BIG)}, {"image": ("q.png", png)})
        status, res, _ = post(url + "/search", body, headers={"Content-Type": ctype})
        assert status == 422 and "exactly one" in res["error"], res
        body, ctype = multipart({"txt": "a dog"}, {})  # a typo is named, not ignored
        status, res, _ = post(url + "/search", body, headers={"Content-Type": ctype})
        assert status == 422 and "'txt'" in res["error"], res
        # base64 with MIME line breaks (every 76 characters, CRLF) is the same image
        b64 = base64.encodebytes(png).decode().replace("\n", "\r\n")
        status, res, _ = post(url + "/search", {"image": b64, "k": 1})
        assert status == 200 and res["results"][0]["id_str"] == str(BIG + 1), res


def test_unknown_json_fields_are_named(vec_url, vec_index):
    _, x = vec_index
    q = x[0].tolist()
    for path, body, field in (("/search", {"embedding": q, "K": 3}, "'K'"),
                              ("/search", {"txt": "a dog"}, "'txt'"),
                              ("/knn-service", {"embedding_input": q, "indice_name": "v", "num_image": 3},
                               "'num_image'"),
                              ("/metadata", {"indice_name": "v", "ids": [BIG], "id": 3}, "'id'")):
        status, res, _ = post(vec_url + path, body)
        assert status == 422 and field in res["error"] and "unknown field" in res["error"], (path, res)
    # a field given twice in JSON (as in a form or a query string): which one counts is not guessed
    status, res, _ = post(vec_url + "/search", b'{"embedding": %s, "k": 2, "k": 9}' % json.dumps(q).encode(),
                          headers={"Content-Type": "application/json"})
    assert status == 422 and "'k' is given more than once" in res["error"], res
    # what clip-retrieval's ClipClient sends is known
    status, res, _ = post(vec_url + "/knn-service", {
        "text": None, "image": None, "image_url": None, "embedding_input": q, "deduplicate": False,
        "use_safety_model": True, "use_violence_detector": True, "indice_name": "v", "use_mclip": False,
        "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 3, "num_result_ids": 3,
        "verbose": False})
    assert status == 200 and len(res) == 3, res


def test_form_text_over_the_limit_is_413(vec_url):
    for n in (101, 70_000):  # over max_text_chars; over the form parser's part size too
        body, ctype = multipart({"text": "a" * n}, {})
        status, res, _ = post(vec_url + "/search", body, headers={"Content-Type": ctype})
        assert status == 413, (n, res)


def test_repeated_query_parameters_are_refused(img_index):
    idx, _ = img_index
    with background_server(create_app({"p": idx})) as url:
        assert get(f"{url}/thumb/p/{BIG}?size=64")[0] == 200
        status, res, _ = get(f"{url}/thumb/p/{BIG}?size=64&size=512")
        assert status == 422 and "'size'" in res["error"], res
        # a parameter the route does not read is named, not ignored (k=1 was answered with the default k=10)
        status, res, _ = post(f"{url}/search?k=1", {"id": BIG})
        assert status == 422 and "unknown query parameter 'k'" in res["error"], res
        status, res, _ = get(f"{url}/thumb/p/{BIG}?sizes=64")
        assert status == 422 and "'sizes'" in res["error"] and "size" in res["error"], res
        assert get(f"{url}/?utm_source=x")[0] == 200  # the page takes any (links may carry some)


def test_content_types_are_case_insensitive_and_bodies_must_be_utf8(vec_url, vec_index):
    _, x = vec_index
    status, res, _ = post(vec_url + "/search", json.dumps({"embedding": x[1].tolist(), "k": 2}).encode(),
                          headers={"Content-Type": "Application/JSON"})
    assert status == 200 and res["results"][0]["id_str"] == str(BIG + 1), res
    body, ctype = multipart({"id": str(BIG + 4), "k": "2"}, {})
    status, res, _ = post(vec_url + "/search", body, headers={"Content-Type": ctype.replace(
        "multipart/form-data", "Multipart/Form-Data")})
    assert status == 200 and res["results"][0]["id_str"] == str(BIG + 4), res
    status, res, _ = post(vec_url + "/search", '{"text": "caf\u00e9"}'.encode("latin-1"),
                          headers={"Content-Type": "application/json"})
    assert status == 422 and "UTF-8" in res["error"], res
    body, ctype = multipart({"text": "PLACEHOLDER"}, {})
    body = body.replace(b"PLACEHOLDER", "caf\u00e9".encode("latin-1"))
    status, res, _ = post(vec_url + "/search", body, headers={"Content-Type": ctype})
    assert status == 422 and "UTF-8" in res["error"] and "'text'" in res["error"], res


def test_knn_default_num_images_stays_within_max_k(vec_url, vec_index):
    _, x = vec_index
    status, res, _ = post(vec_url + "/knn-service", {"embedding_input": x[0].tolist(), "indice_name": "v"})
    assert status == 200 and len(res) == 10, res  # clip-retrieval's default 100, clamped to max_k=10
    status, res, _ = post(vec_url + "/knn-service", {"embedding_input": x[0].tolist(), "indice_name": "v",
                                                      "num_images": 11})
    assert status == 422 and "num_images" in res["error"], res  # an explicit value is still checked


def test_head_is_answered_and_405_says_what_is_allowed(vec_url):
    import urllib.request

    for path in ("/health", "/indices", "/indices-list", "/"):
        with urllib.request.urlopen(urllib.request.Request(vec_url + path, method="HEAD"), timeout=60) as r:
            assert r.status == 200 and r.read() == b"", path
    status, res, h = get(vec_url + "/search")
    assert status == 405 and "POST" in h.get("allow", ""), (res, dict(h))
    status, res, h = request("DELETE", vec_url + "/health")
    assert status == 405 and "GET" in h.get("allow", ""), (res, dict(h))


def test_page_limits_are_in_indices(vec_url):
    status, res, _ = get(vec_url + "/indices")
    assert status == 200 and res["limits"]["max_k"] == 10 and res["limits"]["max_text_chars"] == 100, res


# ------------------------------------------------------------------------------------------ 4. deleted folder
def test_a_deleted_index_folder_keeps_the_last_state_and_is_reported(vec_index, tmp_path):
    src, x = vec_index
    idx = str(tmp_path / "live")
    shutil.copytree(src, idx)
    app = create_app({"live": idx}, reload_interval_s=0.05)
    with background_server(app) as url:
        assert get(url + "/health")[1]["status"] == "ok"
        shutil.rmtree(idx)
        deadline = time.monotonic() + 30
        while get(url + "/health")[1]["status"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        status, health, _ = get(url + "/health")
        assert status == 200 and health["status"] == "degraded" and "live" in health["reload_errors"], health
        err = get(url + "/indices")[1]["indices"][0]["reload_error"]
        assert err and "gone or cannot be read" in err, err
        for _ in range(3):  # still answering from the last good state
            status, res, _ = post(url + "/search", {"embedding": x[5].tolist(), "k": 2})
            assert status == 200 and res["results"][0]["id_str"] == str(BIG + 5), res
            status, res, _ = post(url + "/metadata", {"indice_name": "live", "ids": [BIG + 5]})
            assert status == 200 and res[0]["metadata"]["caption"] == "c5", res
        shutil.copytree(src, idx)  # back: reloaded, and healthy again
        deadline = time.monotonic() + 30
        while get(url + "/health")[1]["status"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(url + "/health")[1]["status"] == "ok"
        assert get(url + "/indices")[1]["indices"][0]["reload_error"] is None


# ------------------------------------------------------------------------------------------ 5. query dtypes
def test_query_vectors_of_any_float_dtype_and_no_other(vec_index, tmp_path, capsys):
    idx, x = vec_index
    r = Retriever.load(idx)
    want = r.search_embedding(x[:3], 3).ids
    for dt in (np.float16, np.float64, np.longdouble):
        np.testing.assert_array_equal(r.search_embedding(x[:3].astype(dt), 3).ids, want)
    for bad, what in ((np.ones((2, 16), np.int64), "int64"), (np.ones((2, 16), np.uint8), "uint8"),
                      (x[:2].astype(np.complex64), "complex64"), (np.ones((2, 16), bool), "bool")):
        with pytest.raises(ValueError, match=f"must be floating-point numbers, got {what}"):
            r.search_embedding(bad, 3)
    with pytest.raises(ValueError, match=r"beyond float32's range \(float64, row 1\)"):
        check_query_dtype(np.vstack([x[:1], np.full((1, 16), 1e300)]).astype(np.float64))
    search = tool("search")
    for name, arr, what in (("ints", np.arange(32).reshape(2, 16), "int64"),
                            ("cplx", x[:2].astype(np.complex128), "complex128"),
                            ("nan", np.vstack([x[:1], np.full((1, 16), np.nan)]), "NaN or inf (float64, row 1)")):
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        assert search([idx, "--embedding", path]) == 2
        line = error_line(capsys)
        assert line.startswith(f"error: --embedding {path}: ") and what in line, line
    np.save(tmp_path / "half.npy", x[:2].astype(np.float16))
    assert search([idx, "--embedding", tmp_path / "half.npy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == BIG


# ------------------------------------------------------------------------------------------ 6. --max-pixels
def test_too_many_pixels_names_the_option(img_index, capsys):
    idx, imgs = img_index
    png = open(os.path.join(imgs, "img_000.png"), "rb").read()
    with background_server(create_app([idx], limits=ServeLimits(max_pixels=100))) as url:
        status, res, _ = post(url + "/search", {"image": base64.b64encode(png).decode()})
        assert status == 413 and "--max-pixels" in res["error"], res
    assert tool("serve")([idx, "--max-pixels", str(10**12)]) == 2
    line = error_line(capsys)
    assert line.startswith("error: --max-pixels 1000000000000: ") and "PIL" in line, line


def test_public_url_for_a_service_behind_a_proxy(img_index, capsys):
    from retrieval.serve import check_public_url

    idx, imgs = img_index
    png = base64.b64encode(open(os.path.join(imgs, "img_003.png"), "rb").read()).decode()
    with background_server(create_app({"p": idx}, public_url="https://example.org/img-search/")) as url:
        status, res, _ = post(url + "/knn-service", {"image": png, "indice_name": "p", "num_images": 1})
        assert status == 200 and res[0]["url"] == f"https://example.org/img-search/image/p/{BIG + 3}", res
        status, res, _ = post(url + "/search", {"image": png, "k": 1})
        assert status == 200 and res["results"][0]["thumb_url"] == f"/img-search/thumb/p/{BIG + 3}", res
    for bad in ("ftp://example.org/", "example.org", "http://", "https://a:99999/", "http://u:p@a/",
                "http://a/?x=1", "http://a/#top", ""):
        with pytest.raises(ValueError, match="public URL"):
            check_public_url(bad)
    assert tool("serve")([idx, "--public-url", "example.org/search"]) == 2
    assert error_line(capsys).startswith("error: --public-url: public URL 'example.org/search' must start with")


def test_a_deleted_group_member_keeps_the_group_and_names_the_member(tmp_path):
    x = mixture(40, d=16, seed=5)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    members = []
    for j in range(2):
        write_embeddings(str(tmp_path / f"emb{j}"), x[20 * j:20 * (j + 1)], shard_size=20)
        members.append(str(tmp_path / f"m{j}"))
        build_index(str(tmp_path / f"emb{j}"), members[-1], progress=False, id_offset=20 * j)
    with background_server(create_app({"g": members}, reload_interval_s=0.05)) as url:
        shutil.rmtree(members[1])
        deadline = time.monotonic() + 30
        while get(url + "/health")[1]["status"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        health = get(url + "/health")[1]
        assert health["status"] == "degraded" and members[1] in health["reload_errors"]["g"], health
        status, res, _ = post(url + "/search", {"embedding": x[33].tolist(), "k": 1})
        assert status == 200 and res["results"][0]["id"] == 33, res
