"""Data for the retrieval tests: clustered vectors, brute-force neighbours, generated images; tools as functions."""
import importlib.util
import os

import numpy as np


def mixture(n: int, d: int = 32, centers: int = 64, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """L2-normalised Gaussian-mixture vectors: real neighbourhood structure, unlike isotropic noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d) * 3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force inner-product top-k in numpy (independent of faiss)."""
    scores = queries @ base.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def make_images(folder: str, n: int, *, size=(40, 52), captions: bool = True, seed: int = 0) -> list:
    """``n`` distinct PNGs (smooth colour fields, so different images embed differently) + caption .txt files."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for i in range(n):
        a, b, c = rng.random(3)
        img = np.stack([(np.sin(xx * a / 3 + i) + 1) * 127, (np.cos(yy * b / 3 - i) + 1) * 127,
                        np.full(size, c * 255)], -1).astype(np.uint8)
        p = os.path.join(folder, f"img_{i:03d}.png")
        Image.fromarray(img).save(p)
        if captions:
            with open(os.path.join(folder, f"img_{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(f"Picture number {i}: a {['red', 'green', 'blue', 'grey'][i % 4]} pattern.")
        paths.append(p)
    return paths


def tool(name: str):
    """``tools/<name>.py`` as a function ``call(argv) -> exit status``, run the way its ``__main__`` runs it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def call(argv):
        try:
            return mod.run(mod.main, [str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            return e.code

    return call


def error_line(capsys) -> str:
    """The one ``error:`` line a tool printed on stderr (asserted to be exactly one)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]
