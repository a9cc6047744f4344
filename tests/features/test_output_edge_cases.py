"""Edge cases of what the feature extractor writes, found by a newcomer trial: each was silently wrong or left
something behind (overflowing normalisation, the dimension of an all-failed job, a block listed twice, a
warning that asked for what was given, a refused write's lock file)."""
import os
import warnings

import numpy as np
import pytest
import torch

from internvit import FeatureExtractor
from internvit.features import l2_normalize, read_features
from internvit.fingerprint import PreprocessingFingerprintWarning

from .images import make_images


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp("four")), 4, seed=5)


def test_normalize_does_not_overflow_and_refuses_zero_rows(four_images):
    """F.normalize squares the values: finite rows of ~1e20 had an infinite norm and were written as zeros;
    an all-zero feature (no direction) was written as zeros too. Now the first are unit rows and the second
    are reported as rows that cannot be normalised, never stored."""
    huge = FeatureExtractor(None, embed_fn=lambda x: torch.full((x.shape[0], 64), 1e20, dtype=torch.bfloat16),
                            preprocess=dict(image_size=56), normalize=True, progress=False)
    r = huge.extract(four_images)
    assert r.features.shape == (4, 64) and np.allclose(np.linalg.norm(r.features, axis=1), 1.0) and not r.errors
    zero = FeatureExtractor(None, embed_fn=lambda x: torch.zeros((x.shape[0], 64)), preprocess=dict(image_size=56),
                            normalize=True, progress=False)
    r = zero.extract(four_images)
    assert r.features.shape == (0, 64) and len(r.errors) == 4
    assert "an all-zero feature, which has no direction to normalise" in r.errors[0]["error"]
    x = torch.tensor([[3e30, 4e30], [0.0, 0.0], [1.0, float("nan")]])
    y = l2_normalize(x)
    assert torch.allclose(y[0], torch.tensor([0.6, 0.8])) and torch.isnan(y[1:]).all()


def test_an_all_failed_job_records_the_model_dimension(tiny_model, tmp_path):
    """No image readable: the manifest said feature_shape [0], dim 0, and the shard was (0, 0)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_text("not an image")
    m = FeatureExtractor(tiny_model, progress=False).write(str(bad), str(tmp_path / "out"))
    assert m["feature_shape"] == [64] and m["dim"] == 64 and m["count"] == 0
    assert read_features(str(tmp_path / "out"))[0].shape == (0, 64)


def test_a_block_listed_twice_is_refused(tiny_model):
    """layers=[-1, 2] on a 3-block model concatenated block 2 with itself, silently."""
    with pytest.raises(ValueError, match=r"layers \[-1, 2\]: block\(s\) \[2\] listed twice"):
        FeatureExtractor(tiny_model, layers=[-1, 2])
    assert FeatureExtractor(tiny_model, layers=[0, -1], progress=False).layers == [0, -1]


class _Tensors(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.zeros(3, 56, 56) + i


def test_preprocess_id_silences_the_warning_that_asks_for_it(tiny_model, tmp_path):
    fx = FeatureExtractor(tiny_model, progress=False)
    with pytest.warns(PreprocessingFingerprintWarning, match="pass preprocess_id="):
        fx.write(_Tensors(), str(tmp_path / "a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PreprocessingFingerprintWarning)
        fx.write(_Tensors(), str(tmp_path / "b"), preprocess_id="zeros-plus-index")


def test_a_refused_write_leaves_the_folder_as_it_was(tiny_model, four_images, tmp_path):
    """write(overwrite=True) into a user's folder refused (right) but left .store/lock in it; a refused write
    into a new folder left the folder."""
    user = tmp_path / "user"
    (user / "features").mkdir(parents=True)
    (user / "features" / "part-00000.npy").write_text("precious")
    (user / "notes.txt").write_text("mine")
    fx = FeatureExtractor(tiny_model, progress=False)
    with pytest.raises(FileExistsError, match="not empty .* holds no feature extraction"):  # before any work
        fx.write(four_images, str(user), overwrite=True)
    assert sorted(os.listdir(user)) == ["features", "notes.txt"]
    assert (user / "features" / "part-00000.npy").read_text() == "precious"
