"""Shared fixtures of the zero-shot tests; ``tools/`` is importable (``import zeroshot_eval``)."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)


@pytest.fixture(scope="module")
def fx():
    """The tiny InternVL-C/G fixture folder (with its tokenizer)."""
    from tests.conftest import fixture_dir

    return fixture_dir("internvl-cg-tiny")


def write_images(root, classes, n: int = 1, size: tuple = (40, 44)):
    """``root/<class>/<i>.png``: ``n`` random RGB images of ``size`` (H, W) per class; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root
