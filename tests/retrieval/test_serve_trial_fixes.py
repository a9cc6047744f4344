"""Service findings of a newcomer trial: one id rule on every endpoint (range-checked, naming the field),
/image serving only regular image files inside their folder (sniffed, not trusted by name), repeated
multipart fields refused, index names must be strings, and `tools/serve.py a=` naming its argument."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from retrieval.serve import background_server, create_app  # noqa: E402

from .serve_util import build_index, get, post  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIT = "internvit:internvit-6b-tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_trial")
    idx = build_index(str(root), "vit", VIT, n=6, evil=False)
    with background_server(create_app([idx])) as url:
        yield url, idx, str(root / "vit_imgs")


@pytest.mark.parametrize("ids,field,what", [([0, 18446744073709551616], "ids[1]", "out of range"),
                                            ([9223372036854775808], "ids[0]", "out of range"),
                                            (["9223372036854775808"], "ids[0]", "out of range"),
                                            ([1, -1], "ids[1]", "non-negative")])
def test_metadata_ids_are_range_checked_naming_the_entry(served, ids, field, what):
    url, _, _ = served
    status, ans, _ = post(url + "/metadata", {"ids": ids, "indice_name": "vit"})
    assert status == 422 and ans["error"].startswith(field) and what in ans["error"], ans


def test_search_by_id_out_of_range_says_so(served):
    url, _, _ = served
    status, ans, _ = post(url + "/search", {"id": 2**63, "k": 2})
    assert status == 422 and "out of range" in ans["error"] and "non-negative" not in ans["error"], ans
    status, ans, _ = post(url + "/search", {"id": 2**63 - 1, "k": 2})  # a valid id no index holds
    assert status == 404, ans
    status, ans, _ = post(url + "/search", {"id": 2, "k": 2})
    assert status == 200 and ans["results"][0]["id"] == 2


def test_image_and_thumb_ids_follow_the_json_rule(served):
    url, _, _ = served
    assert get(url + "/image/vit/3")[0] == 200
    for path in ("/image/vit/3.0", "/image/vit/abc", "/thumb/vit/1e3"):
        status, ans, _ = get(url + path)
        assert status == 422 and ans["error"].startswith("id must be an integer"), (path, ans)
    status, ans, _ = get(url + "/thumb/vit/3?size=abc")
    assert status == 422 and ans["error"].startswith("size must be an integer"), ans


def _form(parts) -> tuple:
    """A multipart body from ``[(name, value or (filename, bytes))]`` (names may repeat)."""
    boundary = "----trial-boundary"
    out = []
    for name, v in parts:
        if isinstance(v, tuple):
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{v[0]}"\r\n'
                       f"Content-Type: application/octet-stream\r\n\r\n".encode() + v[1] + b"\r\n")
        else:
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode())
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_multipart_repeated_fields_and_two_images_are_refused(served):
    url, _, imgs = served
    with open(os.path.join(imgs, "img_001.png"), "rb") as f:
        png = f.read()
    body, headers = _form([("image", ("a.png", png)), ("k", "2"), ("k", "3")])
    status, ans, _ = post(url + "/search", body, headers=headers)
    assert status == 422 and "'k'" in ans["error"] and "2 times" in ans["error"], ans
    body, headers = _form([("image", ("a.png", png)), ("image", ("b.png", png))])
    status, ans, _ = post(url + "/search", body, headers=headers)
    assert status == 422 and "two images" in ans["error"], ans
    body, headers = _form([("image", ("a.png", png)), ("k", "3")])
    status, ans, _ = post(url + "/search", body, headers=headers)
    assert status == 200 and len(ans["results"]) == 3


@pytest.mark.parametrize("body,field", [({"index": 5, "text": "x"}, "index"),
                                        ({"index": ["vit"], "text": "x"}, "index")])
def test_index_name_must_be_a_string(served, body, field):
    url, _, _ = served
    status, ans, _ = post(url + "/search", body)
    assert status == 422 and ans["error"].startswith(f"{field} must be a string"), ans
    status, ans, _ = post(url + "/knn-service", {"indice_name": body["index"], "text": "x"})
    assert status == 422 and ans["error"].startswith("indice_name must be a string"), ans


def test_image_serves_only_regular_image_files_inside_their_folder(tmp_path):
    idx = build_index(str(tmp_path), "vit", VIT, n=6, evil=False)
    imgs = tmp_path / "vit_imgs"
    secret = tmp_path / "secret.png"  # outside the indexed folder (an image even, so only the location refuses it)
    secret.write_bytes((imgs / "img_005.png").read_bytes())
    os.remove(imgs / "img_001.png")
    os.symlink(secret, imgs / "img_001.png")  # leads out of the folder
    (imgs / "img_002.png").write_text("root:x:0:0:root:/root:/bin/bash\n")  # not an image
    os.remove(imgs / "img_003.png")
    os.symlink(imgs / "img_004.png", imgs / "img_003.png")  # another image of the same folder: fine
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(imgs / "img_000.png", format="GIF")  # named .png, is a GIF
    with background_server(create_app([idx])) as url:
        for i in (1, 2):
            for route in ("image", "thumb"):
                status, ans, _ = get(f"{url}/{route}/vit/{i}")
                assert status == 404 and "not found" in ans["error"], (route, i, ans)
        status, raw, headers = get(url + "/image/vit/3")
        assert status == 200 and raw == (imgs / "img_004.png").read_bytes()
        assert headers["content-type"] == "image/png"
        status, raw, headers = get(url + "/image/vit/0")
        assert status == 200 and headers["content-type"] == "image/gif" and raw[:3] == b"GIF"
        # a file with an image header that cannot be decoded: the stored file is bad, not the request
        (imgs / "img_004.png").write_bytes((imgs / "img_005.png").read_bytes()[:60])
        status, ans, _ = get(url + "/thumb/vit/4")
        assert status == 404 and "cannot be read" in ans["error"], ans


def test_serve_cli_names_an_empty_folder_argument(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "a="], capture_output=True,
                       text=True, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "'a='" in lines[0], r.stderr
