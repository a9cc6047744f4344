"""A bounded flood of malformed, oversized and garbage requests against `tools/serve.py` on loopback.

2,000 requests from 16 concurrent clients (raw sockets, so nothing is cleaned up by an HTTP library), finishing
by itself. Afterwards the server is still up, answered every bad request with a 4xx (never a 5xx), its RSS is within
10 % of where it stood after a warm-up, and the next good query gives the same answer as before the flood."""
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from retrieval.serve import free_port  # noqa: E402

from .serve_util import build_index, get, post  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUESTS, CLIENTS = 2000, 16


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _raw(port: int, data: bytes, timeout: float = 20.0):
    """Send raw bytes, return the status code of the answer (or the name of the socket error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError as e:  # the server may answer (413) and close before reading a huge body
            return type(e).__name__
        buf = b""
        try:
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            return type(e).__name__
    line = buf.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else f"garbled:{buf[:40]!r}"


def _http(method: str, path: str, body: bytes = b"", ctype: str = "application/json", extra: str = "") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


def _bad_requests(rng: random.Random, bomb_b64: str) -> list:
    """One of each kind of bad request; the flood cycles through them with random payloads."""
    junk = bytes(rng.getrandbits(8) for _ in range(512))
    b64junk = base64.b64encode(junk).decode()
    big_text = "x" * 5000
    boundary = "b0undary"
    mp_big = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n".encode()
              + b"\x89PNG" + b"\0" * 200_000 + f"\r\n--{boundary}--\r\n".encode())
    return [
        _http("POST", "/search", junk),
        _http("POST", "/search", b'{"image": "' + b"A" * 1000),  # truncated JSON
        _http("POST", "/search", b"{}").replace(b"Content-Length: 2", b"Content-Length: 999999999"),
        _http("POST", "/search", b"{" + b" " * 300_000 + b"}"),  # over the body limit
        _http("POST", "/search", json.dumps({"image": bomb_b64, "k": 3}).encode()),  # 25 Mpx in a few kB
        _http("POST", "/search", json.dumps({"image": b64junk, "k": 3}).encode()),
        _http("POST", "/search", json.dumps({"image": "%%%not-base64%%%"}).encode()),
        _http("POST", "/search", json.dumps({"text": big_text}).encode()),
        _http("POST", "/search", json.dumps({"id": 1, "k": 10**9}).encode()),
        _http("POST", "/search", json.dumps({"embedding": [1e300] * 64}).encode()),
        _http("POST", "/search", json.dumps({"embedding": ["x"] * 10}).encode()),
        _http("POST", "/search", b"\xff\xfe{\x00}"),  # not UTF-8
        _http("POST", "/search", b"--zzz\r\ngarbage", ctype="multipart/form-data; boundary=zzz"),
        _http("POST", "/search", mp_big, ctype=f"multipart/form-data; boundary={boundary}"),
        _http("POST", "/knn-service", json.dumps({"image_url": "http://127.0.0.1:1/a.png", "indice_name": "vit",
                                                  "modality": "image", "num_images": 3}).encode()),
        _http("POST", "/knn-service", json.dumps({"text": "a", "indice_name": ["x"] * 50}).encode()),
        _http("POST", "/metadata", json.dumps({"ids": list(range(5000)), "indice_name": "vit"}).encode()),
        _http("POST", "/metadata", json.dumps({"ids": "all", "indice_name": "vit"}).encode()),
        _http("GET", "/image/vit/..%2F..%2F..%2Fetc%2Fpasswd"),
        _http("GET", "/image/vit/999999999"),
        _http("GET", "/thumb/vit/1?size=100000"),
        _http("GET", "/image/../../etc/passwd"),
        _http("DELETE", "/search"),
        _http("GET", "/" + "a" * 8000),
        b"GARBAGE / NOT-HTTP\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 100_000 + b"\r\n\r\n",  # headers too large
        (b"POST /search HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
                                                        for _ in range(6)) + b"0\r\n\r\n"),  # chunked, too big
    ]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to read the server's RSS")
def test_flood_of_bad_requests_leaves_the_server_healthy(tmp_path):
    from PIL import Image

    idx = build_index(str(tmp_path), "vit", "internvit:internvit-6b-tiny", evil=False)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), idx, "--port", str(port),
                             "--max-upload", "128K", "--max-pixels", "1000000", "--max-text-chars", "500",
                             "--max-k", "100", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        with open(os.path.join(str(tmp_path), "vit_imgs", "img_002.png"), "rb") as f:
            good = {"image": base64.b64encode(f.read()).decode(), "k": 5}
        status, before, _ = post(url + "/search", good)
        assert status == 200 and before["results"][0]["id"] == 2

        buf = io.BytesIO()
        Image.new("L", (5000, 5000)).save(buf, format="PNG")
        bomb = base64.b64encode(buf.getvalue()).decode()
        bad = _bad_requests(random.Random(0), bomb)
        counts, lock = Counter(), threading.Lock()

        def client(seed: int, n: int):
            rng = random.Random(seed)
            for i in range(n):
                if i % 4:
                    req = bad[(seed + i) % len(bad)]
                else:  # random garbage to a random endpoint
                    junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 2048)))
                    req = _http(rng.choice(["POST", "GET", "PUT"]), rng.choice(["/search", "/knn-service",
                                                                                "/metadata", "/indices"]), junk)
                r = _raw(port, req)
                with lock:
                    counts[r] += 1

        def flood(total: int):
            per = total // CLIENTS
            threads = [threading.Thread(target=client, args=(s, per)) for s in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=600)
            assert not any(t.is_alive() for t in threads)

        flood(len(bad) * CLIENTS)  # warm-up: every kind of request, at full concurrency
        post(url + "/search", good)
        time.sleep(0.5)
        rss0 = _rss_kb(proc.pid)
        counts.clear()
        t0 = time.monotonic()
        flood(REQUESTS)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)
        rss1 = _rss_kb(proc.pid)

        assert proc.poll() is None, "the server died"
        assert sum(counts.values()) == REQUESTS
        statuses = {k: v for k, v in counts.items() if isinstance(k, int)}
        assert all(s < 500 for s in statuses), counts  # refused (or a harmless GET answered), never a 5xx
        assert sum(statuses.values()) >= REQUESTS * 0.9, counts  # socket errors only where a huge body was cut
        assert not [k for k in counts if isinstance(k, str) and k.startswith("garbled")], counts
        assert rss1 <= rss0 * 1.10, f"RSS grew from {rss0} kB to {rss1} kB ({counts})"
        assert elapsed < 600
        status, after, _ = post(url + "/search", good)
        assert status == 200 and after["results"] == before["results"]
        assert get(url + "/health")[1]["status"] == "ok"
        print(f"flood: {REQUESTS} requests in {elapsed:.1f} s, RSS {rss0} -> {rss1} kB, {dict(counts)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
