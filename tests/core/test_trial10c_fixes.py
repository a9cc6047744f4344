"""Trial 10c: faults a Python API user found in feature extraction (each test failed on the code before its fix)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import internvit
from internvit.features import FeatureExtractor, read_features


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


# -- 2. pixels of different sizes in one batch: torch's 'stack expects each tensor to be equal size' ------------
class _SizedDataset(Dataset):
    """Ready pixel tensors whose size varies with the item (as a dataset keeping each image's own size gives)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(3, self.sizes[i], self.sizes[i])


def test_pixels_of_different_sizes_name_the_rows(tiny_vit):
    fx = FeatureExtractor(tiny_vit, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"input rows 0 and 2 give pixels of shapes \(3, 56, 56\) and \(3, 84, "
                                         r"84\).*one size"):
        fx.extract(_SizedDataset([56, 56, 84]))
    # one item per batch: every size is its own batch, and the rows are right
    res = FeatureExtractor(tiny_vit, batch_size=1, progress=False).extract(_SizedDataset([56, 84]))
    assert res.features.shape == (2, 64) and res.ids == [0, 1]


def test_tiles_of_a_size_changing_transform_name_the_rows(tiny_vit, tmp_path):
    """The tile path (``collate_tiles``) had the same bare torch error for a callable preprocessing whose output
    size depends on the image."""
    from torchvision.transforms.functional import to_tensor

    paths = []
    for k, (w, h) in enumerate([(40, 40), (200, 40)]):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (w, h), (k * 90, 20, 30)).save(paths[-1])
    calls = {"n": 0}

    def grows(img: Image.Image) -> torch.Tensor:
        calls["n"] += 1
        side = 56 if calls["n"] == 1 else 84
        return to_tensor(img.resize((side, side)))

    fx = FeatureExtractor(tiny_vit, grows, tiles=4, batch_size=16, progress=False)
    with pytest.raises(ValueError, match=r"input rows 0 and 1 give pixels of shapes \(1, 3, 56, 56\) and"):
        fx.extract(paths)


def test_same_size_batches_are_unchanged(tiny_vit, tmp_path):
    """The check costs nothing to the usual case: one batch of equal sizes gives the same rows as before."""
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (30 + 10 * k, 40), (k * 60, 20, 30)).save(paths[-1])
    fx = FeatureExtractor(tiny_vit, batch_size=8, progress=False)
    whole = fx.extract(paths).features
    one = FeatureExtractor(tiny_vit, batch_size=1, progress=False).extract(paths).features
    torch.testing.assert_close(torch.from_numpy(whole), torch.from_numpy(one), atol=1e-5, rtol=0)
    fx.write(paths, tmp_path / "out", shard_size=2)
    assert read_features(tmp_path / "out")[0].shape == (3, 64)


# -- 3. InternVL text ids: floats truncated, negatives taken as padding, ids past the vocabulary; no texts -------
@pytest.fixture(scope="module")
def tiny_internvl():
    """The tiny InternVL-C/G of the parity fixtures with its real LLaMA tokenizer."""
    from tests.conftest import fixture_dir

    path = fixture_dir("internvl-cg-tiny")
    return internvit.load_model(path), internvit.get_tokenizer(path)


def test_encode_text_refuses_ids_it_cannot_embed(tiny_internvl):
    model, tok = tiny_internvl
    ids = tok(["a dog", "a cat"])
    with pytest.raises(TypeError, match="input_ids of dtype float32: expected integer token ids"):
        model.encode_text(ids.float() + 0.7)  # was truncated to the ids, silently
    past = ids.clone()
    past[1, 3] = 60000
    with pytest.raises(ValueError, match=r"row 1, position 3: id 60000 is not in the vocabulary \[0, 49954\)"):
        model.encode_text(past)  # was a bare 'IndexError: index out of range in self'
    neg = ids.clone()
    neg[0, 2] = -5
    with pytest.raises(ValueError, match="row 0, position 2: id -5 is not in the vocabulary"):
        model.encode_text(neg)  # was taken as padding: the text lost that token, silently
    with pytest.raises(ValueError, match="holds only padding"):
        model.encode_text(torch.zeros(1, 80, dtype=torch.long))


@pytest.mark.parametrize("mode", ["InternVL-C", "InternVL-G"])
def test_no_texts_and_no_images_give_empty_embeddings(tiny_internvl, mode):
    """``tok([])`` is ``(0, 80)``; encoding it (or ``(0, 3, H, W)`` pixels) crashed inside torch (``max()`` of
    nothing / a reshape to -1 of 0 elements) instead of giving ``(0, D)`` as the ViT does."""
    model, tok = tiny_internvl
    txt = model.encode_text(tok([]))
    img = model.encode_image(torch.zeros(0, 3, 56, 56), mode=mode)
    assert txt.shape == (0, 32) and img.shape == (0, 32)
    logits, _ = model(torch.zeros(0, 3, 56, 56), tok(["a dog"]), mode=mode)
    assert logits.shape == (0, 1)
    full = model.encode_image(torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0)), mode=mode)
    assert torch.isfinite(full).all()


# -- 4. get_tokenizer(prefix=None): 'no prefix' crashed on the first call with "None + str" ---------------------
def test_tokenizer_prefix_none_is_no_prefix_and_other_types_are_refused():
    from tests.conftest import fixture_dir

    path = fixture_dir("internvl-cg-tiny")
    none, empty = internvit.get_tokenizer(path, prefix=None), internvit.get_tokenizer(path, prefix="")
    assert torch.equal(none(["a dog"]), empty(["a dog"]))
    assert not torch.equal(none(["a dog"]), internvit.get_tokenizer(path)(["a dog"]))  # the default keeps it
    with pytest.raises(TypeError, match="prefix must be a str .* got int 5"):
        internvit.get_tokenizer(path, prefix=5)


# -- 5. load_model: truthy strings as flags, a meta device (no weights), CUDA absent deep inside torch ----------
@pytest.mark.parametrize("kw, err, msg", [
    (dict(mmap="no"), TypeError, "mmap must be True or False, got str 'no'"),   # was: memory-mapped
    (dict(freeze="false"), TypeError, "freeze must be True or False"),          # was: frozen
    (dict(device="meta"), ValueError, "device 'meta': expected cpu"),            # was: a model of no weights
])
def test_load_model_checks_flags_and_device_first(vit_fixture, kw, err, msg):
    with pytest.raises(err, match=msg):
        internvit.load_model(vit_fixture, **kw)
    with pytest.raises(err, match=msg.split(",")[0]):
        internvit.load_model("internvit-6b-tiny", **kw)  # the preset path too


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_in_load_model_and_extractor(vit_fixture, tiny_vit):
    """``load_model(device='cuda')`` was torch's 'Found no NVIDIA driver ...' after reading the config; the
    extractor said so only for ``'cuda'``, and took ``'meta'`` (features of no values)."""
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        internvit.load_model(vit_fixture, device="cuda")
    for device, msg in (("cuda:1", "CUDA is not available"), ("meta", "expected cpu")):
        with pytest.raises(ValueError, match=msg):
            FeatureExtractor(tiny_vit, device=device, progress=False)
    assert internvit.load_model(vit_fixture, device=torch.device("cpu"), mmap=True, freeze=True) is not None


# -- 6. a None entry passed the checks meant to name it ('next(..., None)' found None: "nothing bad") -----------
def test_a_none_image_path_is_named(tiny_vit):
    with pytest.raises(TypeError, match="image paths must be str or os.PathLike, got NoneType None at position 1"):
        FeatureExtractor(tiny_vit, progress=False).extract(["a.png", None])  # was os.fspath's bare TypeError


def test_a_none_layer_is_named(tiny_vit):
    with pytest.raises(TypeError, match=r"layers must be block indices \(ints\), got NoneType None in \[-1, None\]"):
        FeatureExtractor(tiny_vit, layers=[-1, None], progress=False)  # was int()'s bare TypeError


def test_a_null_shard_in_a_safetensors_index_is_named(vit_fixture, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(f"{vit_fixture}/model.safetensors")
    shutil.copy(f"{vit_fixture}/config.json", tmp_path)
    save_file(weights, tmp_path / "model-1-of-1.safetensors")
    weight_map = {k: "model-1-of-1.safetensors" for k in weights}
    weight_map["embeddings.class_embedding"] = None
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(internvit.checkpoints.CheckpointError,
                       match="not a valid shard index .shard None of 'embeddings.class_embedding'"):
        internvit.load_model(tmp_path)  # was os.path.join's bare TypeError


def test_build_zero_shot_classifier_checks_templates_as_the_cli_does(tiny_internvl):
    from classification import build_zero_shot_classifier

    model, tok = tiny_internvl
    with pytest.raises(TypeError, match="a template must be a format string or a callable, got NoneType at "
                                        "position 1"):
        build_zero_shot_classifier(model, tok, ["dog", "cat"], ["a photo of a {c}.", None])  # an AttributeError
    with pytest.raises(ValueError, match="has no '{c}' placeholder"):
        build_zero_shot_classifier(model, tok, ["dog", "cat"], ["a photo of a {c}.", "a photo."])
    assert build_zero_shot_classifier(model, tok, ["dog", "cat"], ["a {c}.", "a photo of a {}."]).shape == (32, 2)


# -- 7. write(manifest_extra=...) replaced the manifest's own fields; extra_columns of a str ---------------------
def _two_images(tmp_path) -> list[str]:
    paths = []
    for k in range(2):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (30, 20 + 10 * k), (k * 90, 20, 30)).save(paths[-1])
    return paths


@pytest.mark.parametrize("extra, msg", [
    ({"shards": 1}, "'shards' is a field the job writes itself"),   # committed a folder read_features refused
    ({"count": 99}, "'count' is a field the job writes itself"),    # a count of 99 for 2 rows, silently
    ({"model": "mine"}, "'model' is a field"),                      # the model record replaced
    ({"note": object()}, "give JSON data"),                         # its repr, a memory address: runs differ
    ({"score": float("nan")}, "give JSON data"),                    # NaN: not JSON
    ({1: "a"}, "under a str key"),
])
def test_manifest_extra_is_checked_before_any_work(tiny_vit, tmp_path, extra, msg):
    paths = _two_images(tmp_path)
    with pytest.raises(ValueError, match=msg):
        FeatureExtractor(tiny_vit, progress=False).write(paths, tmp_path / "out", manifest_extra=extra)
    assert not (tmp_path / "out").exists()
    man = FeatureExtractor(tiny_vit, progress=False).write(paths, tmp_path / "ok",
                                                           manifest_extra={"note": [1, "a", {"b": None}]})
    assert man["note"] == [1, "a", {"b": None}] and man["count"] == 2


def test_an_extra_column_of_one_str_is_refused(tiny_vit, tmp_path):
    """``{'label': 'ab'}`` for two images wrote 'a' and 'b' (a str is a sequence of its characters)."""
    paths = _two_images(tmp_path)
    with pytest.raises(TypeError, match=r"extra_columns\['label'\] is a str, not one value per image"):
        FeatureExtractor(tiny_vit, progress=False).write(paths, tmp_path / "out", extra_columns={"label": "ab"})
    with pytest.raises(ValueError, match="column names must be non-empty str"):
        FeatureExtractor(tiny_vit, progress=False).write(paths, tmp_path / "out", extra_columns={"": [1, 2]})
    assert not (tmp_path / "out").exists()


# -- 8. overwrite=True replaced a FAISS index folder's manifest by features --------------------------------------
def test_overwrite_replaces_only_features_never_an_index_folder(tiny_vit, tmp_path):
    """The refusal said 'a folder no feature extraction wrote' without ``overwrite``; with it the index folder's
    manifest became a feature manifest and its index file was orphaned (search: 'not an index manifest')."""
    import numpy as np

    from retrieval import build_index

    paths = _two_images(tmp_path)
    emb = tmp_path / "emb"
    FeatureExtractor(tiny_vit, progress=False, normalize=True).write(
        paths, emb, features_pattern="img_emb/img_emb_{shard}.npy",
        metadata_pattern="metadata/metadata_{shard}.parquet")
    build_index(str(emb), str(tmp_path / "idx"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir() if p.is_file()}
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="holds an index, not a feature folder: .* replaces only features"):
            FeatureExtractor(tiny_vit, progress=False).write(paths, tmp_path / "idx", overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir() if p.is_file()} == before
    # a feature folder of another job is still replaced with overwrite=True
    man = FeatureExtractor(tiny_vit, progress=False, pool="mean").write(paths, emb, overwrite=True)
    assert man["pool"] == "mean" and np.isfinite(read_features(emb)[0]).all()
