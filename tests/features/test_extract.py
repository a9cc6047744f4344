"""FeatureExtractor.extract: pools and layers against the model's own hidden states, inputs, bad files."""
import copy
import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import internvit
from internvit.data import ImageDataset, collate_images, list_images, load_image
from internvit.features import FeatureExtractor, FeatureResult


def _pixels(model, paths, **overrides):
    t = internvit.build_transform(internvit.preprocess_config(model.config, **overrides))
    return torch.stack([t(load_image(p)) for p in paths])


def _reference(model, x, pool, layers):
    """Features computed directly from ``model(x, output_hidden_states=True)``."""
    with torch.no_grad():
        hs = model(x, output_hidden_states=True).hidden_states
    n = model.num_layers
    parts = []
    for i in layers if layers is not None else [-1]:
        t = hs[(i % n) + 1]  # hidden_states[k] = output after k blocks
        cls, patches = t[:, 0], t[:, 1:]
        if pool == "cls":
            parts.append(cls)
        elif pool == "mean":
            parts.append(patches.mean(1))
        elif pool == "cls_mean":
            parts.append(torch.cat([cls, patches.mean(1)], -1))
        else:
            side = int(round(patches.shape[1] ** 0.5))
            parts.append(patches.reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2))
    return torch.cat(parts, 1).numpy()


@pytest.mark.parametrize("layers", [None, [0, -1]])
@pytest.mark.parametrize("pool", ["cls", "mean", "cls_mean", "grid"])
def test_pools_and_layers_match_hidden_states(tiny_model, image_dir, pool, layers):
    paths = image_dir["good"]
    res = FeatureExtractor(tiny_model, pool=pool, layers=layers, batch_size=4, progress=False).extract(paths)
    expected = _reference(tiny_model, _pixels(tiny_model, paths), pool, layers)
    c, k = tiny_model.config.hidden_size, len(layers or [-1])
    shape = {"cls": (c * k,), "mean": (c * k,), "cls_mean": (2 * c * k,), "grid": (c * k, 4, 4)}[pool]
    assert res.features.shape == (len(paths), *shape)
    assert res.features.dtype == np.float32
    np.testing.assert_allclose(res.features, expected, atol=1e-5, rtol=1e-5)
    assert res.ids == list(range(len(paths))) and res.paths == paths and res.errors == []


def test_image_size_override_and_normalize(tiny_model, image_dir):
    paths = image_dir["good"][:3]
    fx = FeatureExtractor(tiny_model, dict(image_size=84), pool="grid", layers=[1], progress=False)
    res = fx.extract(paths)
    assert res.features.shape == (3, 64, 6, 6)  # 84 px / patch 14: position embedding interpolated
    expected = _reference(tiny_model, _pixels(tiny_model, paths, image_size=84), "grid", [1])
    np.testing.assert_allclose(res.features, expected, atol=1e-5, rtol=1e-5)
    assert fx.preprocessing["image_size"] == 84 and fx.preprocessing["mean"] == list(tiny_model.config.image_mean)

    res = FeatureExtractor(tiny_model, pool="mean", normalize=True, progress=False).extract(paths)
    np.testing.assert_allclose(np.linalg.norm(res.features, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown field"):
        FeatureExtractor(tiny_model, dict(img_size=84))


def test_bf16_runs_and_is_close(tiny_model, image_dir):
    paths = image_dir["good"][:4]
    ref = FeatureExtractor(tiny_model, pool="cls", progress=False).extract(paths).features
    model16 = copy.deepcopy(tiny_model)
    res = FeatureExtractor(model16, pool="cls", dtype=torch.bfloat16, progress=False).extract(paths)
    assert model16.dtype == torch.bfloat16 and res.features.dtype == np.float32
    cos = (res.features * ref).sum(1) / np.linalg.norm(res.features, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98, cos
    assert not np.array_equal(res.features, ref)  # it really ran in bf16


def test_input_kinds_and_bad_files(tiny_model, image_dir, tmp_path):
    folder, good = image_dir["folder"], image_dir["good"]
    listed = list_images(folder)
    assert listed == sorted(good + [image_dir["corrupt"], image_dir["not_image"]])  # readme.txt not listed
    fx = FeatureExtractor(tiny_model, batch_size=3, progress=False)
    from_folder = fx.extract(folder)
    bad = {listed.index(image_dir["corrupt"]), listed.index(image_dir["not_image"])}
    assert {e["id"] for e in from_folder.errors} == bad
    assert {e["path"] for e in from_folder.errors} == {image_dir["corrupt"], image_dir["not_image"]}
    assert all(e["error"] for e in from_folder.errors)
    assert from_folder.ids == [i for i in range(len(listed)) if i not in bad]
    assert from_folder.paths == good

    reference = fx.extract(good).features
    np.testing.assert_allclose(from_folder.features, reference, atol=1e-6)

    # a list file: comments, blank lines, relative and absolute paths
    sub = tmp_path / "lists"
    sub.mkdir()
    lines = ["# my images", "", os.path.relpath(good[0], sub), good[1], "missing.png", good[2]]
    (sub / "images.txt").write_text("\n".join(lines) + "\n")
    res = fx.extract(str(sub / "images.txt"))
    assert res.ids == [0, 1, 3] and [e["id"] for e in res.errors] == [2]
    assert "missing.png" in res.errors[0]["path"] and "FileNotFoundError" in res.errors[0]["error"]
    np.testing.assert_allclose(res.features, reference[:3], atol=1e-6)

    # a Dataset of preprocessed tensors (items: (tensor, label))
    x = _pixels(tiny_model, good)
    res = fx.extract(TensorDataset(x, torch.arange(len(good))))
    assert res.ids == list(range(len(good))) and res.paths[0] == "TensorDataset[0]"
    np.testing.assert_allclose(res.features, reference, atol=1e-5)


def test_list_images_and_collate(image_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="list.txt"):
        list_images(str(tmp_path / "list.txt"))
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "X.TIFF").write_bytes(b"")
    (tmp_path / "a" / "y.Jpeg").write_bytes(b"")
    (tmp_path / "a" / "z.gif.txt").write_bytes(b"")
    assert list_images(str(tmp_path / "a")) == [str(nested / "X.TIFF"), str(tmp_path / "a" / "y.Jpeg")]

    ds = ImageDataset([image_dir["good"][0], image_dir["corrupt"], image_dir["good"][1]], lambda im: torch.ones(2))
    pixels, ids, errors = collate_images([ds[i] for i in range(3)])
    assert ds[1][0] is None and ds[1][1] == 1 and ds[1][2]
    assert pixels.shape == (2, 2) and ids == [0, 2] and errors == [(1, ds[1][2])]
    assert collate_images([ds[1]])[0] is None


def test_embed_fn_without_model(image_dir):
    fx = FeatureExtractor(None, dict(image_size=28), embed_fn=lambda x: x.flatten(1)[:, :5] * 2, progress=False)
    res = fx.extract(image_dir["good"][:2])
    t = internvit.build_transform(internvit.preprocess_config(None, image_size=28))
    expected = torch.stack([t(load_image(p)) for p in image_dir["good"][:2]]).flatten(1)[:, :5] * 2
    assert isinstance(res, FeatureResult)
    np.testing.assert_allclose(res.features, expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="preprocess"):
        FeatureExtractor(None, embed_fn=lambda x: x)
    bad = FeatureExtractor(None, dict(image_size=28), embed_fn=lambda x: x, progress=False)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        bad.extract(image_dir["good"][:1])


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="pool"):
        FeatureExtractor(tiny_model, pool="max")
    with pytest.raises(ValueError, match="block index 7"):
        FeatureExtractor(tiny_model, layers=[7])
