"""A group of index folders served as one index (NAME=DIR1,DIR2): every answer equals ShardedRetriever
in-process, ids are global, images come from the member that holds the id, a commit to any member reloads the
group whole, and mismatched members or a bad group spec are refused in one line."""
import base64
import importlib.util
import os
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from retrieval.faiss_ops import IndexMismatchError  # noqa: E402
from retrieval.serve import background_server, create_app  # noqa: E402
from retrieval.sharded import ShardedRetriever, parse_group, set_id_offset  # noqa: E402

from .helpers import make_images, mixture  # noqa: E402
from .serve_util import get, poll_search, post  # noqa: E402

VIT = "internvit:internvit-6b-tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OFFSETS = {"part_a": 0, "part_b": 100, "part_c": 200}
N = 8  # images per member


def _build(root, name: str, n: int = N, seed: int = 0) -> str:
    from retrieval.encoders import load_encoder
    from retrieval.pipeline import index_images

    imgs = os.path.join(root, f"{name}_imgs")
    make_images(imgs, n, seed=seed)
    out = os.path.join(root, name)
    index_images(imgs, out, load_encoder(VIT), progress=False)
    if OFFSETS.get(name):
        set_id_offset(out, OFFSETS[name])
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve_sharded"))
    return [_build(root, name, seed=i + 1) for i, name in enumerate(OFFSETS)]


@pytest.fixture(scope="module")
def sharded(parts):
    return ShardedRetriever.load(parts)


@pytest.fixture(scope="module")
def server(parts):
    # the list form with a NAME=DIR1,DIR2,DIR3 group next to a plain folder (named by its base name)
    app = create_app([f"all={','.join(parts)}", parts[0]])
    with background_server(app) as url:
        yield url, app


def _img(part: str, i: int) -> str:
    return os.path.join(os.path.dirname(part), f"{os.path.basename(part)}_imgs", f"img_{i:03d}.png")


def _b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def _same(results, expected_rows):
    assert [r["id"] for r in results] == [r["id"] for r in expected_rows]
    np.testing.assert_allclose([r["score"] for r in results], [r["score"] for r in expected_rows], rtol=1e-5,
                               atol=1e-6)


def test_group_is_one_index_with_its_members(server, parts):
    url, _ = server
    assert get(url + "/indices-list")[1] == ["all", "part_a"]
    assert get(url + "/health")[1]["indices"] == {"all": 1, "part_a": 1}
    group, single = get(url + "/indices")[1]["indices"]
    assert (group["name"], group["kind"], group["model"], group["dim"], group["ntotal"], group["index_key"]) == \
        ("all", "image", VIT, 64, 3 * N, "Flat")
    assert [(m["index_dir"], m["id_offset"], m["ntotal"]) for m in group["members"]] == \
        [(os.path.abspath(p), OFFSETS[os.path.basename(p)], N) for p in parts]
    assert single["ntotal"] == N and "members" not in single
    assert "<select id=\"index\"" in get(url + "/")[1].decode()  # the page lists the names it gets above


def test_group_search_equals_sharded_retriever(server, sharded, parts):
    url, _ = server
    v = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    expected = sharded.search_embedding(v, 3 * N).rows[0]
    status, body, _ = post(url + "/search", {"embedding": v.tolist(), "k": 3 * N, "index": "all"})
    assert status == 200, body
    _same(body["results"], expected)
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)  # merged by score across the members
    ids = sorted(r["id"] for r in body["results"])
    assert ids == [o + i for o in OFFSETS.values() for i in range(N)]  # every global id, once
    for r in body["results"]:  # each row is its member's metadata row, under the global id
        member = parts[r["id"] // 100]
        assert r["path"] == os.path.abspath(_img(member, r["id"] % 100))
        assert r["image_url"] == f"/image/all/{r['id']}"
    # an image query (upload from member b) and a more-like-this query by a global id of member c
    q = _img(parts[1], 5)
    status, body, _ = post(url + "/search", {"image": _b64(q), "k": 6, "index": "all"})
    assert status == 200, body
    _same(body["results"], sharded.search_image([q], k=6).rows[0])
    assert body["results"][0]["id"] == 105
    status, body, _ = post(url + "/search", {"id": 203, "k": 6, "index": "all"})
    assert status == 200, body
    stored = sharded.retrievers[2].index.index.reconstruct(3)  # Flat inside IDMap: position = local id
    _same(body["results"], sharded.search_embedding(stored, 6).rows[0])
    assert body["results"][0]["id"] == 203
    for missing in (8, 150, 10_000):  # in a gap between the members' ranges, or past the end
        assert post(url + "/search", {"id": missing, "k": 3, "index": "all"})[0] == 404


def test_images_by_global_id_come_from_the_member(server, parts):
    url, _ = server
    for part, offset in zip(parts, OFFSETS.values()):
        for i in (0, N - 1):
            status, raw, headers = get(url + f"/image/all/{offset + i}")
            with open(_img(part, i), "rb") as f:
                assert status == 200 and raw == f.read() and headers["content-type"] == "image/png"
        status, raw, headers = get(url + f"/thumb/all/{offset + 2}")
        assert status == 200 and headers["content-type"] == "image/jpeg" and raw[:2] == b"\xff\xd8"
    for path in ("/image/all/8", "/image/all/99", "/image/all/208", "/thumb/all/150"):
        assert get(url + path)[0] == 404
    assert get(url + "/image/all/-1")[0] == 422  # not an id at all: the id rule of every endpoint


def test_clip_retrieval_api_on_the_group(server, sharded, parts):
    url, _ = server
    q = _img(parts[2], 4)
    req = {"text": None, "image": _b64(q), "image_url": None, "embedding_input": None, "deduplicate": False,
           "use_safety_model": False, "use_violence_detector": False, "indice_name": "all", "use_mclip": False,
           "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 7,
           "num_result_ids": 7}
    status, body, _ = post(url + "/knn-service", req)
    assert status == 200, body
    expected = sharded.search_image([q], k=7).rows[0]
    assert [r["id"] for r in body] == [r["id"] for r in expected] and body[0]["id"] == 204
    np.testing.assert_allclose([r["similarity"] for r in body], [r["score"] for r in expected], rtol=1e-5)
    for r in body:
        assert r["url"].endswith(f"/image/all/{r['id']}") and get(r["url"])[0] == 200
    # deduplicate reads the stored vectors of ids in different members
    status, dedup, _ = post(url + "/knn-service", dict(req, deduplicate=True))
    assert status == 200 and dedup[0]["id"] == 204 and {r["id"] for r in dedup} <= {r["id"] for r in body}
    status, body, _ = post(url + "/metadata", {"ids": [105, 2, 207, 50], "indice_name": "all"})
    assert status == 200 and [b["id"] for b in body] == [105, 2, 207, 50]
    assert body[0]["metadata"]["path"] == os.path.abspath(_img(parts[1], 5))
    assert body[1]["metadata"]["path"] == os.path.abspath(_img(parts[0], 2))
    assert body[2]["metadata"]["caption"] == "Picture number 7: a grey pattern." and body[3]["metadata"] == {}


def test_a_commit_to_any_member_reloads_the_group_whole(tmp_path, parts):
    from retrieval.encoders import load_encoder
    from retrieval.pipeline import index_images

    copies = []
    for p in parts:
        copies.append(str(tmp_path / os.path.basename(p)))
        shutil.copytree(p, copies[-1])
    app = create_app({"all": copies}, reload_interval_s=0.1)
    make_images(str(tmp_path / "more"), 4, seed=9)
    seen, stop, errors = [], threading.Event(), []

    def wait(cond, what):
        deadline = time.monotonic() + 30
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cond(), what

    def gen():
        return get(url + "/health")[1]["indices"]["all"]

    with background_server(app) as url:
        assert post(url + "/search", {"id": 208, "index": "all"})[0] == 404
        t = threading.Thread(target=poll_search, args=(url, "all", seen, errors, stop))
        t.start()
        index_images(str(tmp_path / "more"), copies[2], load_encoder(VIT), add=True, progress=False)  # --add
        wait(lambda: gen() >= 2, "the group did not reload after a member's add")
        time.sleep(0.3)
        stop.set()
        t.join()
        assert gen() == 2
        # each answer is one state of the whole group: 24 vectors in generation 1, 28 in 2, never a mix
        assert not errors and set(seen) <= {(1, 3 * N, 207), (2, 3 * N + 4, 211)} and (2, 3 * N + 4, 211) in seen
        status, body, _ = post(url + "/search", {"id": 210, "k": 1, "index": "all"})
        assert status == 200 and body["results"][0]["id"] == 210 and body["generation"] == 2
        assert body["results"][0]["path"].endswith("more/img_002.png")
        assert get(url + "/image/all/210")[1] == (tmp_path / "more" / "img_002.png").read_bytes()
        ix = get(url + "/indices")[1]["indices"][0]
        assert ix["ntotal"] == 3 * N + 4 and [m["ntotal"] for m in ix["members"]] == [N, N, N + 4]

        # a member's commit that cannot join the group (its ids now overlap member a's) is not served: the
        # group keeps its last good state and reports why; fixing it is picked up again
        set_id_offset(copies[1], 4)
        wait(lambda: get(url + "/indices")[1]["indices"][0]["reload_error"] is not None, "no reload error")
        ix = get(url + "/indices")[1]["indices"][0]
        assert ix["generation"] == 2 and "overlap" in ix["reload_error"] and "part_b" in ix["reload_error"]
        assert [m["id_offset"] for m in ix["members"]] == [0, 100, 200]
        assert post(url + "/search", {"id": 105, "k": 1, "index": "all"})[1]["results"][0]["id"] == 105
        set_id_offset(copies[1], 100)
        wait(lambda: gen() == 3, "the fixed member was not picked up")
        ix = get(url + "/indices")[1]["indices"][0]
        assert ix["reload_error"] is None and ix["ntotal"] == 3 * N + 4


def test_mismatched_members_are_refused(tmp_path, parts):
    from retrieval import build_index

    build_index(mixture(50, 16, seed=1), tmp_path / "dim16", index_key="Flat", progress=False)
    set_id_offset(tmp_path / "dim16", 1000)
    with pytest.raises(IndexMismatchError, match="dimension 16 differs") as e:
        create_app({"g": [parts[0], str(tmp_path / "dim16")]})
    assert "dim16" in str(e.value) and "\n" not in str(e.value)
    shutil.copytree(parts[0], tmp_path / "copy_a")
    with pytest.raises(IndexMismatchError, match="overlap"):
        create_app({"g": [parts[0], str(tmp_path / "copy_a")]})  # both hold ids from 0
    with pytest.raises(ValueError, match="twice"):
        create_app({"g": [parts[0], parts[0]]})


def test_group_specs():
    assert parse_group("all=a,b,c") == ("all", ["a", "b", "c"])
    assert parse_group("photos=out/index") is None and parse_group("out/index") is None
    for bad, msg in [("a,b", "needs a name"), ("=a,b", "needs a name"), ("g=a,,b", "empty folder"),
                     ("g=a,", "empty folder")]:
        with pytest.raises(ValueError, match=msg):
            parse_group(bad)


def test_serve_cli_group_errors(tmp_path, capsys, parts):
    from internvit.cli import run
    from retrieval import build_index

    spec = importlib.util.spec_from_file_location("serve_cli", os.path.join(ROOT, "tools", "serve.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build_index(mixture(50, 16, seed=1), tmp_path / "dim16", index_key="Flat", progress=False)
    set_id_offset(tmp_path / "dim16", 1000)
    a, b = parts[0], parts[1]
    for argv, msg in [([f"{a},{b}"], "needs a name: NAME=DIR1,DIR2"),
                      ([f"g={a},,{b}"], "empty folder name in group 'g'"),
                      ([f"g={a},{tmp_path / 'none'}"], "none: no such folder"),
                      ([f"g={a},{tmp_path}"], "no manifest.json"),
                      ([f"g={a},{tmp_path / 'dim16'}"], "dim16: dimension 16 differs"),
                      ([f"g={a},{a}"], "given twice")]:
        assert run(mod.main, argv + ["--port", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], (argv, err)
    assert "NAME=DIR1,DIR2" in mod.__doc__


def test_relative_image_paths_resolve_in_the_member_that_holds_the_id(tmp_path, monkeypatch):
    """Two machines' parts, each recording the same relative paths (pics/img_000.png, ...) for its own images:
    the id decides which member's folder a path is relative to."""
    from retrieval import build_index

    for m, seed in (("m1", 1), ("m2", 2)):
        make_images(str(tmp_path / m / "pics"), 3, seed=seed)
        build_index(mixture(3, 16, seed=seed), tmp_path / m / "index", index_key="Flat", progress=False,
                    metadata=[{"path": f"pics/img_{i:03d}.png"} for i in range(3)])
    set_id_offset(tmp_path / "m2" / "index", 100)
    monkeypatch.chdir(tmp_path)
    app = create_app([f"g={tmp_path / 'm1' / 'index'},{tmp_path / 'm2' / 'index'}"])
    with background_server(app) as url:
        assert post(url + "/metadata", {"ids": [1, 101], "indice_name": "g"})[1][1]["metadata"]["path"] == \
            "pics/img_001.png"
        for id_, m in ((1, "m1"), (101, "m2")):
            status, raw, _ = get(url + f"/image/g/{id_}")
            assert status == 200 and raw == (tmp_path / m / "pics" / "img_001.png").read_bytes()
    assert (tmp_path / "m1" / "pics" / "img_001.png").read_bytes() != \
        (tmp_path / "m2" / "pics" / "img_001.png").read_bytes()


def test_a_member_served_alone_answers_with_its_global_ids(parts):
    """A folder with an id_offset served on its own: results, search by id, metadata and images use the same
    global ids as in its group (search by id used to reconstruct the local row of the global id)."""
    part_b = parts[1]
    with background_server(create_app([part_b])) as url:
        status, body, _ = post(url + "/search", {"id": 103, "k": 3, "index": "part_b"})
        assert status == 200, body
        assert body["results"][0]["id"] == 103 and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert all(100 <= r["id"] < 100 + N for r in body["results"])
        assert post(url + "/search", {"id": 3, "k": 3, "index": "part_b"})[0] == 404  # a local row is no id here
        status, body, _ = post(url + "/metadata", {"ids": [103], "indice_name": "part_b"})
        assert status == 200 and body[0]["id"] == 103 and body[0]["metadata"]["id"] == 103, body
        assert get(url + "/image/part_b/103")[0] == 200 and get(url + "/image/part_b/3")[0] == 404
