"""ToNormalizedTensor: the fused ToTensor + Normalize used by every eval and training transform."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from internvit.config import IMAGENET_MEAN, IMAGENET_STD
from internvit.transforms import ToNormalizedTensor, build_transform

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD), ((0.5,) * 3, (0.5,) * 3)])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (56, 56), (224, 224), (301, 449)])
def test_bit_identical_to_torchvision(mean, std, size):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[0, 0] = (0, 255, 128)  # both extremes present
    img = Image.fromarray(pixels)
    ref = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(img)
    ours = ToNormalizedTensor(mean, std)(img)
    assert ours.dtype == torch.float32 and ours.shape == (3, size[1], size[0]) and ours.is_contiguous()
    assert torch.equal(ours, ref)  # bit for bit, not allclose


def test_every_eval_transform_equals_the_torchvision_composition():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    for mode in ("crop", "squash"):
        p = dict(image_size=64, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), interpolation="bicubic",
                 resize_mode=mode)
        ours = build_transform(p)
        resize = ([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)] if mode == "crop"
                  else [T.Resize((64, 64), interpolation=T.InterpolationMode.BICUBIC)])
        ref = T.Compose([*resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        assert torch.equal(ours(img), ref(img))


def test_refuses_what_is_not_8bit_rgb_and_pickles():
    f = ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)
    for mode in ("L", "RGBA", "I;16", "F"):
        with pytest.raises(ValueError, match=f"mode '{mode}'"):
            f(Image.new(mode, (4, 4)))
    g = pickle.loads(pickle.dumps(f))  # DataLoader workers get the transform pickled
    img = Image.new("RGB", (5, 6), (10, 200, 30))
    assert torch.equal(g(img), f(img)) and "ToNormalizedTensor" in repr(g)
