"""8-bit pixels through the loader, normalised by the extractor on its device (the accelerator path).

On an accelerator, ``FeatureExtractor`` reads images into uint8 tensors and normalises them in ``encode``
(4x fewer bytes through worker queues, pinned memory and the copy); the float32 values must be the bits
torchvision's ``ToTensor`` + ``Normalize`` give, so features do not depend on where the normalising ran.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from internvit.config import IMAGENET_MEAN, IMAGENET_STD
from internvit.features import FeatureExtractor
from internvit.transforms import ToUInt8Tensor, build_transform, normalize_pixels, preprocess_config

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)])
def test_normalize_pixels_is_torchvision_bit_for_bit(mean, std):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 17, 23), dtype=torch.uint8, generator=g)
    pixels[0, :, 0, :] = torch.arange(23, dtype=torch.uint8)  # 0 and every low value
    pixels[1, :, 0, :] = 255 - torch.arange(23, dtype=torch.uint8)
    ref = T.Normalize(mean, std)(pixels.float() / 255)
    got = normalize_pixels(pixels, mean, std)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, ref)
    assert torch.equal(normalize_pixels(pixels[2], mean, std), ref[2])  # one (3, H, W) image
    assert pixels.dtype == torch.uint8 and pixels.max() == 255  # the input is left as it was


def test_normalize_pixels_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="must be uint8, got torch.float32"):
        normalize_pixels(torch.zeros(1, 3, 4, 4), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(B, 3, H, W\), got \(1, 4, 4, 4\)"):
        normalize_pixels(torch.zeros(1, 4, 4, 4, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("resize_mode", ["crop", "squash"])
def test_uint8_transform_then_normalize_equals_the_float_transform(resize_mode):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))
    p = preprocess_config(None, image_size=28, resize_mode=resize_mode)
    pixels = build_transform(p, output_dtype=torch.uint8)(img)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 28, 28) and pixels.is_contiguous()
    assert torch.equal(normalize_pixels(pixels, p["mean"], p["std"]), build_transform(p)(img))
    assert "ToUInt8Tensor" in repr(build_transform(p, output_dtype=torch.uint8))
    with pytest.raises(ValueError, match="output_dtype must be torch.float32 .* got torch.float16"):
        build_transform(p, output_dtype=torch.float16)
    with pytest.raises(ValueError, match="8-bit RGB image, got mode 'L'"):
        ToUInt8Tensor()(img.convert("L"))


def test_encode_normalises_uint8_pixels_to_the_same_features(tiny_model):
    fx = FeatureExtractor(tiny_model, batch_size=2)
    p = fx.preprocessing
    g = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (3, 3, p["image_size"], p["image_size"]), dtype=torch.uint8, generator=g)
    want = fx.encode(normalize_pixels(pixels, p["mean"], p["std"]))
    assert torch.equal(fx.encode(pixels), want)


def test_uint8_pixels_need_a_known_mean_and_std(tiny_model):
    fx = FeatureExtractor(tiny_model, preprocess=build_transform(preprocess_config(tiny_model.config)))
    size = fx.patch_size * 4
    with pytest.raises(ValueError, match="uint8 pixel_values .* preprocess callable"):
        fx.encode(torch.zeros(1, 3, size, size, dtype=torch.uint8))


def test_embed_fn_still_gets_the_pixels_it_was_given(tiny_model):
    seen = []

    def embed(x):
        seen.append(x.dtype)
        return x.float().flatten(1)[:, :4]

    fx = FeatureExtractor(None, embed_fn=embed, preprocess=dict(image_size=4), batch_size=2)
    out = fx.encode(torch.full((2, 3, 4, 4), 7, dtype=torch.uint8))
    assert seen == [torch.uint8] and torch.equal(out, torch.full((2, 4), 7.0))


def test_extract_with_the_uint8_loader_gives_the_float_loader_features(tiny_model, image_dir):
    """The loader path an accelerator takes (uint8 batches, normalised in encode), run on the CPU: the same
    features, bit for bit, and the same skipped files."""
    float_fx = FeatureExtractor(tiny_model, batch_size=4)
    assert not float_fx._defer_normalize  # the CPU normalises in the loader workers
    want = float_fx.extract(image_dir["folder"])
    fx = FeatureExtractor(tiny_model, batch_size=4)
    fx._loader_transform = build_transform(fx.preprocessing, output_dtype=torch.uint8)
    got = fx.extract(image_dir["folder"])
    assert got.features.shape == want.features.shape and len(got.ids) >= 6
    assert np.array_equal(got.features, want.features)
    assert got.ids == want.ids and got.errors == want.errors


def test_normalize_pixels_names_bad_arguments():
    """From the newcomer trial: a numpy array said 'must be uint8, got uint8'; std 0 gave inf silently."""
    x = torch.zeros(3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be a torch.Tensor, got numpy.ndarray"):
        normalize_pixels(np.zeros((3, 2, 2), np.uint8), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="mean must be three numbers"):
        normalize_pixels(x, (0.5, 0.5), IMAGENET_STD)
    with pytest.raises(ValueError, match="std must be three numbers > 0"):
        normalize_pixels(x, IMAGENET_MEAN, (0.2, 0.0, 0.2))
