"""Fixtures of the feature-extraction tests: a tiny random InternViT and a folder of tiny images."""
import os

import pytest
import torch

import internvit

from .images import make_bad_files, make_images


@pytest.fixture(scope="package")
def tiny_model():
    torch.manual_seed(0)
    return internvit.load_model("internvit-6b-tiny")


@pytest.fixture(scope="package")
def image_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("images"))
    good = make_images(folder, 6)
    bad = make_bad_files(folder)
    with open(os.path.join(folder, "readme.txt"), "w") as f:  # not an image extension: never listed
        f.write("ignored\n")
    return {"folder": folder, "good": good, **bad}
