"""clip-retrieval's own ClipClient against our server, unchanged.

clip-retrieval needs numpy < 2 (and its full install pulls torch, open_clip < 3, flask, wandb, ...), so it lives in
a throwaway venv, cached in .venv/clip-retrieval-client (ignored by git; `make clean` removes it). The package is
installed without its dependencies: its ``__init__`` imports the whole back end (flask, torch, faiss, ...), but
``clip_retrieval/clip_client.py`` itself needs only ``requests``, so the test loads that file of the installed
package by path. Without network access to PyPI (and no cached venv) the test is skipped with one line; the
JSON schema is still checked by test_serve.py::test_clip_retrieval_back_end_schema.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")

from retrieval.serve import background_server, create_app  # noqa: E402

from .serve_util import build_index  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.environ.get("INTERNVIT_CLIPTEST_VENV", os.path.join(ROOT, ".venv", "clip-retrieval-client"))
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"

CLIENT = r"""
import importlib.util, json, os, sys, sysconfig
import numpy
path = os.path.join(sysconfig.get_paths()["purelib"], "clip_retrieval", "clip_client.py")
spec = importlib.util.spec_from_file_location("clip_client", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
url, index, image = sys.argv[1:4]
img = mod.ClipClient(url=url + "/knn-service", indice_name=index, num_images=4, deduplicate=False)
dedup = mod.ClipClient(url=url + "/knn-service", indice_name=index, num_images=4)
out = {"numpy": numpy.__version__, "image": img.query(image=image), "dedup": dedup.query(image=image),
       "embedding": img.query(embedding_input=[0.0] * 63 + [1.0])}
print(json.dumps(out))
"""


def _venv_python() -> str:
    py = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".ready")
    if os.path.isfile(stamp):
        return py
    try:
        if not os.path.isfile(py):
            subprocess.run([sys.executable, "-m", "venv", VENV], check=True, capture_output=True, timeout=300)
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + ["--no-deps", CLIP_RETRIEVAL], check=True, capture_output=True, timeout=600)
        subprocess.run(pip + ["requests", "numpy<2"], check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        err = getattr(e, "stderr", b"") or b""
        line = (err.decode(errors="replace").strip().splitlines() or [str(e)])[-1]
        pytest.skip(f"cannot install {CLIP_RETRIEVAL} into a throwaway venv (needs PyPI): {line}")
    open(stamp, "w").close()
    return py


def test_clip_client_queries_our_server(tmp_path):
    from retrieval import Retriever

    py = _venv_python()
    idx = build_index(str(tmp_path), "vit", "internvit:internvit-6b-tiny", evil=False)
    query = os.path.join(str(tmp_path), "vit_imgs", "img_006.png")
    with background_server(create_app([idx])) as url:
        proc = subprocess.run([py, "-c", CLIENT, url, "vit", query], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["numpy"].startswith("1.")
    r = Retriever.load(idx)
    expected = r.search_image([query], k=4).rows[0]
    assert [h["id"] for h in out["image"]] == [e["id"] for e in expected]
    np.testing.assert_allclose([h["similarity"] for h in out["image"]], [e["score"] for e in expected], rtol=1e-5)
    assert out["image"][0]["caption"] == "Picture number 6: a blue pattern."
    assert out["image"][0]["url"] == f"{url}/image/vit/6"
    assert [h["id"] for h in out["dedup"]] == [6]  # ClipClient deduplicates by default; the tiny model's are close
    v = np.zeros(64, np.float32)
    v[-1] = 1
    assert [h["id"] for h in out["embedding"]] == [e["id"] for e in r.search_embedding(v, 4).rows[0]]
