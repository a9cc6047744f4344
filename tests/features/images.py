"""Tiny test images written with PIL: good ones of several sizes/formats, a truncated PNG, a text file named .jpg."""
import io
import os

import numpy as np
from PIL import Image


def make_images(folder: str, n: int, seed: int = 0) -> list:
    """``n`` small RGB images of varying sizes and formats; returns their paths in sorted order."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 40 + 3 * (i % 5), 60 - 2 * (i % 4)
        ext = ("png", "JPG", "webp", "bmp")[i % 4]
        path = os.path.join(folder, f"img_{i:02d}.{ext}")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=ext.upper().replace(
            "JPG", "JPEG"))
        paths.append(path)
    return sorted(paths)


def make_bad_files(folder: str) -> dict:
    """A truncated PNG and a text file with an image extension."""
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(buf, format="PNG")
    corrupt = os.path.join(folder, "corrupt.png")
    with open(corrupt, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    not_image = os.path.join(folder, "notes.jpg")
    with open(not_image, "w") as f:
        f.write("this is not an image\n")
    return {"corrupt": corrupt, "not_image": not_image}
