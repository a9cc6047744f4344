"""The search service's input rules: every JSON body parse is a 400 at worst (deep nesting too), one integer rule
for every integer field (JSON and multipart alike), index names given once, loopback hosts, and a restart on the
same port right after a stop."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from retrieval.serve import (  # noqa: E402
    ApiError,
    _index_names,
    background_server,
    check_host,
    create_app,
    free_port,
)
from retrieval.serve_core import as_int, parse_json_body  # noqa: E402

from .serve_util import build_index, get, multipart, post  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIT = "internvit:internvit-6b-tiny"


@pytest.fixture(scope="module")
def vit_index(tmp_path_factory):
    return build_index(str(tmp_path_factory.mktemp("serve_inputs")), "vit", VIT, evil=False)


@pytest.fixture(scope="module")
def url(vit_index):
    with background_server(create_app([vit_index])) as u:
        yield u


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# ------------------------------------------------------------------------------------------ JSON bodies
def test_parse_json_body_turns_every_parser_failure_into_400():
    for body in (b"{", b"\xef\xbb\xbf", ('{"embedding": ' + _nested(2000) + "}").encode(),
                 ('{"a": ' + "{\"a\": " * 5000 + "1" + "}" * 5001).encode()):
        with pytest.raises(ApiError) as e:
            parse_json_body(body)
        assert (e.value.status, e.value.message) == (400, "the request body is not valid JSON")
    with pytest.raises(ApiError) as e:
        parse_json_body(b"[1]")
    assert e.value.status == 422
    with pytest.raises(ApiError) as e:  # not UTF-8 (trial 9c): a 422 that says so
        parse_json_body(b"\xff\xfe")
    assert e.value.status == 422 and "not UTF-8" in e.value.message
    assert parse_json_body(b'{"k": 1}') == {"k": 1}


@pytest.mark.parametrize("path,field", [("/search", "embedding"), ("/search", "index"), ("/knn-service", "text"),
                                        ("/knn-service", "indice_name"), ("/metadata", "ids")])
@pytest.mark.parametrize("ctype", ["application/json", None])
def test_deeply_nested_json_is_a_400_on_every_route(url, path, field, ctype):
    """{"index": "x", FIELD: [[[[...2000 levels...]]]]} used to be answered 500 (RecursionError). Without a
    content type /search and /metadata go through FastAPI's routes, with one /search takes the fast path."""
    body = ('{"index": "vit", "indice_name": "vit", "%s": %s}' % (field, _nested(2000))).encode()
    headers = {"Content-Type": ctype} if ctype else {}
    status, answer, h = post(url + path, body, headers=headers)
    assert (status, h["content-type"]) == (400, "application/json"), answer
    assert answer == {"error": "the request body is not valid JSON"}
    assert get(url + "/health")[0] == 200


def test_deeply_nested_multipart_fields_are_4xx(url):
    for field in ("k", "id", "index"):
        fields = {"k": "3", field: _nested(2000)} if field != "index" else {"id": "1", "index": _nested(2000)}
        body, ctype = multipart(fields, {})
        status, answer, _ = post(url + "/search", body, headers={"Content-Type": ctype})
        assert 400 <= status < 500, (field, status, answer)


# ------------------------------------------------------------------------------------------ integers
def test_as_int_is_one_rule():
    assert [as_int(v, "k") for v in (5, "5", "-3", "007", 0)] == [5, 5, -3, 7, 0]
    for bad in (True, False, 2.5, 5.0, 1e3, "2.5", "5.0", " 5", "5 ", "", "²", "٣", "0x10", "1e3", "+5", None,
                [5], {"k": 5}):
        with pytest.raises(ApiError) as e:
            as_int(bad, "k")
        assert e.value.status == 422 and e.value.message.startswith("k must be an integer"), bad


@pytest.mark.parametrize("k,ok", [(3, True), ("3", True), (2.5, False), (3.0, False), (True, False),
                                  ("2.5", False), ("²", False), ("three", False), ("-3", False)])
def test_k_and_id_follow_the_same_rule_in_json(url, k, ok):
    """Before: "k": "3" was accepted but "id": "3" refused, and "k": "²" (str.isdigit) was a 500."""
    status, body, _ = post(url + "/search", {"id": 1, "k": k})
    assert (status == 200) == ok, body
    if ok:
        assert len(body["results"]) == 3 and body["results"][0]["id"] == 1
    else:
        assert status == 422 and body["error"].startswith("k must be"), body
    status, body, _ = post(url + "/search", {"id": k, "k": 2})  # the same value, as an id
    assert (status == 200) == ok, body
    if ok:
        assert body["results"][0]["id"] == 3
    else:
        assert status == 422 and body["error"].startswith("id must be"), body


def test_integer_rule_in_multipart_knn_and_metadata(url):
    body, ctype = multipart({"id": "4", "k": "2"}, {})
    status, ans, _ = post(url + "/search", body, headers={"Content-Type": ctype})
    assert status == 200 and [r["id"] for r in ans["results"]][:1] == [4] and len(ans["results"]) == 2
    for fields, msg in (({"id": "4.0", "k": "2"}, "id must be an integer"), ({"id": "4", "k": "2.5"},
                                                                              "k must be an integer")):
        body, ctype = multipart(fields, {})
        status, ans, _ = post(url + "/search", body, headers={"Content-Type": ctype})
        assert status == 422 and ans["error"].startswith(msg), ans
    emb = [0.125] * 64
    status, ans, _ = post(url + "/knn-service", {"embedding_input": emb, "num_images": "3", "indice_name": "vit"})
    assert status == 200 and len(ans) == 3
    for bad in (2.5, True, "3.0"):
        status, ans, _ = post(url + "/knn-service", {"embedding_input": emb, "num_images": bad})
        assert status == 422 and ans["error"].startswith("num_images must be an integer"), ans
    status, ans, _ = post(url + "/knn-service", {"embedding_input": emb, "num_images": 3, "num_result_ids": 1.5})
    assert status == 422 and ans["error"].startswith("num_result_ids must be an integer"), ans
    status, ans, _ = post(url + "/knn-service", {"embedding_input": emb, "num_images": 3, "deduplicate": "false"})
    assert status == 422 and "deduplicate must be true or false" in ans["error"], ans
    status, ans, _ = post(url + "/metadata", {"ids": ["1", 2], "indice_name": "vit"})
    assert status == 200 and [r["id"] for r in ans] == [1, 2]
    assert ans[0]["metadata"]["path"].endswith("img_001.png")
    for bad in (1.5, True, "x"):
        status, ans, _ = post(url + "/metadata", {"ids": [0, bad], "indice_name": "vit"})
        assert status == 422 and ans["error"].startswith("ids[1] must be an integer"), ans


# ------------------------------------------------------------------------------------------ names and hosts
def test_duplicate_index_names_are_refused(tmp_path):
    (tmp_path / "p" / "idx").mkdir(parents=True)
    (tmp_path / "q" / "idx").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"two indexes are named 'a' \(a=x and a=y\).*NAME=DIR"):
        _index_names(["a=x", "a=y"])
    with pytest.raises(ValueError, match="two indexes are named 'idx'"):
        _index_names([str(tmp_path / "p" / "idx"), str(tmp_path / "q" / "idx")])
    assert _index_names([f"a={tmp_path / 'p' / 'idx'}", str(tmp_path / "q" / "idx")]) == {
        "a": str(tmp_path / "p" / "idx"), "idx": str(tmp_path / "q" / "idx")}


def test_serve_cli_refuses_duplicate_names_in_one_line(vit_index):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), f"a={vit_index}",
                        f"a={vit_index}", "--port", "0"], capture_output=True, text=True, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: two indexes are named 'a'"), err


def test_every_loopback_address_is_loopback():
    for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "localhost", "LocalHost", "::ffff:127.0.0.3"):
        assert check_host(host, allow_remote=False) is None, host
    for host in ("0.0.0.0", "10.0.0.1", "::", "128.0.0.1", "example.com", "localhost.example.com"):
        with pytest.raises(ValueError, match="is not a loopback address"):
            check_host(host, allow_remote=False)
        assert check_host(host, allow_remote=True).startswith("warning:")


# ------------------------------------------------------------------------------------------ restart
def _time_wait_on(port: int) -> bool:
    """Whether a TCP connection with local port ``port`` is in TIME-WAIT (Linux /proc/net/tcp, state 06)."""
    with open("/proc/net/tcp") as f:
        return any(int(cols[1].split(":")[1], 16) == port and cols[3] == "06"
                   for cols in (line.split() for line in list(f)[1:]))


def _request_until_server_closes(port: int, id_: int) -> bytes:
    body = json.dumps({"id": id_, "k": 2}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def _start(idx: str, port: int, cwd: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), idx, "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=cwd)
    deadline = time.monotonic() + 120
    while True:
        try:
            if get(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-2000:])
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


@pytest.mark.skipif(not os.path.isfile("/proc/net/tcp"), reason="needs /proc/net/tcp to see TIME-WAIT")
def test_restart_on_the_same_port_right_after_a_stop(tmp_path, vit_index):
    """The port check before loading bound without SO_REUSEADDR, so the server's own TIME-WAIT connections
    refused a restart for a minute ("Address already in use"); a live server on the port is still refused."""
    port = free_port()
    proc = _start(vit_index, port, str(tmp_path))
    try:
        for i in range(3):  # Connection: close, read to EOF: the server closes first, TIME-WAIT on its side
            assert _request_until_server_closes(port, i).startswith(b"HTTP/1.1 200")
        busy = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), vit_index, "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr, busy.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert _time_wait_on(port), "no TIME-WAIT connection left: the test would not show the bug"
    proc = _start(vit_index, port, str(tmp_path))  # at once, on the same port
    try:
        status, body, _ = post(f"http://127.0.0.1:{port}/search", {"id": 5, "k": 1})
        assert status == 200 and body["results"][0]["id"] == 5
    finally:
        proc.terminate()
        proc.wait(timeout=60)
