"""Shared by the search-service tests: small real indexes (tiny encoders) and a plain HTTP client."""
import json
import os
import urllib.error
import urllib.request

from .helpers import make_images

#: captions that must show as text in the page and never run (the browser test checks both)
EVIL_CAPTIONS = {0: "<script>window.__pwned = 1</script> caption zero",
                 1: '"><img src=x onerror="window.__pwned = 2"> caption one'}


def build_index(root: str, name: str, spec: str, n: int = 12, *, evil: bool = True, kind: str = "img") -> str:
    """Generated images (+ captions, two of them hostile) indexed with encoder ``spec``; returns the index dir."""
    from retrieval.encoders import load_encoder
    from retrieval.pipeline import index_images

    imgs = os.path.join(root, f"{name}_imgs")
    make_images(imgs, n)
    if evil:
        for i, cap in EVIL_CAPTIONS.items():
            with open(os.path.join(imgs, f"img_{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(cap)
    out = os.path.join(root, name)
    index_images(imgs, out, load_encoder(spec), kind=kind, progress=False)
    return out


def request(method: str, url: str, body=None, headers=None, timeout: float = 60.0):
    """``(status, parsed JSON or raw bytes, headers)``; HTTP errors are returned, not raised."""
    data = body
    hdrs = dict(headers or {})
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, h = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, raw, h = e.code, e.read(), e.headers
    if (h.get("content-type") or "").startswith("application/json"):
        return status, json.loads(raw), h
    return status, raw, h


def post(url: str, body, **kw):
    return request("POST", url, body, **kw)


def get(url: str, **kw):
    return request("GET", url, **kw)


def multipart(fields: dict, files: dict) -> tuple:
    """``(body, content_type)`` of a multipart/form-data request (files: ``{name: (filename, bytes)}``)."""
    boundary = "----internvit-test-boundary"
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (fname, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{fname}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def poll_search(url: str, index: str, seen: list, errors: list, stop) -> None:
    """Until ``stop`` is set: search ``index`` by one fixed embedding (k=50) and record each answer's
    ``(generation, number of results, largest id)`` in ``seen`` (non-200 bodies in ``errors``): what the hot
    reload tests check for "never a mix of two states"."""
    while not stop.is_set():
        status, body, _ = post(url + "/search", {"embedding": [0.125] * 64, "k": 50, "index": index})
        if status != 200:
            errors.append(body)
            continue
        seen.append((body["generation"], len(body["results"]), max(r["id"] for r in body["results"])))
