"""Library arguments that used to be silently reinterpreted are errors (issue 9 §1, last items)."""
from __future__ import annotations

import pytest
import torch

from internvit.text import encode_texts
from internvit.tokenizer import check_texts
from internvit.transforms import build_transform, preprocess_config


@pytest.fixture(scope="module")
def tokenizer():
    import internvit
    from tests.conftest import fixture_dir

    return internvit.get_tokenizer(fixture_dir("internvl-cg-tiny"))


def test_tokenizer_refuses_a_dict(tokenizer):
    """The reported case: a dict was accepted and tokenised as one row (its key)."""
    with pytest.raises(TypeError, match="got dict"):
        tokenizer({"text": "a cat"})
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        tokenizer(["a cat", 3])
    with pytest.raises(TypeError):
        tokenizer(b"bytes")
    with pytest.raises(TypeError):
        tokenizer(t for t in ["a"])
    assert tokenizer("a cat").shape == (1, tokenizer.max_length)
    assert tokenizer(("a", "b")).shape == (2, tokenizer.max_length)
    assert tokenizer([]).shape == (0, tokenizer.max_length)


def test_tokenizer_context_length_zero_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="context_length=0"):
        tokenizer(["a"], context_length=0)
    fixed = len(tokenizer.encode(""))  # BOS + the prefix + EOS: a shorter length leaves no room for text
    with pytest.raises(ValueError, match=f"context_length={fixed} leaves no room"):
        tokenizer(["a"], context_length=fixed)
    assert tokenizer(["a"], context_length=fixed + 1).shape == (1, fixed + 1)


def test_check_texts():
    assert check_texts("x") == ["x"] and check_texts(("a", "b")) == ["a", "b"]
    for bad in ({"a": 1}, {"a"}, 3, None):
        with pytest.raises(TypeError):
            check_texts(bad)


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(100, 4)

    def encode_text(self, ids):
        return self.emb(ids % 100)


def test_encode_texts_refuses_dicts_and_empty(tokenizer):
    model = _Linear()
    with pytest.raises(TypeError, match="got dict"):
        encode_texts(model, tokenizer, {"a": "b"})
    with pytest.raises(ValueError, match="no texts"):
        encode_texts(model, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size"):
        encode_texts(model, tokenizer, ["a"], batch_size=0)
    out = encode_texts(model, tokenizer, "one text")
    assert out.shape == (1, 4)


@pytest.mark.parametrize("field,value", [("image_size", 0), ("image_size", -5), ("image_size", 2.5),
                                         ("mean", []), ("mean", [0.5, 0.5]), ("std", [0.2, 0.0, 0.2]),
                                         ("interpolation", "lanczos")])
def test_preprocess_values_are_checked(field, value):
    """The reported case: ``image_size=0`` silently meant 224 (``0 or default``); so did an empty mean."""
    with pytest.raises(ValueError, match=field):
        preprocess_config(None, **{field: value})
    with pytest.raises(ValueError, match=field):
        build_transform({**preprocess_config(None), field: value})


def test_preprocess_none_keeps_the_default():
    p = preprocess_config(None, image_size=None)
    assert p["image_size"] == 224 and len(p["mean"]) == 3
    assert preprocess_config(None, image_size=14)["image_size"] == 14


def test_feature_extractor_image_size_zero():
    import internvit
    from internvit.features import FeatureExtractor

    model = internvit.build_model("internvit-6b-tiny")
    with pytest.raises(ValueError, match="image_size"):
        FeatureExtractor(model, dict(image_size=0))


def test_templates_file_missing_or_name_mistyped(tmp_path):
    """The reported case: ``--templates /nope.txt`` or a mistyped set name gave the 80 ImageNet templates."""
    from classification.zero_shot import load_templates, resolve_classnames, resolve_templates

    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_templates("/nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_templates("nope.json")
    with pytest.raises(ValueError, match="did you mean imagenet1k"):
        resolve_templates("imagenet1kk")
    with pytest.raises(ValueError, match="unknown template set"):
        load_templates("en", "no-such-dataset")
    with pytest.raises(ValueError, match="empty"):
        resolve_templates([])
    with pytest.raises(TypeError):
        resolve_templates({"a": "{c}"})
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_templates(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.json").write_text("[\"a {c}\",")
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON"):
        resolve_templates(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="names.txt"):
        resolve_classnames("/nope/names.txt", ["a", "b"])
    # what stays valid: a known dataset without its own list uses ImageNet's (CLIP_benchmark's rule), files work
    assert resolve_templates("imagenet-a") == load_templates("en", "imagenet1k")
    assert len(resolve_templates("cifar10")) == len(load_templates("en", "cifar10"))
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    assert resolve_templates(str(tmp_path / "t.txt")) == ["a photo of a {c}."]
