"""Encoders end to end over generated images with tiny models: embeddings layout, index, search, errors."""
import json
import os

import numpy as np
import pytest
import torch

from retrieval import IndexMismatchError, RetrievalError
from retrieval.embeddings import EmbeddingSource, find_shards
from retrieval.encoders import load_encoder
from retrieval.inputs import image_inputs
from retrieval.pipeline import embed_collection, index_images
from retrieval.search import Retriever

from .helpers import make_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    make_images(str(folder), 10)
    return str(folder)


@pytest.fixture(scope="module")
def vit_encoder():
    return load_encoder("internvit:internvit-6b-tiny")


@pytest.fixture(scope="module")
def internvl_encoder(internvl_fixture_module):
    return load_encoder(f"internvl-c:{internvl_fixture_module}")


@pytest.fixture(scope="module")
def internvl_fixture_module():
    from tests.conftest import fixture_dir

    return fixture_dir("internvl-cg-tiny")


def test_random_presets_are_the_same_model_everywhere(vit_encoder):
    again = load_encoder("internvit:internvit-6b-tiny")
    assert again.info()["weights_fingerprint"] == vit_encoder.info()["weights_fingerprint"]
    x = torch.randn(2, 3, 56, 56)
    out = vit_encoder.encode_images(x)
    torch.testing.assert_close(out, again.encode_images(x))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))  # L2-normalised


def test_internvit_image_to_image(tmp_path, images, vit_encoder):
    m = index_images(images, tmp_path / "idx", vit_encoder, shard_size=4, progress=False)
    assert m["ntotal"] == 10 and m["encoder"]["name"] == "internvit:internvit-6b-tiny"
    # clip-retrieval layout: img_emb/img_emb_{N}.npy + metadata/metadata_{N}.parquet, 3 shards of ≤ 4
    emb = tmp_path / "idx" / "embeddings"
    assert [os.path.basename(p) for p in find_shards(str(emb))] == ["img_emb_0.npy", "img_emb_1.npy",
                                                                   "img_emb_2.npy"]
    src = EmbeddingSource.from_folder(str(emb))
    rows = src.metadata_table().to_pylist()
    assert [r["caption"].startswith(f"Picture number {i}:") for i, r in enumerate(rows)] == [True] * 10
    # embeddings equal what the encoder gives for the same files (no other image path)
    direct = vit_encoder.embed_images(sorted(os.path.join(images, f) for f in os.listdir(images)
                                             if f.endswith(".png"))).features
    np.testing.assert_allclose(src.rows(0, 10), direct, rtol=1e-5, atol=1e-6)
    r = Retriever.load(tmp_path / "idx")
    q = os.path.join(images, "img_004.png")
    res = r.search_image([q], k=3)
    assert res.rows[0][0]["path"] == q and res.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RetrievalError, match="image-only"):
        r.search_text(["a dog"])


def test_internvl_text_and_caption_index(tmp_path, images, internvl_encoder):
    m = index_images(images, tmp_path / "img", internvl_encoder, progress=False)
    assert m["dim"] == 32
    r = Retriever.load(tmp_path / "img")  # rebuilds the recorded encoder (fixture dir + tokenizer)
    texts = ["Picture number 3: a grey pattern.", "a blue pattern"]
    res = r.search_text(texts, k=10)
    src = EmbeddingSource.from_folder(str(tmp_path / "img" / "embeddings"))
    expect = np.argsort(-(internvl_encoder.encode_texts(texts) @ src.rows(0, src.count).T), axis=1)
    np.testing.assert_array_equal(res.ids, expect)  # Flat: identical to brute force
    # captions embedded next to the images, row-aligned; a caption index answers image -> text
    assert find_shards(str(tmp_path / "img" / "embeddings"), "text")
    index_images(images, tmp_path / "cap", internvl_encoder, kind="text", progress=False,
                 embeddings_dir=str(tmp_path / "img" / "embeddings"))
    caps = Retriever.load(tmp_path / "cap")
    res = caps.search_text(["Picture number 7: a grey pattern."], k=1)
    assert res.rows[0][0]["caption"] == "Picture number 7: a grey pattern."
    res = caps.search_image([os.path.join(images, "img_002.png")], k=2)
    assert len(res.rows[0]) == 2 and all("caption" in h for h in res.rows[0])


def test_caption_index_skips_images_without_a_caption(tmp_path, images, internvl_encoder):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    for i in (1, 4, 8):
        os.remove(folder / f"img_{i:03d}.txt")  # no caption: its text embedding would be the one of ""
    m = index_images(str(folder), tmp_path / "cap", internvl_encoder, kind="text", progress=False)
    assert m["ntotal"] == 7 and m["skipped"] == {"empty_caption": 3}
    res = Retriever.load(tmp_path / "cap").search_image([str(folder / "img_004.png")], k=10)
    assert len(res.rows[0]) == 7 and all(h["caption"] for h in res.rows[0])


def test_incremental_add_through_images(tmp_path, images, vit_encoder):
    more = tmp_path / "more"
    make_images(str(more), 3, seed=5)
    index_images(images, tmp_path / "idx", vit_encoder, progress=False)
    m = index_images(str(more), tmp_path / "idx", vit_encoder, add=True, progress=False)
    assert m["ntotal"] == 13 and [e["first_id"] for e in m["embeddings"]] == [0, 10]
    res = Retriever.load(tmp_path / "idx").search_image([str(more / "img_001.png")], k=1)
    assert res.ids[0, 0] == 11 and res.rows[0][0]["path"] == str(more / "img_001.png")


def test_open_clip_encoder(tmp_path, images):
    open_clip = pytest.importorskip("open_clip")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "retrieval-tiny.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                        "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(str(cfg))
    enc = load_encoder("open_clip:retrieval-tiny")
    assert enc.dim == 16
    index_images(images, tmp_path / "idx", enc, progress=False)
    r = Retriever.load(tmp_path / "idx")
    res = r.search_text(["a red pattern"], k=4)
    src = EmbeddingSource.from_folder(str(tmp_path / "idx" / "embeddings"))
    expect = np.argsort(-(enc.encode_texts(["a red pattern"]) @ src.rows(0, src.count).T), axis=1)[:, :4]
    np.testing.assert_array_equal(res.ids, expect)


def test_mismatched_encoder_and_bad_queries(tmp_path, images, vit_encoder, internvl_encoder):
    index_images(images, tmp_path / "idx", vit_encoder, progress=False)
    with pytest.raises(IndexMismatchError, match="dim is 64"):
        Retriever.load(tmp_path / "idx", encoder=internvl_encoder)
    other = load_encoder("internvit:internvit-300m-tiny")  # same dim (64), different model
    with pytest.raises(IndexMismatchError, match="built with encoder"):
        Retriever.load(tmp_path / "idx", encoder=other)
    with pytest.raises(IndexMismatchError, match="embeddings of encoder"):
        embed_collection(other, [os.path.join(images, "img_000.png")], str(tmp_path / "idx" / "embeddings"),
                         progress=False)
    r = Retriever.load(tmp_path / "idx")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg: unreadable image"):
        r.search_image([str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        r.search_image([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="empty image query"):
        r.search_image([])


def test_inputs_parquet_and_webdataset(tmp_path, images):
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(f for f in os.listdir(images) if f.endswith(".png"))[:4]
    pq.write_table(pa.table({"image_path": [os.path.join(images, n) for n in names],
                             "caption": [f"cap {i}" for i in range(4)]}), tmp_path / "list.parquet")
    paths, caps = image_inputs(str(tmp_path / "list.parquet"))
    assert paths == [os.path.join(images, n) for n in names] and caps == [f"cap {i}" for i in range(4)]
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:02d}.tar", "w") as tar:
            for n in names[s * 2:(s + 1) * 2]:
                tar.add(os.path.join(images, n), arcname=n)
                tar.add(os.path.join(images, n[:-4] + ".txt"), arcname=n[:-4] + ".txt")
    ds, caps = image_inputs(str(tmp_path / "shard-{00..01}.tar"))
    assert len(ds) == 4 and caps[0].startswith("Picture number 0:")
    enc = load_encoder("internvit:internvit-6b-tiny")
    from_tar = enc.embed_images(ds).features
    from_files = enc.embed_images([os.path.join(images, n) for n in names]).features
    np.testing.assert_allclose(from_tar, from_files, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no image path column"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
        image_inputs(str(tmp_path / "bad.parquet"))


def test_model_is_loaded_in_the_requested_dtype_and_device(monkeypatch, internvl_fixture_module):
    import internvit

    calls = []
    load = internvit.load_model

    def spy(src, *args, **kwargs):
        calls.append(kwargs)
        return load(src, *args, **kwargs)

    monkeypatch.setattr(internvit, "load_model", spy)
    enc = load_encoder(f"internvl-c:{internvl_fixture_module}", dtype=torch.bfloat16)
    assert calls == [{"dtype": torch.bfloat16, "device": "cpu"}]  # never materialised in fp32 first
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert enc.info()["dtype"] == "bfloat16" and enc.info()["device"] == "cpu"


def test_index_built_in_bf16_is_searched_in_bf16_and_accepts_fp32(tmp_path, images, caplog):
    from internvit.features import weights_fingerprint as core_fingerprint
    from retrieval.encoders import weights_fingerprint

    enc16 = load_encoder("internvit:internvit-6b-tiny", dtype=torch.bfloat16)
    assert weights_fingerprint(enc16.model) == core_fingerprint(enc16.model)
    m = index_images(images, tmp_path / "idx", enc16, progress=False)
    assert m["encoder"]["dtype"] == "bfloat16"
    q = [os.path.join(images, "img_004.png")]
    r = Retriever.load(tmp_path / "idx")
    assert r.search_image(q, k=1).ids[0, 0] == 4
    assert r.encoder.dtype == torch.bfloat16  # rebuilt in the recorded dtype, not fp32
    r32 = Retriever.load(tmp_path / "idx", dtype=torch.float32)  # fingerprint compared in bf16: accepted
    assert r32.search_image(q, k=1).ids[0, 0] == 4 and r32.encoder.dtype == torch.float32
    enc32 = load_encoder("internvit:internvit-6b-tiny")
    Retriever.load(tmp_path / "idx", encoder=enc32)
    other = load_encoder("internvit:internvit-300m-tiny")  # other weights, same dim: still refused in fp32
    with pytest.raises(IndexMismatchError, match="built with encoder"):
        Retriever.load(tmp_path / "idx", encoder=other)
    # fp32 index, bf16 query encoder: the bf16 copy cannot prove the fp32 weights, so a warning, no refusal
    index_images(images, tmp_path / "idx32", enc32, progress=False)
    Retriever.load(tmp_path / "idx32", encoder=enc16)
    assert "cannot be checked" in caplog.text


def test_text_through_core_encode_texts(internvl_encoder):
    import torch.nn.functional as F

    texts = ["a red pattern", "Picture number 3: a grey pattern with a long caption", "x"]
    internvl_encoder.text_batch_size = 2
    try:
        out = internvl_encoder.encode_texts(texts)
    finally:
        internvl_encoder.text_batch_size = 64
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 32)
    with torch.no_grad():
        ref = torch.cat([F.normalize(internvl_encoder.model.encode_text(internvl_encoder.tokenizer([t])), dim=-1)
                         for t in texts])
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5)
    assert internvl_encoder.encode_texts("x").shape == (1, 32)
    assert internvl_encoder.encode_texts([]).shape == (0, 32)


def test_weight_file_without_tokenizer(tmp_path, images, internvl_fixture_module, capsys):
    """A model given as weights without a tokenizer (like internvl_c_13b_224px.pth) indexes images; a text
    query then fails with one line naming --tokenizer, and works once a tokenizer is given."""
    from tests.retrieval.test_cli import _main

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(internvl_fixture_module, f), bare / f)
    enc = load_encoder(f"internvl-c:{bare}")
    assert enc.tokenizer is None and not enc.supports_text
    with pytest.raises(RetrievalError, match="no tokenizer") as e:
        enc.encode_texts(["a dog"])
    assert "\n" not in str(e.value) and "--tokenizer" in str(e.value)
    index_images(images, tmp_path / "idx", enc, progress=False)  # captions stay metadata only
    assert _main("search")([str(tmp_path / "idx"), "--text", "a dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no tokenizer" in err and "\n" not in err
    tok = os.path.join(internvl_fixture_module, "tokenizer.model")
    assert _main("search")([str(tmp_path / "idx"), "--text", "a dog", "--tokenizer", tok, "--dtype", "bf16",
                            "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_query_sized_inputs_match_the_feature_extractor(tmp_path, images, vit_encoder):
    """A few query images skip the feature extractor's loader (speed) but not its rules: the same features bit
    for bit, the same error listing, the same strict refusal naming the file."""
    from PIL import Image

    paths = sorted(os.path.join(images, f) for f in os.listdir(images) if f.endswith(".png"))[:4]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    mixed = paths[:2] + [str(bad)] + paths[2:]
    few = vit_encoder.embed_images(mixed, strict=False)                   # the direct path (<= batch_size)
    many = vit_encoder.embed_images(mixed, strict=False, batch_size=2)    # through FeatureExtractor
    assert few.ids == many.ids == [0, 1, 3, 4]
    assert few.paths == many.paths
    assert [e["id"] for e in few.errors] == [e["id"] for e in many.errors] == [2]
    assert few.errors[0]["error"] == many.errors[0]["error"]
    ref = vit_encoder.feature_extractor(batch_size=8).extract(paths).features  # same batch composition
    assert np.array_equal(few.features, ref)
    with pytest.raises(ValueError, match="bad.jpg: unreadable image"):
        vit_encoder.embed_images(mixed, strict=True)
    pil = [Image.open(p) for p in paths]
    assert np.array_equal(vit_encoder.embed_images(pil).features, ref)
    la = pil[0].convert("LA")  # a mode that needs to_rgb: composited the same way on both paths
    assert np.array_equal(vit_encoder.embed_images([la]).features[0],
                          vit_encoder.embed_images([la, la], batch_size=1).features[0])
