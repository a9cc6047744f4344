"""internvit.fingerprint: every weight byte counts; the preprocessing is identified by all its parameters."""
import warnings

import pytest
import torch
import torchvision.transforms as T

from internvit.fingerprint import PreprocessingFingerprintWarning, preprocessing_fingerprint, weights_fingerprint
from internvit.transforms import build_transform, preprocess_config


def _sd():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(300, 301, generator=g), "a.bias": torch.randn(300, generator=g),
            "steps": torch.tensor(7)}


def test_every_byte_name_shape_and_dtype_counts():
    base = weights_fingerprint(_sd())
    assert len(base) == 64 and weights_fingerprint(_sd()) == base
    assert weights_fingerprint(_sd(), workers=1) == base == weights_fingerprint(_sd(), chunk_bytes=4096)
    for j in (0, 12345, 300 * 301 - 1):  # one bit of one value anywhere (64 samples per tensor missed most)
        sd = _sd()
        sd["a.weight"].view(-1).view(torch.int32)[j] ^= 1
        assert weights_fingerprint(sd) != base
    sd = _sd()
    sd["b.weight"] = sd.pop("a.weight")  # same bytes, another name
    assert weights_fingerprint(sd) != base
    sd = _sd()
    sd["a.weight"] = sd["a.weight"].reshape(301, 300)  # same bytes, another shape
    assert weights_fingerprint(sd) != base
    sd = _sd()
    sd["steps"] = sd["steps"].to(torch.int32)  # same value, another dtype
    assert weights_fingerprint(sd) != base


def test_cast_dtype_equals_the_cast_model():
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    fp_bf16 = weights_fingerprint(m, torch.bfloat16)
    assert fp_bf16 != weights_fingerprint(m) and fp_bf16 == weights_fingerprint(m.to(torch.bfloat16))
    with pytest.raises(ValueError, match="meta"):
        weights_fingerprint({"w": torch.empty(2, device="meta")})


def test_preprocessing_parameters_count():
    a = preprocessing_fingerprint(build_transform(preprocess_config(None)))
    b = preprocessing_fingerprint(build_transform(preprocess_config(None, image_size=448)))
    c = preprocessing_fingerprint(build_transform(preprocess_config(None, mean=(0.5, 0.5, 0.5))))
    assert a != b and a != c and a != preprocessing_fingerprint(build_transform(preprocess_config(None),
                                                                                  train=True))
    assert "size=448" in b["transform"] and "0.5" in c["transform"]
    assert {"lambda": "internvit.transforms._to_rgb"} in a["steps"]  # our own function: named, no warning
    assert preprocessing_fingerprint({"image_size": 224, "mean": [0.5]}) == {"image_size": 224, "mean": [0.5]}


def test_arbitrary_callables_are_named_and_warned():
    def my_transform(img):
        return img

    with pytest.warns(PreprocessingFingerprintWarning, match="my_transform"):
        fp = preprocessing_fingerprint(my_transform)
    assert fp["unverified_callables"] == [f"{__name__}.test_arbitrary_callables_are_named_and_warned.<locals>"
                                          f".my_transform"]
    with pytest.warns(PreprocessingFingerprintWarning):
        fp2 = preprocessing_fingerprint(T.Compose([T.Lambda(my_transform), T.Resize(32)]))
    assert "Resize(size=32" in fp2["transform"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision transforms alone: no warning
        preprocessing_fingerprint(T.Compose([T.Resize(32), T.ToTensor()]))
