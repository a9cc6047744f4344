"""Trial 10c: faults a Python API user found in feature extraction (each test failed on the code before its fix)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import internvit
from internvit.features import FeatureExtractor


@pytest.fixture(scope="module")
def tiny_vit():
    """The 6B-style tiny InternViT of the parity fixtures (real released-layout weights, 56 px)."""
    from tests.conftest import fixture_dir

    return internvit.load_model(fixture_dir("internvit-6b-style-tiny"))


# -- 1. pool / layers given with embed_fn were silently not applied ------------------------------------------
@pytest.mark.parametrize("kw", [dict(pool="mean"), dict(layers=[0, 1]), dict(pool="grid", layers=[0])])
def test_embed_fn_refuses_pool_and_layers_it_would_not_apply(tiny_vit, tmp_path, kw):
    """``layers=[0, 1]`` with an ``embed_fn`` gave the embed_fn's rows (not blocks 0 and 1) and the manifest
    recorded ``layers: [0, 1]``: a user comparing blocks got the same vector for every 'block'."""
    def embed(x: torch.Tensor) -> torch.Tensor:
        return tiny_vit(x).pooler_output

    with pytest.raises(ValueError, match=f"{next(iter(kw))}=.* with embed_fn"):
        FeatureExtractor(tiny_vit, embed_fn=embed, progress=False, **kw)
    assert not any(tmp_path.iterdir())
    # without them it still works, for a model and for model=None
    fx = FeatureExtractor(None, dict(image_size=56), embed_fn=embed, progress=False)
    img = tmp_path / "a.png"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(img)
    man = fx.write([str(img)], tmp_path / "out")
    assert man["pool"] == "embed_fn" and man["layers"] is None
