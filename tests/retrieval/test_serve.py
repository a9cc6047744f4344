"""The search service over real HTTP (uvicorn on a loopback port): our API, clip-retrieval's back-end schema,
limits, image files, micro-batching and hot reload. Every answer is compared with Retriever in-process."""
import base64
import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from retrieval.serve import ServeLimits, background_server, create_app, decode_image  # noqa: E402

from .serve_util import EVIL_CAPTIONS, build_index, get, multipart, poll_search, post  # noqa: E402

VIT = "internvit:internvit-6b-tiny"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def vit_index(root):
    return build_index(str(root), "vit", VIT)


@pytest.fixture(scope="module")
def server(vit_index):
    app = create_app([vit_index], limits=ServeLimits(max_k=50, max_text_chars=100, max_upload_bytes=200_000,
                                                     max_pixels=1_000_000, max_ids=20))
    with background_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def retriever(vit_index):
    from retrieval import Retriever

    return Retriever.load(vit_index)


def _img(vit_index, i):
    return os.path.join(os.path.dirname(vit_index), "vit_imgs", f"img_{i:03d}.png")


def _b64(path):
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def _same(results, expected_rows):
    assert [r["id"] for r in results] == [r["id"] for r in expected_rows]
    np.testing.assert_allclose([r["score"] for r in results], [r["score"] for r in expected_rows], rtol=1e-5,
                               atol=1e-6)


def test_health_and_indices(server):
    url, _ = server
    status, body, _ = get(url + "/health")
    assert status == 200 and body["status"] == "ok" and body["indices"] == {"vit": 1}
    status, body, _ = get(url + "/indices")
    (ix,) = body["indices"]
    assert (ix["name"], ix["kind"], ix["model"], ix["dim"], ix["ntotal"], ix["index_key"]) == \
        ("vit", "image", VIT, 64, 12, "Flat")
    assert ix["image_queries"] and not ix["text_queries"]


def test_image_query_json_and_upload_match_retriever(server, retriever, vit_index):
    url, _ = server
    q = _img(vit_index, 3)
    expected = retriever.search_image([q], k=5).rows[0]
    status, body, _ = post(url + "/search", {"image": _b64(q), "k": 5})
    assert status == 200, body
    _same(body["results"], expected)
    assert body["results"][0]["id"] == 3 and body["results"][0]["image_url"] == "/image/vit/3"
    assert body["results"][0]["caption"] == "Picture number 3: a grey pattern."
    with open(q, "rb") as f:
        data, ctype = multipart({"k": "5", "index": "vit"}, {"image": ("q.png", f.read())})
    status, body, _ = post(url + "/search", data, headers={"Content-Type": ctype})
    assert status == 200, body
    _same(body["results"], expected)
    # a data: URL works as base64 too
    status, body, _ = post(url + "/search", {"image": "data:image/png;base64," + _b64(q), "k": 5})
    _same(body["results"], expected)


def test_embedding_and_id_queries(server, retriever):
    url, _ = server
    v = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    status, body, _ = post(url + "/search", {"embedding": v.tolist(), "k": 4})
    assert status == 200
    _same(body["results"], retriever.search_embedding(v, 4).rows[0])
    stored = retriever.index.index.reconstruct(7)  # Flat inside IDMap: position = id here
    status, body, _ = post(url + "/search", {"id": 7, "k": 4})
    assert status == 200
    _same(body["results"], retriever.search_embedding(stored, 4).rows[0])
    assert body["results"][0]["id"] == 7
    assert post(url + "/search", {"id": 99, "k": 4})[0] == 404
    status, body, _ = post(url + "/search", {"embedding": [0.1] * 63, "k": 4})
    assert status == 422 and "dim 64" in body["error"]


@pytest.mark.parametrize("payload,status,message", [
    ({"k": 3}, 422, "exactly one of"),
    ({"id": 1, "text": "x", "k": 3}, 422, "exactly one of"),
    ({"id": 1, "k": 0}, 422, "k must be between 1 and 50"),
    ({"id": 1, "k": 51}, 422, "k must be between 1 and 50"),
    ({"id": 1, "k": "many"}, 422, "k must be an integer"),
    ({"id": -1, "k": 3}, 422, "id must be a non-negative integer"),
    ({"id": 1, "index": "nope"}, 404, "no index named 'nope'"),
    ({"text": "x" * 101}, 413, "over the limit of 100"),
    ({"text": "a red pattern"}, 422, "image-only"),
    ({"image": "not base64!!"}, 422, "not valid base64"),
    ({"image": base64.b64encode(b"garbage" * 10).decode()}, 422, "not a readable image"),
    ({"image": base64.b64encode(b"x" * 200_001).decode()}, 413, "over the limit of 200000"),
    ({"embedding": [1.0, float("nan")]}, 422, "NaN or inf"),
    ({"embedding": [1.0, "a"]}, 422, "list of numbers"),
    ({"embedding": [0.0] * 64}, 422, "all zeros"),
    ([1, 2], 422, "JSON object"),
])
def test_bad_queries_are_refused_with_json_errors(server, payload, status, message):
    url, _ = server
    body = json.dumps(payload, allow_nan=True).encode()
    got, answer, headers = post(url + "/search", body, headers={"Content-Type": "application/json"})
    assert (got, headers["content-type"]) == (status, "application/json"), answer
    assert message in answer["error"]


def test_a_refused_query_fails_alone_in_its_batch(server, retriever):
    """A query the Retriever refuses (all zeros) that shares a micro-batch with good ones gets its 422; the
    others their answers (the batch's one joint search used to fail all of them with a 500)."""
    from retrieval.serve_core import _Query

    _, app = server
    rng = np.random.default_rng(3)
    good = rng.standard_normal((2, 64)).astype(np.float32)
    batch = [_Query("vector", good[0], 3, None), _Query("vector", np.zeros(64, np.float32), 3, None),
             _Query("vector", good[1], 3, None), _Query("id", 5, 3, None)]
    out = app.state.batchers["vit"]._work(batch)
    assert out[1].status == 422 and "all zeros" in out[1].message
    for i, v in ((0, good[0]), (2, good[1]), (3, retriever.index.index.reconstruct(5))):
        rows, _ = out[i]
        assert [r["id"] for r in rows] == [r["id"] for r in retriever.search_embedding(v, 3).rows[0]]


def test_json_queries_answered_like_the_routes_with_the_security_headers(server, retriever):
    """JSON queries skip FastAPI's routing layers: same answers, errors, headers; other methods still routed."""
    url, _ = server
    status, body, _ = post(url + "/search", {"id": 5, "k": 3, "_bytes": "not a field"})  # no way to fake an upload
    assert status == 422 and "'_bytes'" in body["error"], body
    status, body, headers = post(url + "/search", {"id": 5, "k": 3})
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in headers["content-security-policy"]
    _same(body["results"], retriever.search_embedding(retriever.index.index.reconstruct(5), 3).rows[0])
    status, body, headers = post(url + "/search", b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"] and headers["x-content-type-options"] == "nosniff"
    assert get(url + "/search")[0] == 405 and get(url + "/knn-service")[0] == 405


def test_size_and_pixel_limits(server):
    url, _ = server
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000), (10, 20, 30)).save(buf, format="PNG")  # 2 Mpx in a few kB
    assert len(buf.getvalue()) < 200_000
    status, body, _ = post(url + "/search", {"image": base64.b64encode(buf.getvalue()).decode()})
    assert status == 413 and "2000x1000" in body["error"]
    big = b"{" + b" " * 400_000 + b"}"  # over the body limit (derived from the upload limit)
    status, body, _ = post(url + "/search", big, headers={"Content-Type": "application/json"})
    assert status == 413 and "request body" in body["error"]
    assert post(url + "/search", b"{not json", headers={"Content-Type": "application/json"})[0] == 400
    assert post(url + "/metadata", {"ids": list(range(21)), "indice_name": "vit"})[0] == 413
    with pytest.raises(Exception) as e:
        decode_image(buf.getvalue(), 1_000_000)
    assert e.value.status == 413


def test_decode_image_refuses_pil_bombs_in_parallel_without_global_state(monkeypatch):
    """Query images are decoded in parallel threads: PIL's bomb limit is enforced without touching the
    process-wide warning filters, and an image over it is a 413 even when ``max_pixels`` is higher."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (60, 50), (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    filters = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        assert all(im.size == (60, 50) for im in pool.map(lambda _: decode_image(data, 10_000), range(64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns in open(); the refusal must not depend on the filters
        with pytest.raises(Exception) as e:
            decode_image(data, 10_000)
    assert e.value.status == 413 and "decompression-bomb limit of 2000" in e.value.message
    assert warnings.filters == filters


def test_image_files_only_from_metadata(server, vit_index):
    url, _ = server
    status, raw, headers = get(url + "/image/vit/4")
    with open(_img(vit_index, 4), "rb") as f:
        assert status == 200 and raw == f.read() and headers["content-type"] == "image/png"
    status, raw, headers = get(url + "/thumb/vit/4")
    assert status == 200 and headers["content-type"] == "image/jpeg" and raw[:2] == b"\xff\xd8"
    for path in ("/image/vit/99", "/image/nope/1", f"/image/vit/{2 ** 63 - 1}"):
        assert get(url + path)[0] == 404, path
    # the id rule of /search and /metadata (serve_core.as_id): negative or past int64 is a 422 naming id, not a 500
    for path in ("/image/vit/-1", f"/image/vit/{2 ** 63}", f"/thumb/vit/{2 ** 64 + 4}", f"/image/vit/{-2 ** 63 - 1}"):
        status, ans, _ = get(url + path)
        assert status == 422 and ans["error"].startswith("id "), (path, ans)
    for path in ("/image/vit/..%2F..%2Fetc%2Fpasswd", "/image/vit/1.5", "/image/vit/%2e%2e"):
        assert get(url + path)[0] in (404, 422)
    assert get(url + "/image/vit/1/../../../../etc/passwd")[0] == 404


def test_page_is_served_without_external_resources(server):
    url, _ = server
    status, raw, headers = get(url + "/")
    page = raw.decode()
    assert status == 200 and "<select id=\"index\"" in page and "type=\"file\"" in page
    assert "http://" not in page and "https://" not in page
    assert "default-src 'self'" in headers["content-security-policy"]
    js = get(url + "/static/app.js")[1].decode()
    assert "innerHTML" not in js and "textContent" in js


def test_clip_retrieval_back_end_schema(server, retriever, vit_index):
    """The fields clip-retrieval's back end reads and returns (clip_back.py): /indices-list is a list of names;
    /knn-service takes text/image/image_url/embedding_input/modality/num_images/num_result_ids/indice_name/... and
    returns [{...metadata, id, similarity}]; /metadata takes {ids, indice_name} and returns [{id, metadata}]."""
    url, _ = server
    assert get(url + "/indices-list")[1] == ["vit"]
    q = _img(vit_index, 5)
    req = {"text": None, "image": _b64(q), "image_url": None, "embedding_input": None, "deduplicate": False,
           "use_safety_model": True, "use_violence_detector": True, "indice_name": "vit", "use_mclip": False,
           "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 4,
           "num_result_ids": 4}
    # clip-retrieval's ClipClient posts the JSON without a Content-Type header
    status, body, _ = post(url + "/knn-service", json.dumps(req).encode(), headers={"Content-Type": ""})
    assert status == 200
    expected = retriever.search_image([q], k=4).rows[0]
    assert [r["id"] for r in body] == [r["id"] for r in expected]
    np.testing.assert_allclose([r["similarity"] for r in body], [r["score"] for r in expected], rtol=1e-5)
    assert body[0]["caption"] == "Picture number 5: a green pattern." and body[0]["url"].endswith("/image/vit/5")
    assert get(body[0]["url"])[0] == 200
    # deduplicate=True drops results closer than 0.94 to a better one (the tiny model's images are all close)
    status, dedup, _ = post(url + "/knn-service", dict(req, deduplicate=True))
    assert status == 200 and [r["id"] for r in dedup] == [5]
    status, body, _ = post(url + "/knn-service", dict(req, image=None, embedding_input=[0.0] * 63 + [1.0]))
    assert status == 200 and len(body) == 4
    for bad, msg in [(dict(req, image=None, image_url="http://127.0.0.1:9/x.png"), "never fetches URLs"),
                     (dict(req, modality="text"), "modality='image'"),
                     (dict(req, image=None), "must fill one of"),
                     (dict(req, use_mclip=True), "use_mclip")]:
        status, body, _ = post(url + "/knn-service", bad)
        assert status == 422 and msg in body["error"], body
    status, body, _ = post(url + "/metadata", {"ids": [1, 0], "indice_name": "vit"})
    assert status == 200 and [b["id"] for b in body] == [1, 0]
    assert body[1]["metadata"]["caption"] == EVIL_CAPTIONS[0]
    assert body[0]["metadata"]["path"].endswith("img_001.png")


def test_concurrent_queries_are_micro_batched(vit_index, retriever):
    """Queries that wait while a batch runs are encoded together in the next batch, each with its own answer.
    Deterministic: the first batch holds the worker until all the other queries are pending (a statistical
    version, 32 threads released at once, got batches of one on a loaded 2-core CI host: the arrivals spread
    out by more than a query's service time, so nothing was waiting). inline_ms=0: once the warm-up showed lone
    queries are fast, a lone query may run on the event loop thread, and holding it there would hold the loop
    (no other query could arrive), not the worker."""
    app = create_app([vit_index], batch_wait_ms=20.0, inline_ms=0)
    paths = [_img(vit_index, i % 12) for i in range(32)]
    expected = {p: retriever.search_image([p], k=3).rows[0] for p in set(paths)}
    answers, errors = {}, []
    gate = threading.Event()

    def client(i):
        try:
            status, body, _ = post(url + "/search", {"image": _b64(paths[i]), "k": 3})
            assert status == 200, body
            answers[i] = body["results"]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    with background_server(app) as url:
        b = app.state.batchers["vit"]
        post(url + "/search", {"image": _b64(paths[0]), "k": 3})  # warm-up: a batch of one
        work = b._work

        def held(batch):  # the first concurrent batch holds the worker until every other query is pending
            gate.wait(60)
            return work(batch)

        b._work = held
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(paths))]
        threads[0].start()
        deadline = time.monotonic() + 60
        while not b.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        for t in threads[1:]:
            t.start()
        while b.pending < len(paths) and time.monotonic() < deadline:
            time.sleep(0.01)
        b._work = work
        gate.set()
        for t in threads:
            t.join(60)
    assert b.inlined == 0 and not errors and len(answers) == len(paths)
    for i, p in enumerate(paths):
        _same(answers[i], expected[p])
    # warm-up, the held first query, then the 31 that waited: one encoder call for all of them
    assert (b.queries, b.batches, b.largest_batch) == (len(paths) + 1, 3, len(paths) - 1)


def test_images_arriving_while_the_worker_is_busy_are_prepared_ahead(vit_index, retriever):
    """Image queries that arrive during a running batch are decoded and preprocessed in parallel with it; each
    still gets exactly its own answer (or its own error), and a lone query is not prepared ahead. (inline_ms=0:
    the first query must hold the worker thread, not the event loop, for the others to arrive.)"""
    app = create_app([vit_index], batch_wait_ms=0, inline_ms=0)
    paths = [_img(vit_index, i) for i in range(6)]
    bodies = [{"image": _b64(p), "k": 3} for p in paths] + [{"image": base64.b64encode(b"not an image").decode()}]
    answers: dict = {}
    gate = threading.Event()

    def client(i):
        answers[i] = post(url + "/search", bodies[i])[:2]

    with background_server(app) as url:
        b = app.state.batchers["vit"]
        assert post(url + "/search", bodies[0])[0] == 200 and b.prepared_ahead == 0  # lone: straight to the worker
        work = b._work

        def held(batch):  # the first batch holds the worker until every other query has arrived
            gate.wait(60)
            return work(batch)

        b._work = held
        first = threading.Thread(target=client, args=(0,))
        first.start()
        deadline = time.monotonic() + 60
        while not b.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        rest = [threading.Thread(target=client, args=(i,)) for i in range(1, len(bodies))]
        for t in rest:
            t.start()
        while (b.pending + len(answers) < len(bodies) or b.preparing) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in [first] + rest:
            t.join(60)
    assert b.prepared_ahead == len(paths) - 1  # every good image but the one that started the batch
    for i, p in enumerate(paths):
        status, body = answers[i]
        assert status == 200, body
        _same(body["results"], retriever.search_image([p], k=3).rows[0])
    status, body = answers[len(paths)]
    assert status == 422 and "not a readable image" in body["error"]


def test_lone_queries_run_inline_with_the_same_answers(tmp_path, vit_index, retriever):
    """On an idle service, once lone queries are known to be fast (the first goes to the worker thread, which
    times it), a lone query runs on the event loop thread: same answers and errors as the worker's. An image
    of more than ``inline_pixels`` pixels goes to the worker, and so does every query with inline_ms=0."""
    from PIL import Image

    paths = [_img(vit_index, i) for i in range(4)]
    big = str(tmp_path / "big.png")  # 1.1 MP > the default inline_pixels (1 MiP)
    Image.open(paths[0]).convert("RGB").resize((1100, 1000)).save(big)
    for inline_ms, inlined in [(60_000.0, len(paths)), (0.0, 0)]:  # 60 s: never too slow on a busy machine
        app = create_app([vit_index], inline_ms=inline_ms)
        with background_server(app) as url:
            b = app.state.batchers["vit"]
            for p in paths:
                status, body, _ = post(url + "/search", {"image": _b64(p), "k": 3})
                assert status == 200, body
                _same(body["results"], retriever.search_image([p], k=3).rows[0])
            status, body, _ = post(url + "/search", {"embedding": [0.5] * 64, "k": 2})
            assert status == 200 and len(body["results"]) == 2
            assert (b.inlined, b.queries, b.batches) == (inlined, len(paths) + 1, len(paths) + 1)  # all but the 1st
            status, body, _ = post(url + "/search", {"image": base64.b64encode(b"not an image").decode()})
            assert status == 422 and "not a readable image" in body["error"]
            status, body, _ = post(url + "/search", {"image": _b64(big), "k": 3})
            assert status == 200, body
            _same(body["results"], retriever.search_image([big], k=3).rows[0])
            # the bad image: refused from its header on the loop when inline, by the worker otherwise
            assert b.inlined == inlined and b.queries == len(paths) + 2 + (inline_ms == 0)


def test_each_answer_leaves_in_one_send(server, vit_index):
    """Status line, headers and body of an answer go out in one send (retrieval.serve_http; uvicorn alone
    writes the head and the body separately): the first read after a request holds the whole answer."""
    import socket
    from urllib.parse import urlsplit

    url, _ = server
    u = urlsplit(url)
    body = json.dumps({"image": _b64(_img(vit_index, 1)), "k": 3}).encode()
    requests = [b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(body) + body,
                b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"]  # 422 from the fast path
    with socket.create_connection((u.hostname, u.port), timeout=60) as sk:
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(3):
            for req in requests:
                sk.sendall(req)
                data = sk.recv(1 << 20)
                head, sep, rest = data.partition(b"\r\n\r\n")
                length = [int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                          if k.strip().lower() == b"content-length"]
                assert sep and length and len(rest) == length[0], data[:200]
                assert json.loads(rest)


def test_hot_reload_serves_each_commit_whole(tmp_path, vit_index):
    from retrieval.encoders import load_encoder
    from retrieval.pipeline import index_images

    from .helpers import make_images

    idx = str(tmp_path / "idx")
    shutil.copytree(vit_index, idx)
    app = create_app({"live": idx}, reload_interval_s=0.1)
    new_imgs = str(tmp_path / "more")
    make_images(new_imgs, 4, seed=7)
    seen, stop, errors = [], threading.Event(), []

    with background_server(app) as url:
        assert post(url + "/search", {"id": 13, "index": "live"})[0] == 404
        t = threading.Thread(target=poll_search, args=(url, "live", seen, errors, stop))
        t.start()
        index_images(new_imgs, idx, load_encoder(VIT), add=True, progress=False)
        deadline = time.monotonic() + 30
        while get(url + "/health")[1]["indices"]["live"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        t.join()
        assert get(url + "/health")[1]["indices"]["live"] == 2
        status, body, _ = post(url + "/search", {"id": 13, "k": 1, "index": "live"})
        assert status == 200 and body["results"][0]["id"] == 13 and body["generation"] == 2
        assert body["results"][0]["path"].endswith("more/img_001.png")
        # each answer is one commit: 12 vectors in generation 1, 16 in generation 2, never a mix
        assert not errors and {(g, n, m) for g, n, m in seen} <= {(1, 12, 11), (2, 16, 15)}
        assert (2, 16, 15) in seen

        # a commit whose files are missing is not served; the service keeps the last good state
        manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
        broken = dict(manifest, index_file="missing.index", ntotal=99)
        (tmp_path / "idx" / "manifest.json").write_text(json.dumps(broken))
        deadline = time.monotonic() + 10
        while get(url + "/indices")[1]["indices"][0]["reload_error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ix = get(url + "/indices")[1]["indices"][0]
        assert ix["generation"] == 2 and ix["ntotal"] == 16 and "missing" in ix["reload_error"]
        assert post(url + "/search", {"id": 13, "k": 1, "index": "live"})[0] == 200
        # the next commit is picked up again
        (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
        deadline = time.monotonic() + 10
        while get(url + "/health")[1]["indices"]["live"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        ix = get(url + "/indices")[1]["indices"][0]
        assert ix["generation"] == 3 and ix["ntotal"] == 16 and ix["reload_error"] is None


def test_relative_image_paths_and_several_indexes(tmp_path, monkeypatch, vit_index):
    """Paths recorded relative to the build folder resolve against --image-root; two indexes are served by name."""
    from retrieval.encoders import load_encoder
    from retrieval.pipeline import index_images

    from .helpers import make_images

    make_images(str(tmp_path / "data" / "pics"), 3)
    monkeypatch.chdir(tmp_path / "data")
    index_images("pics", str(tmp_path / "rel"), load_encoder(VIT), progress=False)
    monkeypatch.chdir(tmp_path)
    app = create_app([str(tmp_path / "rel"), f"other={vit_index}"], image_root=str(tmp_path / "data"))
    with background_server(app) as url:
        assert get(url + "/indices-list")[1] == ["rel", "other"]
        status, raw, _ = get(url + "/image/rel/2")
        assert status == 200 and raw == (tmp_path / "data" / "pics" / "img_002.png").read_bytes()
        status, body, _ = post(url + "/search", {"id": 2, "k": 1})
        assert status == 422 and "several indexes" in body["error"]
        assert post(url + "/search", {"id": 2, "k": 1, "index": "other"})[0] == 200


def test_serve_cli_refuses_remote_host_and_bad_folders(tmp_path, capsys, vit_index):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("serve_cli", os.path.join(root, "tools", "serve.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import socket

    from internvit.cli import run

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    for argv, msg in [([vit_index, "--host", "0.0.0.0"], "--allow-remote"),
                      ([vit_index, "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
                      ([str(tmp_path / "none")], "no such folder"),
                      ([str(tmp_path)], "no manifest.json"),
                      ([vit_index, "--max-k", "0"], "argument --max-k")]:
        with pytest.raises(SystemExit) if "argument" in msg else _noop():
            rc = run(mod.main, argv)
            assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    taken.close()


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("key", ["HNSW8", "IVF4,Flat", "OPQ4,IVF4,PQ4"])
def test_more_like_this_on_every_index_type(tmp_path, key):
    """Search by id reconstructs the stored vector from HNSW (inside IDMap), IVF and OPQ+IVF-PQ indexes."""
    from retrieval import Retriever, build_index

    from .helpers import mixture

    x = mixture(300, d=16, seed=1)
    build_index(x, str(tmp_path / "ix"), index_key=key, metadata={"caption": [f"row {i}" for i in range(300)]},
                progress=False)
    r = Retriever.load(str(tmp_path / "ix"))
    if "PQ" in key:  # a lossy code: the stored vector is what faiss decodes
        import faiss

        faiss.extract_index_ivf(r.index).make_direct_map(True)
    with background_server(create_app([str(tmp_path / "ix")])) as url:
        for id_ in (0, 17, 299):
            status, body, _ = post(url + "/search", {"id": id_, "k": 5})
            assert status == 200, body
            stored = r.index.reconstruct(id_) if "PQ" in key else x[id_]  # Flat storage: the vector itself
            _same(body["results"], r.search_embedding(stored, 5).rows[0])
            assert body["results"][0]["caption"] == f"row {body['results'][0]['id']}"
        assert post(url + "/search", {"id": 300, "k": 5})[0] == 404


def test_background_server_leaves_the_process_logging_alone(tmp_path):
    """An in-process server must not close other handlers: uvicorn's default log config did, and an mmengine
    runner's log file handler then failed at its next write (seen as init_weights crashing in a later test)."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_instance(f"serve-logging-{os.getpid()}", log_file=str(tmp_path / "run.log"))
    handler = next(h for h in logger.handlers if isinstance(h, logging.FileHandler))

    async def app(scope, receive, send):  # the smallest ASGI app: lifespan only
        while scope["type"] == "lifespan":
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return

    with background_server(app):
        pass
    assert handler.stream is not None and not handler.stream.closed
    logger.info("still writable")
    handler.flush()
    assert "still writable" in (tmp_path / "run.log").read_text()
